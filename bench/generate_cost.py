"""What one greedy decoding step costs on the CPU: the embedded model in 4-bit NF4 and unquantized.

The stop-rate probe during training (--eval-generate) and `lora-cli eval` generate token by
token; this times `--tokens` new tokens for a batch of `--batch` prompts, as the probe runs them
(the model as training loads it: bitsandbytes' CPU inference layout off), and prints wall and
CPU seconds per new token. Run it on a quiet machine: CPU time is the fairer figure on a busy one.

    LORA_CLI_HOME=.lora-cache/test-home python bench/generate_cost.py --tokens 32 --batch 8
"""

from __future__ import annotations

import argparse
import time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--variants", default="nf4:fp32,nf4:bf16,none:fp32,none:bf16")
    opts = parser.parse_args()

    import torch

    from lora_cli.model.load import load_model, load_tokenizer, quiet_libraries
    from lora_cli.model.resolve import resolve_model

    quiet_libraries()
    path = resolve_model("smollm2-135m").path
    tok = load_tokenizer(path)
    prompt = tok("### Instruction:\nList ten animals.\n\n### Response:\n")["input_ids"]
    ids = torch.tensor([prompt] * opts.batch)
    for variant in opts.variants.split(","):
        quant, precision = variant.split(":")
        model = load_model(path, quant, precision, torch.device("cpu")).eval()
        kwargs = dict(max_new_tokens=opts.tokens, min_new_tokens=opts.tokens, do_sample=False, use_cache=True,
                      pad_token_id=tok.pad_token_id)
        with torch.no_grad():
            model.generate(input_ids=ids[:, :8], max_new_tokens=2, do_sample=False, pad_token_id=tok.pad_token_id)
            wall, cpu = time.perf_counter(), time.process_time()
            model.generate(input_ids=ids, **kwargs)
            wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        print(f"{quant:>4} {precision}: {opts.tokens} tokens x batch {opts.batch}: {wall / opts.tokens:.3f} s wall, "
              f"{cpu / opts.tokens:.3f} s CPU per new token", flush=True)


if __name__ == "__main__":
    main()
