"""What --repetition-penalty and --no-repeat-ngram-size do to one adapter's answers (and not to its loss).

Evaluates the same adapter on the same val records once per setting with `lora-cli eval --json`,
greedy, and prints stop rate, response loss and answer lengths per setting. Every command is
printed as it runs; results go to <work>/repetition.json.

    python bench/repetition.py --adapter .bench/i13/defaults --data .bench/i13/val.jsonl
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SETTINGS = {
    "greedy": [],
    "repetition-penalty 1.1": ["--repetition-penalty", "1.1"],
    "repetition-penalty 1.3": ["--repetition-penalty", "1.3"],
    "no-repeat-ngram-size 3": ["--no-repeat-ngram-size", "3"],
    "no-repeat-ngram-size 5": ["--no-repeat-ngram-size", "5"],
    "penalty 1.1 + ngram 5": ["--repetition-penalty", "1.1", "--no-repeat-ngram-size", "5"],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--adapter", required=True)
    parser.add_argument("--data", required=True)
    parser.add_argument("--max-new-tokens", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=36)
    parser.add_argument("--settings", default=",".join(SETTINGS), help="comma list of: " + ", ".join(SETTINGS))
    parser.add_argument("--work", default=str(REPO / ".bench" / "repetition"))
    opts = parser.parse_args()
    work = Path(opts.work)
    work.mkdir(parents=True, exist_ok=True)
    results = {}
    for name in opts.settings.split(","):
        args = ["eval", "--adapter", opts.adapter, "--data", opts.data, "--max-new-tokens", str(opts.max_new_tokens),
                "--batch-size", str(opts.batch_size), "--json", *SETTINGS[name]]
        print(f"\n$ lora-cli {shlex.join(args)}", flush=True)
        t0 = time.time()
        res = subprocess.run([sys.executable, "-m", "lora_cli", *args], cwd=REPO, text=True, stdout=subprocess.PIPE)
        if res.returncode != 0:
            raise SystemExit(f"failed: {name}")
        result = json.loads(res.stdout)
        lengths = [a["new_tokens"] for a in result["answers"]]
        results[name] = {"stopped": result["stopped"], "examples": result["examples"], "loss": result["loss"],
                         "median_new_tokens": statistics.median(lengths), "seconds": round(time.time() - t0),
                         "answers": result["answers"]}
        print(f"  {result['stopped']}/{result['examples']} stop, loss {result['loss']:.4f}, "
              f"median {statistics.median(lengths)} new tokens ({time.time() - t0:.0f} s)", flush=True)
        (work / "repetition.json").write_text(json.dumps(results, indent=2))
    print("\n| setting | stop rate | response loss | median new tokens |\n|---|---|---|---|")
    for name, r in results.items():
        print(f"| {name} | {r['stopped']}/{r['examples']} | {r['loss']:.4f} | {r['median_new_tokens']} |")


if __name__ == "__main__":
    main()
