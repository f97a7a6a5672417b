"""Resume and checkpoints under CUDA graphs (the GPU default): exact resume, the same checkpoint contents.

On the tests' tiny random model (tests/tiny_models.py), bf16 on the GPU, three runs of lora-cli's
training path (lora_cli.train.recipe.train) on the same records:

  graphs    uninterrupted, --compile graphs (what auto picks on one GPU for a long run)
  resumed   the same, crashed right after step --crash-at (between two --save-every checkpoints),
            then resumed from the latest checkpoint (--resume)
  eager     uninterrupted, --compile off

Prints: the largest adapter weight difference and whether every metrics row (but the wall-clock
field) matches, resumed vs graphs; whether every checkpoint holds the same files, tensor names and
shapes, graphs vs eager; the largest relative gap of the two loss curves, graphs vs eager.

    python bench/resume_check.py                    # on a GPU
    python bench/resume_check.py --device cpu       # a CPU check of the harness (compile off throughout)
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE.parent / "tests"))


class Crash(Exception):
    """Stands in for a process dying between two checkpoints."""


def config(work: Path, name: str, device: str, compile_mode: str, steps: int, save_every: int):
    from helpers import tiny_config

    return tiny_config(work / "model", work / "train.jsonl", work / "val.jsonl", work / name, epochs=2,
                       lr=5e-3, max_tokens=128, log_every=1, keep_checkpoints=100, save_every_steps=save_every,
                       max_steps=steps, device=device, precision="bf16" if device == "cuda" else "fp32",
                       compile=compile_mode).replace({"model.quantization": "none"})


def metrics(folder: Path) -> list[dict]:
    rows = [json.loads(x) for x in (folder / "metrics.jsonl").read_text().splitlines()]
    for row in rows:
        row.pop("tokens_per_s", None)  # wall-clock
    return rows


def tensors(folder: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(folder / "adapter_model.safetensors"))


def contents(folder: Path) -> dict:
    """Every checkpoint's files, and each adapter tensor's name and shape."""
    out = {}
    for ck in sorted((folder / "checkpoints").iterdir()):
        files = sorted(p.name for p in ck.iterdir())
        shapes = {k: tuple(v.shape) for k, v in tensors(ck).items()} if (ck / "adapter_model.safetensors").is_file() else {}
        out[ck.name] = (files, shapes)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--save-every", type=int, default=8)
    ap.add_argument("--crash-at", type=int, default=21)
    ap.add_argument("--work", default="/tmp/lora-cli-resume-check")
    ap.add_argument("--compile", default="", help="compile mode of the compiled runs (default: graphs on cuda, "
                                                  "off on cpu; graphs on the cpu compiles without replaying graphs)")
    args = ap.parse_args()

    from helpers import make_records, write_jsonl
    from tiny_models import build_model, build_tokenizer

    from lora_cli import faults
    from lora_cli.model.load import quiet_libraries
    from lora_cli.train.recipe import train

    quiet_libraries()
    work = Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    (work / "model").mkdir(parents=True)
    build_model(work / "model", len(build_tokenizer(work / "model")))
    write_jsonl(work / "train.jsonl", make_records(400, seed=1))
    write_jsonl(work / "val.jsonl", make_records(40, seed=2))
    graphs = args.compile or ("graphs" if args.device == "cuda" else "off")
    run = lambda name, mode: config(work, name, args.device, mode, args.steps, args.save_every)  # noqa: E731

    train(run("graphs", graphs))
    seen = {"steps": 0}

    def crash_at(_):
        seen["steps"] += 1
        if seen["steps"] == args.crash_at:
            raise Crash()

    try:
        with faults.inject("train:step", crash_at):
            train(run("resumed", graphs))
    except Crash:
        pass
    resumed = train(run("resumed", graphs), resume=True)
    train(run("eager", "off"))

    a, b = tensors(work / "graphs"), tensors(work / "resumed")
    weight_diff = max((a[k].float() - b[k].float()).abs().max().item() for k in a) if a.keys() == b.keys() else None
    la = [r["loss"] for r in metrics(work / "graphs") if r["type"] == "train"]
    le = [r["loss"] for r in metrics(work / "eager") if r["type"] == "train"]
    gap = max(abs(x - y) / abs(y) for x, y in zip(la, le) if y)
    report = {"device": args.device, "compile": graphs, "resumed_from": resumed.resumed_from,
              "resume_max_weight_diff": weight_diff,
              "resume_same_metrics": metrics(work / "graphs") == metrics(work / "resumed"),
              "same_checkpoint_contents_as_eager": contents(work / "graphs") == contents(work / "eager"),
              "checkpoints": list(contents(work / "graphs")),
              "loss_curve_max_relative_gap_vs_eager": gap, "final_loss": [la[-1], le[-1]]}
    (work / "report.json").write_text(json.dumps(report, indent=1))
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
