"""The real CLI on several GPUs: FSDP and data parallel side by side, on a small random model.

Builds a small Qwen2-shaped model with random weights and a BPE tokenizer (tests/tiny_models.py,
no hub), then runs, each through the command a user types:
    lora-cli train --gpus N --fsdp ...    (QLoRA + FSDP: 4-bit base sharded)
    lora-cli train --gpus N ...           (QLoRA data parallel: 4-bit base copied)
    lora-cli param-report / package / package --verify on the FSDP adapter
and prints a table: steps, first/last train loss, eval losses, wall time, and how far the two
adapters are apart (same data, same global batch, LoRA dropout 0; bf16 rounding differs).

    python bench/fsdp_smoke.py --gpus 2 --out /tmp/out/fsdp-smoke
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))


def cli(args: list[str], log: Path) -> tuple[int, float]:
    t0 = time.time()
    with open(log, "w") as fh:
        rc = subprocess.run([sys.executable, "-m", "lora_cli", *args], cwd=REPO, stdout=fh, stderr=subprocess.STDOUT).returncode
    print(f"$ lora-cli {' '.join(args)}\n  exit {rc} in {time.time() - t0:.0f} s (log: {log})", flush=True)
    return rc, time.time() - t0


def losses(folder: Path) -> dict:
    rows = [json.loads(x) for x in (folder / "metrics.jsonl").read_text().splitlines()]
    train = [r["loss"] for r in rows if r["type"] == "train"]
    return {"first": train[0], "last": train[-1], "eval": [round(r["eval_loss"], 4) for r in rows if r["type"] == "eval"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gpus", type=int, default=2)
    ap.add_argument("--out", default="/tmp/fsdp-smoke")
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--epochs", type=int, default=3)
    opts = ap.parse_args()
    from tiny_models import build_model, build_tokenizer

    out = Path(opts.out)
    model = out / "model"
    tok = build_tokenizer(model)
    build_model(model, len(tok), layers=opts.layers, hidden=opts.hidden)
    common = ["--model", str(model), "--train", "sample_data/train.jsonl", "--val", "sample_data/val.jsonl",
              "--epochs", str(opts.epochs), "--lora-dropout", "0", "--cache-dir", str(out / "cache"), "--overwrite"]
    runs = {"fsdp": ["--gpus", str(opts.gpus), "--fsdp"], "ddp": ["--gpus", str(opts.gpus)]}
    table = []
    for name, flags in runs.items():
        rc, secs = cli(["train", *common, *flags, "-o", str(out / name)], out / f"{name}.log")
        row = {"run": name, "exit": rc, "seconds": round(secs, 1)}
        if rc == 0:
            saved = (out / name / "run_config.yaml").read_text()
            row.update(losses(out / name), fsdp_recorded="fsdp: true" in saved)
        table.append(row)
    if all(r["exit"] == 0 for r in table):
        from safetensors.torch import load_file

        a, b = (load_file(str(out / n / "adapter_model.safetensors")) for n in runs)
        table.append({"run": "adapters fsdp vs ddp", "same_keys": a.keys() == b.keys(),
                      "max_abs_diff": max((a[k].float() - b[k].float()).abs().max().item() for k in a),
                      "max_abs_value": max(v.float().abs().max().item() for v in a.values())})
        for args in (["param-report", str(out / "fsdp")], ["package", str(out / "fsdp"), "-o", str(out / "fsdp.zip"),
                                                           "--force"], ["package", "--verify", str(out / "fsdp.zip")]):
            rc, _ = cli(args, out / f"{args[0]}-{len(table)}.log")
            print((out / f"{args[0]}-{len(table)}.log").read_text()[-1500:])
            table.append({"run": " ".join(args[:2]), "exit": rc})
    print()
    for row in table:
        print(json.dumps(row))
    (out / "summary.json").write_text(json.dumps(table, indent=2))


if __name__ == "__main__":
    main()
