"""Measure `lora-cli export` on a trained adapter: size, time and fidelity per outtype (the README's table).

    python scripts/measure_export.py ADAPTER_DIR VAL.jsonl [OUT_DIR] [BASE_WEIGHTS] [OUTTYPES]

For each outtype the merged model is exported to GGUF, loaded back with transformers' GGUF loader, and
compared with the fp32 merge on the same base weights, over the full training sequences of the
validation records: largest logit difference (absolute, and as a fraction of the largest logit),
mean difference, agreement of the argmax, and the response cross-entropy (lora-cli eval's loss).
Timings are wall-clock on whatever machine runs it (they swing on shared machines).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path


def sequences(adapter_dir: Path, val: Path):
    from lora_cli.adapter.folder import load_template, read_adapter
    from lora_cli.data.records import Example
    from lora_cli.data.tokenization import LabelPolicy, encode_batch
    from lora_cli.model.load import load_tokenizer

    info = read_adapter(adapter_dir)
    tok = load_tokenizer(adapter_dir)
    rows = [json.loads(line) for line in val.read_text().splitlines() if line.strip()]
    examples = [Example(i, r["instruction"], r.get("input", ""), r["output"]) for i, r in enumerate(rows)]
    return info, encode_batch(examples, tok, load_template(info), LabelPolicy(max_length=info.max_length))


def evaluate(model, encoded) -> tuple[list, float]:
    import torch

    outs, losses = [], []
    with torch.no_grad():
        for enc in encoded:
            ids, labels = torch.tensor([enc.input_ids]), torch.tensor([enc.labels])
            logits = model(input_ids=ids).logits.float()
            outs.append(logits[0])
            losses.append(torch.nn.functional.cross_entropy(logits[0, :-1], labels[0, 1:], ignore_index=-100,
                                                            reduction="sum").item())
    n = sum(sum(1 for x in e.labels[1:] if x != -100) for e in encoded)
    return outs, sum(losses) / n


def main(adapter_dir: Path, val: Path, out_dir: Path, base_weights: str = "auto",
         outtypes: tuple[str, ...] = ("f32", "f16", "bf16", "q8_0", "q4_0")) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    from lora_cli.adapter.merging import merged_model
    from lora_cli.export.runner import export

    torch.set_num_threads(2)
    out_dir.mkdir(parents=True, exist_ok=True)
    info, encoded = sequences(adapter_dir, val)
    auto = "nf4" if info.quantization == "nf4" else "original"
    weights = auto if base_weights == "auto" else base_weights
    reference, _ = merged_model(info, "fp32", weights)
    ref_logits, ref_loss = evaluate(reference, encoded)
    print(f"reference: fp32 merge on {weights} base weights, val response loss {ref_loss:.4f}")
    rows = []
    for outtype in outtypes:
        path = out_dir / f"model-{outtype}.gguf"
        t0 = time.time()
        export(info, path, "gguf", outtype, weights, force=True)
        seconds = time.time() - t0
        model = AutoModelForCausalLM.from_pretrained(str(out_dir), gguf_file=path.name)
        got, loss = evaluate(model, encoded)
        diff = max(float((g - r).abs().max()) for g, r in zip(got, ref_logits))
        scale = max(float(r.abs().max()) for r in ref_logits)
        mean = sum(float((g - r).abs().mean()) for g, r in zip(got, ref_logits)) / len(got)
        agree = sum(int((g.argmax(-1) == r.argmax(-1)).sum()) for g, r in zip(got, ref_logits)) / \
            sum(r.shape[0] for r in ref_logits)
        rows.append((outtype, path.stat().st_size / 1e6, seconds, diff, diff / scale, mean, agree, loss))
        print(f"{outtype:5} {rows[-1][1]:7.1f} MB {seconds:6.1f} s  max|d| {diff:.4f} ({diff / scale:.2%})  "
              f"mean|d| {mean:.5f}  argmax {agree:.2%}  loss {loss:.4f}", flush=True)
        del model
    t0 = time.time()
    export(info, out_dir / "adapter-f16.gguf", "gguf-lora", "f16", force=True)
    print(f"gguf-lora f16: {(out_dir / 'adapter-f16.gguf').stat().st_size / 1e6:.1f} MB in {time.time() - t0:.1f} s")


if __name__ == "__main__":
    args = sys.argv[1:]
    main(Path(args[0]), Path(args[1]), Path(args[2] if len(args) > 2 else "export-measure"),
         args[3] if len(args) > 3 else "auto", tuple(args[4].split(",")) if len(args) > 4 else
         ("f32", "f16", "bf16", "q8_0", "q4_0"))
