"""Does the adapter learn, and does it learn to stop? The reference recipe vs lora-cli's defaults.

Splits ../shared/data/self_instruct_seed.jsonl into train/val with a fixed seed (the splits
go to the work folder, never into the repo), trains the embedded model twice with the same
number of optimizer steps, and evaluates the base model and each adapter on the val split
with `lora-cli eval`: response loss (response tokens + closing eos, the same targets for
every model), the loss without the eos, and the stop rate (greedy answers that emit eos
within --max-new-tokens). Every command it runs is printed as it runs; results go to
<work>/results.json and a table.

    python bench/quality.py                        # 105 steps each (the recipe's 3 epochs at 2 x 2 examples;
                                                   # lora-cli's CPU micro-batches average ~1.6, so ~2.4 passes), nf4, fp32
    python bench/quality.py --steps 35 --work .bench/q35

Reference recipe behaviour: labels on the prompt, no eos, empty Input block kept (alpaca-seed).
Its fp16 mixed precision does not apply on a CPU (lora-cli refuses fp16 there), so both runs
use fp32 compute on the 4-bit NF4 base.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shlex
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DATA = REPO.parent / "shared" / "data" / "self_instruct_seed.jsonl"
RECIPES = {
    "reference": {"template": "alpaca-seed", "flags": ["--train-on-prompt", "--no-eos", "--template", "alpaca-seed"]},
    "defaults": {"template": "alpaca", "flags": []},
    # follow-ups (--runs): why the defaults stop where they stop
    "defaults-chat": {"template": "chat", "flags": ["--template", "chat"]},
    "defaults-bf": {"template": "alpaca", "flags": [], "quantization": "none"},
    "defaults-2x": {"template": "alpaca", "flags": [], "steps_factor": 2},
}


def split(source: Path, work: Path, val_size: int, seed: int) -> tuple[Path, Path]:
    """Shuffle the lines with a fixed seed; the first `val_size` are val, the rest train."""
    lines = [x for x in source.read_text(encoding="utf-8").splitlines() if x.strip()]
    random.Random(seed).shuffle(lines)
    work.mkdir(parents=True, exist_ok=True)
    val, train = work / "val.jsonl", work / "train.jsonl"
    val.write_text("\n".join(lines[:val_size]) + "\n", encoding="utf-8")
    train.write_text("\n".join(lines[val_size:]) + "\n", encoding="utf-8")
    return train, val


def run(args: list[str], log: list[str], capture: bool = False) -> str:
    """Run `lora-cli ARGS` (as `python -m lora_cli`), print and record the command."""
    shown = "lora-cli " + shlex.join(args)
    print(f"\n$ {shown}", flush=True)
    log.append(shown)
    t0 = time.time()
    res = subprocess.run([sys.executable, "-m", "lora_cli", *args], cwd=REPO, text=True,
                         stdout=subprocess.PIPE if capture else None)
    if res.returncode != 0:
        raise SystemExit(f"command failed ({res.returncode}): {shown}")
    print(f"  ({time.time() - t0:.0f} s)", flush=True)
    return res.stdout or ""


def finished(adapter: Path, steps: int) -> bool:
    import yaml

    cfg = adapter / "run_config.yaml"
    if not (adapter / "adapter_model.safetensors").is_file() or not cfg.is_file():
        return False
    saved = yaml.safe_load(cfg.read_text())
    return bool(saved.get("run", {}).get("finished")) and saved["train"]["max_steps"] == steps


def train(name: str, train_f: Path, work: Path, opts, log: list[str]) -> Path:
    out, recipe = work / name, RECIPES[name]
    steps = opts.steps * recipe.get("steps_factor", 1)
    if finished(out, steps) and not opts.fresh:
        print(f"\n(reusing the finished adapter {out}; --fresh to train again)")
        log.append(f"# reused {out}")
        return out
    run(["train", "--model", "smollm2-135m", "--train", str(train_f), "--output", str(out), "--max-steps",
         str(steps), "--precision", "fp32", "--quantization", recipe.get("quantization", opts.quantization),
         "--log-every", "5", "--overwrite", *recipe["flags"]], log)
    return out


def evaluate(adapter: Path, val: Path, opts, log: list[str], base: bool) -> dict:
    args = ["eval", "--adapter", str(adapter), "--data", str(val), "--max-new-tokens", str(opts.max_new_tokens),
            "--batch-size", str(opts.batch_size), "--precision", "fp32", "--json"]
    return json.loads(run(args + (["--base-only"] if base else []), log, capture=True))


def stop_within(result: dict, cap: int) -> float:
    """Stop rate under a smaller cap, from the same greedy answers (eos at new token <= cap)."""
    return sum(a["stopped"] and a["new_tokens"] < cap for a in result["answers"]) / result["examples"]


def table(results: dict, cap: int) -> str:
    small = cap // 2
    head = (f"| run | template | val response loss (before -> after) | without eos | stop rate within {cap} "
            f"(before -> after) | within {small} |\n|---|---|---|---|---|---|")
    rows = []
    for name, r in results.items():
        b, a = r["before"], r["after"]
        rows.append(f"| {name} | {RECIPES[name]['template']} | {b['loss']:.4f} -> {a['loss']:.4f} | "
                    f"{b['loss_text']:.4f} -> {a['loss_text']:.4f} | "
                    f"{b['stop_rate']:.1%} -> {a['stop_rate']:.1%} ({a['stopped']}/{a['examples']}) | "
                    f"{stop_within(b, small):.1%} -> {stop_within(a, small):.1%} |")
    return "\n".join([head, *rows])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=105,
                   help="optimizer steps for each run (105: what the recipe's 3 epochs take on 140 records at 2 x 2)")
    p.add_argument("--val-size", type=int, default=35)
    p.add_argument("--seed", type=int, default=0, help="seed of the train/val split")
    p.add_argument("--max-new-tokens", type=int, default=256,
                   help="generation cap (the stop rate within half of it is shown too)")
    p.add_argument("--batch-size", type=int, default=12, help="prompts generated together")
    p.add_argument("--quantization", default="nf4", choices=("nf4", "none"))
    p.add_argument("--work", type=Path, default=REPO / ".bench" / "quality")
    p.add_argument("--runs", default="reference,defaults")
    p.add_argument("--fresh", action="store_true", help="train again even if a finished adapter is there")
    opts = p.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    work = opts.work.resolve()
    train_f, val = split(DATA, work, opts.val_size, opts.seed)
    print(f"split {DATA} (seed {opts.seed}): {train_f} + {val} ({opts.val_size} records)")
    log: list[str] = []
    results: dict = {}
    saved = work / "results.json"
    if saved.is_file():  # runs measured before are kept; a run named again is measured again
        old = json.loads(saved.read_text())
        log, results = old["commands"], old["results"]
    for name in opts.runs.split(","):
        adapter = train(name, train_f, work, opts, log)
        results[name] = {"before": evaluate(adapter, val, opts, log, base=True),
                         "after": evaluate(adapter, val, opts, log, base=False)}
        saved.write_text(json.dumps({"commands": log, "results": results}, indent=2))
    print("\n" + table(results, opts.max_new_tokens))
    print(f"\nAll numbers and every answer: {work / 'results.json'}")


if __name__ == "__main__":
    main()
