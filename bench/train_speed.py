"""Training throughput: the reference recipe vs lora-cli's training path, in one command.

Builds a random-weight model of a given architecture from its config (default: the
Qwen2.5-1.5B-Instruct shape, bench/configs/), on the GPU, so no weights or hub access are
needed; then runs each variant in its own process on the same examples and prints a table:
real (non-pad) tokens/s, padded tokens/s, peak allocated memory, MFU, first/last loss.

    python bench/train_speed.py                          # reference + lora-cli defaults
    python bench/train_speed.py --variants ref,default,gc-all,upcast --steps 20
    python bench/train_speed.py --data ../shared/data/gpteacher_codegen.jsonl

MFU counts 4N FLOP per real token for the frozen Linear weights (N, lm_head included) plus
6 per LoRA parameter, plus causal attention 6*D*layers*sum(L^2) over examples, at 790 TFLOP/s
(bf16 dense, measured on an H200); recomputation and padding are not counted. The same
definition as ../shared/bench-anchor.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

PEAK_FLOPS = 790e12
# name: lora-cli config overrides (dotted keys); "ref" is the reference recipe through HF Trainer
VARIANTS = {
    "ref": None,
    "default": {},
    "upcast": {"model.upcast": "fp32"},
    "unfused": {"train.fused_loss": False},
    "gc-all": {"train.gradient_checkpointing": "on"},
    "gc-off": {"train.gradient_checkpointing": "off"},
    "row2048": {"train.pack_length": 2048},
    "gc-off-6k": {"train.gradient_checkpointing": "off", "train.max_tokens": 6144},
    "gc-off-8k": {"train.gradient_checkpointing": "off", "train.max_tokens": 8192},
    "row1024": {"train.pack_length": 1024},
    "row4096": {"train.pack_length": 4096},
    "32k": {"train.max_tokens": 32768},
    "8k": {"train.max_tokens": 8192},
    "compile": {"train.compile": "on"},
    "eager": {"train.compile": "off"},  # the baseline of "same result": no compile, no graphs
    "layer-graphs": {"bench.compile_scope": "layers"},  # CUDA graphs one decoder layer at a time (the old default)
    "capture-compiled": {"train.compile": "graphs"},  # the decoder captured whole, its layers compiled inside
    "read-each-step": {"bench.read_each_step": True},  # each step's loss read at once (the GPU waits for the host)
    "compiled-read-each-step": {"train.compile": "graphs", "bench.read_each_step": True},
    "nf4-kept": {"model.dequantize": "off"},  # the base stays 4-bit (a model whose bf16 copy does not fit)
    "dora": {"lora.use_dora": True},
    "no-compile": {"train.compile": "off"},
    "flex": {"model.attn_implementation": "flex_attention", "train.pack_length": 16384},
    "lean-8g": {"train.memory_budget_gib": 8, "train.max_tokens": 8192},
    "all-labels": {"data.train_on_prompt": True},
    "dp": {"lora.dropout": 0.0},  # data-parallel scaling runs: name@N runs on N GPUs
    "dp-accum4": {"lora.dropout": 0.0, "train.grad_accum": 4},  # 1 GPU with the global batch of dp@2
    "fsdp": {"lora.dropout": 0.0},  # fsdp@N: the 4-bit base sharded over N GPUs (QLoRA + FSDP, lora_cli/train/sharding.py)
    # time-to-quality work (issue 16): the default is now the recipe's 4 examples per step in one micro-batch
    "2k": {"train.max_tokens": 2048, "train.grad_accum": 1},
    "4k": {"train.max_tokens": 4096, "train.grad_accum": 1},
    "16k": {"train.max_tokens": 16384, "train.grad_accum": 1},
    "old-default": {"train.max_tokens": 16384, "train.grad_accum": 2, "train.pack_length": 1024},
    "graphs": {"train.compile": "graphs"},
    "graphs-4k": {"train.compile": "graphs", "train.max_tokens": 4096, "train.grad_accum": 1},
    "nf4-kept": {"model.dequantize": "off"},
    "padded": {"train.batching": "padded"},
    "seed-like": {"train.batching": "padded", "train.precision": "fp16", "model.upcast": "fp32",
                  "train.gradient_checkpointing": "on", "train.fused_loss": False},
}


def build_model(config_path: Path, out: Path, tiny: bool) -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    if (out / "config.json").is_file():
        return
    raw = json.loads(config_path.read_text())
    if tiny:  # CPU dry run of the harness
        raw.update({"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
                    "num_key_value_heads": 2, "max_window_layers": 2})
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(raw))
    config = AutoConfig.from_pretrained(str(out))
    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.set_default_dtype(torch.bfloat16)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config)
    torch.set_default_dtype(torch.float32)
    model.config.dtype = torch.bfloat16
    model.save_pretrained(str(out))


def mfu(r: dict, arch: dict, data_stats: dict) -> float:
    d, layers, inter, vocab = arch["hidden_size"], arch["num_hidden_layers"], arch["intermediate_size"], arch["vocab_size"]
    heads, kv = arch["num_attention_heads"], arch["num_key_value_heads"]
    head_dim = d // heads
    per_layer = d * d + 2 * d * kv * head_dim + d * d + 3 * d * inter  # q, k, v, o, gate, up, down
    n = layers * per_layer + vocab * d
    n_lora = layers * 16 * (d + d) + layers * 16 * (d + kv * head_dim)
    flops = (4 * n + 6 * n_lora) * r["real_tokens"] + 6 * d * layers * data_stats["sum_sq_per_token"] * r["real_tokens"]
    return flops / r["seconds"] / (PEAK_FLOPS * r.get("gpus", 1)) if r["seconds"] else 0.0


def table(results: list[dict], arch: dict, data_stats: dict) -> str:
    head = f"{'variant':<12} {'real tok/s':>11} {'padded tok/s':>13} {'peak GiB':>9} {'MFU':>7} {'step s':>7} " \
           f"{'first loss':>10} {'last loss':>10} {'x ref':>6}"
    lines = [head, "-" * len(head)]
    ref = next((r["real_tok_s"] for r in results if r["variant"] == "ref" and "error" not in r), None)
    for r in results:
        if "error" in r:
            lines.append(f"{r['variant']:<12} FAILED: {r['error'][:90]}")
            continue
        fl = "-" if r["first_loss"] is None else f"{r['first_loss']:.4f}"
        ll = "-" if r["last_loss"] is None else f"{r['last_loss']:.4f}"
        x = f"{r['real_tok_s'] / ref:.1f}" if ref else "-"
        lines.append(f"{r['variant']:<12} {r['real_tok_s']:>11,.0f} {r['padded_tok_s']:>13,.0f} "
                     f"{r['peak_alloc_gib']:>9.2f} {100 * mfu(r, arch, data_stats):>6.1f}% {r['median_step_s']:>7.3f} "
                     f"{fl:>10} {ll:>10} {x:>6}")
    return "\n".join(lines)


def combine_ranks(lines: list[dict], spec: str) -> dict:
    """One row for a multi-process run: tokens summed over ranks, time of the slowest, losses of rank 0."""
    errors = [r for r in lines if "error" in r]
    if errors:
        return {**errors[0], "variant": spec}
    first = min(lines, key=lambda r: r.get("rank", 0))
    seconds = max(r["seconds"] for r in lines)
    real, padded = sum(r["real_tokens"] for r in lines), sum(r["padded_tokens"] for r in lines)
    return {**first, "variant": spec, "gpus": len(lines), "seconds": seconds, "real_tokens": real,
            "padded_tokens": padded, "real_tok_s": real / seconds if seconds else 0.0,
            "padded_tok_s": padded / seconds if seconds else 0.0,
            "peak_alloc_gib": max(r["peak_alloc_gib"] for r in lines)}


def worker(args) -> None:
    import torch
    from speed_workers import run_loracli, run_reference

    examples = torch.load(args.data_file, weights_only=True) if args.data_file.endswith(".pt") else \
        json.load(open(args.data_file))
    t0 = time.time()
    try:
        if args.worker == "ref":
            res = run_reference(args.model_dir, examples, args.warmup, args.steps)
        else:
            res = run_loracli(args.model_dir, examples, args.warmup, args.steps, VARIANTS[args.worker])
    except Exception as exc:  # a variant failing must not hide the others' numbers
        import traceback

        traceback.print_exc()
        res = {"error": f"{type(exc).__name__}: {exc}"}
    res.update(variant=args.worker, wall_s=round(time.time() - t0, 1), rank=int(os.environ.get("RANK", "0")))
    with open(args.out, "a") as fh:
        fh.write(json.dumps(res) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=str(HERE / "configs" / "qwen2.5-1.5b-instruct.json"))
    ap.add_argument("--data", default="synthetic", help="'synthetic' or a JSONL file")
    ap.add_argument("--n", type=int, default=6000, help="synthetic examples")
    ap.add_argument("--variants", default="ref,default")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--ref-steps", type=int, default=0, help="timed steps of the reference recipe (0: --steps)")
    ap.add_argument("--compare", default="", help="A,B: the largest per-step relative loss difference of B from A")
    ap.add_argument("--profile", default="", help="a variant to profile (torch.profiler, 4 steps inside its "
                                                  "warm-up, which must be >= 6): tables in WORK/profile-VARIANT.txt")
    ap.add_argument("--host-clock", action="store_true",
                    help="time steps at the host's pace (no added sync per step; a run's own syncs only), as a "
                         "user's run goes: needed to see what reading a step's loss late gains")
    ap.add_argument("--timeout", type=int, default=150, help="seconds per variant")
    ap.add_argument("--budget", type=int, default=0, help="start no variant after this many seconds (0: no limit)")
    ap.add_argument("--work", default="/tmp/lora-cli-bench")
    ap.add_argument("--out", default=None, help="results JSONL (default: WORK/results.jsonl)")
    ap.add_argument("--tiny", action="store_true", help="2-layer model: a CPU dry run of the harness")
    ap.add_argument("--model", help="an existing model folder (or 'smollm2-135m') instead of a random one; "
                                    "with --data FILE its own tokenizer is used")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--model-dir", help=argparse.SUPPRESS)
    ap.add_argument("--data-file", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(args)

    import speed_data

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    out = Path(args.out or work / "results.jsonl")
    model_dir = work / ("model-tiny" if args.tiny else "model")
    t0 = time.time()
    if args.model:
        from lora_cli.model.resolve import resolve_model

        model_dir = resolve_model(args.model).path
    else:
        build_model(Path(args.config), model_dir, args.tiny)
    print(f"model ready in {time.time() - t0:.1f} s: {model_dir}", flush=True)
    if args.data == "synthetic":
        examples = speed_data.synthetic(args.n)
    elif args.model:
        examples = speed_data.from_jsonl_with_tokenizer(args.data, str(model_dir))
    else:
        examples = speed_data.from_jsonl(args.data)
    data_file = work / "examples.json"
    data_file.write_text(json.dumps(examples))
    data_stats = speed_data.stats(examples)
    print("data:", json.dumps(data_stats), flush=True)
    arch = json.loads((model_dir / "config.json").read_text())
    names = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in names if v.partition("@")[0] not in VARIANTS]
    if unknown:
        sys.exit(f"unknown variant(s) {unknown}; known: {', '.join(VARIANTS)}")
    results = []
    for spec in names:
        name, _, gpus = spec.partition("@")
        gpus = int(gpus or 1)
        t = time.time()
        if args.budget and t - t0 > args.budget:
            results.append({"variant": spec, "error": "skipped: time budget spent"})
            continue
        steps = args.ref_steps if name == "ref" and args.ref_steps else args.steps
        worker_args = [__file__, "--worker", name, "--model-dir", str(model_dir), "--data-file", str(data_file),
                       "--warmup", str(args.warmup), "--steps", str(steps), "--out", str(out)]
        env = {**os.environ, "PYTHONUNBUFFERED": "1", **({"BENCH_HOST_CLOCK": "1"} if args.host_clock else {})}
        if spec == args.profile:
            env["BENCH_PROFILE"] = str(work / f"profile-{name}.txt")
        from lora_cli.train.sharding import LAUNCH_FLAGS

        mode = LAUNCH_FLAGS if name == "fsdp" else ["--multi_gpu"]
        launch = [sys.executable] if gpus == 1 else [sys.executable, "-m", "accelerate.commands.launch", *mode,
                                                      "--num_processes", str(gpus), "--mixed_precision", "no",
                                                      "--dynamo_backend", "no"]
        before = out.read_text().count("\n") if out.exists() else 0
        try:
            subprocess.run(launch + worker_args, timeout=args.timeout, check=False, env=env)
        except subprocess.TimeoutExpired:
            pass
        lines = [json.loads(x) for x in out.read_text().splitlines()[before:]] if out.exists() else []
        res = combine_ranks(lines, spec) if lines else {"variant": spec, "error": f"no result (timeout {args.timeout}s?)"}
        results.append(res)
        summary = "error" if "error" in res else f"{res['real_tok_s']:,.0f} real tok/s, {res['peak_alloc_gib']:.2f} GiB"
        print(f"[{spec}] {summary} ({time.time() - t:.0f} s)", flush=True)
    print()
    print(table(results, arch, data_stats))
    if args.compare:
        print(compare(results, *args.compare.split(",")))


def compare(results: list[dict], a: str, b: str) -> str:
    """How far B's per-step loss curve is from A's (same examples, same order, same seed)."""
    by = {r["variant"]: r for r in results if "error" not in r}
    if a not in by or b not in by:
        return f"compare {a},{b}: a run is missing"
    la, lb = by[a]["losses"], by[b]["losses"]
    n = min(len(la), len(lb))
    rel = [abs(y - x) / abs(x) for x, y in zip(la[:n], lb[:n]) if x]
    worst = max(range(len(rel)), key=rel.__getitem__) if rel else None
    if worst is None:
        return f"compare {a},{b}: no losses"
    return (f"loss curves {b} vs {a} over {n} steps: largest relative difference {100 * rel[worst]:.3f}% at step "
            f"{worst + 1} ({la[worst]:.4f} vs {lb[worst]:.4f}); mean {100 * sum(rel) / len(rel):.3f}%; "
            f"last {la[n - 1]:.4f} vs {lb[n - 1]:.4f}; first step {by[a]['step_seconds'][0]:.1f} s vs "
            f"{by[b]['step_seconds'][0]:.1f} s")


if __name__ == "__main__":
    main()
