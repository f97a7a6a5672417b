"""Where the fixed cost of a small optimizer step goes, and what an epoch end costs (GPU).

Builds the random-weight Qwen2.5-1.5B shape (bench/configs) on the GPU, loads it through
lora-cli's own path (load_model nf4 -> memory plan -> prepare_for_training -> LoRA -> compiled
layers -> Batcher -> TrainingLoop.bind: what `lora-cli train` does) and then:

  A. steps at --tokens tokens per optimizer step (grad accum 1): the real TrainingLoop._step,
     timed after a CUDA synchronize at each step end;
  B. the same step, instrumented: an exact copy of _step's operations in the same order, with a
     timer (and a torch.profiler range) around each phase; once without synchronizing (where the
     CPU spends its time, and where it waits for the GPU) and once with a synchronize after each
     phase (the GPU time of each phase);
  C. torch.profiler over a few instrumented steps: kernel launches per step, host syncs, GPU busy
     and idle time, the largest CPU-side costs, GPU time by kernel family, torch.compile's guards;
  E. an epoch end, broken down: the next epoch's packing plan, the first and a later evaluation
     (compile warm-up in eval mode), the checkpoint (state dicts, files), and a real 2-epoch
     TrainingLoop.run() whose per-step times show the step that holds the epoch end;
  D. a token sweep (about 4 examples per step, 2 x 2 examples, 2k, 4k, 8k tokens): the intercept
     of step time against tokens is the fixed cost per step (run after E: new row counts can hit
     dynamo's recompile limit, after which new shapes run uncompiled);
  F. padded batching: recompiles over 30 steps.

    python bench/profile_step.py --out /tmp/prof                     # on the GPU
    python bench/profile_step.py --tiny --out /tmp/prof-tiny         # CPU check of the script

Lengths: --lengths FILE (JSON {"train": [[length, prompt_len], ...], "val": [...]}, e.g. the
gpteacher split tokenized by SmolLM2's tokenizer under the alpaca template) with random ids, or
synthetic lengths (speed_data.synthetic). Writes profile.json, profile.txt and trace.json.gz.
"""

from __future__ import annotations

import argparse
import contextlib
import gzip
import json
import math
import os
import shutil
import statistics
import sys
import time
import types
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

LINES: list[str] = []


def say(text: str = "") -> None:
    print(text, flush=True)
    LINES.append(text)


def cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def median(xs):
    return statistics.median(xs) if xs else float("nan")


# ----------------------------------------------------------------------------------- setup
def make_examples(lengths_file: str | None, n_train: int, n_val: int, vocab: int, seed: int = 0):
    import numpy as np

    import speed_data

    if lengths_file:
        raw = json.loads(Path(lengths_file).read_text())
        train, val = raw["train"][:n_train], raw["val"][:n_val]
    else:
        syn = speed_data.synthetic(n_train + n_val, seed=1234)
        pairs = [[len(e["input_ids"]), e["prompt_len"]] for e in syn]
        train, val = pairs[:n_train], pairs[n_train:]
    rng = np.random.default_rng(seed)

    def build(pairs):
        ids = [rng.integers(0, min(vocab, 151643), size=n).tolist() for n, _ in pairs]
        labels = [[-100] * p + x[p:] for x, (n, p) in zip(ids, pairs)]
        return {"input_ids": ids, "labels": labels, "length": [n for n, _ in pairs],
                "n_targets": [sum(1 for t in lab[1:] if t != -100) for lab in labels]}

    return build(train), build(val)


def dataset(cols):
    from datasets import Dataset

    return Dataset.from_dict(cols)


class TimingReporter:
    """Stage/message sink that records the wall time of every progress update (a step end)."""

    def __init__(self):
        self.updates, self.messages, self.stages = [], [], []

    def stage(self, name, total=None, unit=""):
        rep = self

        class S:
            def update(self, advance=1, **fields):
                if name == "Training" and advance:
                    sync()
                    rep.updates.append(time.perf_counter())

        @contextlib.contextmanager
        def cm():
            t = time.perf_counter()
            yield S()
            rep.stages.append((name, time.perf_counter() - t))

        return cm()

    def message(self, text):
        self.messages.append(text)


def build_loop(args, model_dir: Path, train_cols, val_cols, tokens: int, out_dir: Path, reporter, model=None,
               rt=None, packed: bool = True, epochs: int = 1):
    """lora-cli's train_on up to TrainingLoop.bind (the model is built once and shared)."""
    from lora_cli.batching import Batcher
    from lora_cli.config import RunConfig
    from lora_cli.loop import TrainingLoop, make_optimizer, make_scheduler
    from lora_cli.modeling import attach_lora, compile_layers, load_model, prepare_for_training
    from lora_cli.outputs import OutputFolder
    from lora_cli.runtime import make_runtime, resolve_checkpointing

    over = {"model.name": str(model_dir), "train.max_tokens": tokens, "train.grad_accum": 1, "train.log_every": 10,
            "train.eval_at_start": False, "train.epochs": epochs, "train.keep_checkpoints": 2,
            "output.dir": str(out_dir), "train.batching": "packed" if packed else "padded"}
    if args.tiny:
        over["train.precision"] = "fp32"
    cfg = RunConfig().replace(over)
    timings = {}
    if rt is None:
        rt = make_runtime(cfg)
    out = OutputFolder(cfg.output.dir, cfg, rt.is_main)
    out.prepare(False, True)
    if model is None:
        t = time.perf_counter()
        model = load_model(model_dir, cfg.model.quantization, rt.precision, rt.device)
        sync()
        timings["load_s"] = time.perf_counter() - t
        resolve_checkpointing(rt, model_dir, cfg.train.memory_budget_gib, reporter)
        prepare_for_training(model, True, rt.upcast, rt.checkpoint_layers)
        model = attach_lora(model, cfg.lora)
        if rt.compile:
            compile_layers(model)
    pad = 151643 if not args.tiny else 2
    train = dataset(train_cols)
    val = dataset(val_cols) if val_cols else None
    batcher = Batcher(train, packed, cfg.train.batch_size, tokens, pad, cfg.train.seed, rt.pack_length)
    eval_tokens = max(tokens, cfg.train.eval_batch_size * cfg.data.max_length)
    val_b = Batcher(val, packed, cfg.train.eval_batch_size, eval_tokens, pad, cfg.train.seed, rt.pack_length) if val else None
    out.start(rt.decisions(), resuming=False)
    loop = TrainingLoop(cfg, rt, model, batcher, val_b, out, reporter)
    loop.bind(lambda p: make_optimizer(p, cfg.train, rt), lambda o: make_scheduler(o, cfg.train, loop.total_steps))
    loop._last_log = time.time()
    loop.module.train()
    return loop, model, rt, timings


FLAG = types.SimpleNamespace(set=False, signum=2)


def real_steps(loop, groups, n: int, start: int = 0) -> list[float]:
    """n real TrainingLoop._step calls, a synchronize after each: wall seconds per step."""
    out = []
    g = loop.group
    for i in range(start, start + n):
        grp = groups[(i * g) % len(groups):][:g] or groups[:g]
        t = time.perf_counter()
        loop._step(grp, FLAG)
        sync()
        out.append(time.perf_counter() - t)
    return out


PHASES = ["plan+n_targets", "collate", "to_device", "forward", "backward", "loss_accum", "stats_stack",
          "stats_tolist", "clip", "grad_norm_check", "optimizer", "scheduler", "zero_grad", "bookkeeping"]


def instrumented_step(loop, group, sync_each: bool):
    """TrainingLoop._step's operations (one process, grad accum as configured), phase by phase."""
    import torch

    rt, acc, st = loop.rt, loop.rt.accelerator, loop.state
    marks = [("start", time.perf_counter())]

    @contextlib.contextmanager
    def phase(name):
        with torch.profiler.record_function(f"ttq:{name}"):
            yield
            if sync_each:
                sync()
        marks.append((name, time.perf_counter()))

    with phase("plan+n_targets"):
        n_global = max(1, sum(loop.batcher.n_targets(mb) for mb in group))
        loss_sum = torch.zeros((), device=rt.device)
        real = 0
    for idx in group:
        with phase("collate"):
            mb = loop.batcher.collate(idx)
        with phase("to_device"):
            mb = mb.to(rt.device)
        with phase("forward"):
            loss, _ = loop.module(*mb.loss_args())
        with phase("backward"):
            acc.backward(loss * (1.0 / n_global))
        with phase("loss_accum"):
            loss_sum += loss.detach().float()
            real += mb.n_real
    with phase("stats_stack"):
        stats = torch.stack([loss_sum, torch.tensor(float(real), device=rt.device),
                             torch.tensor(float(FLAG.set), device=rt.device)])
    with phase("stats_tolist"):
        loss_total, real_total, _ = stats.tolist()
    with phase("clip"):
        grad_norm = loop._clip() if loop.t.max_grad_norm else None
    with phase("grad_norm_check"):
        ok = grad_norm is None or math.isfinite(float(grad_norm))
    with phase("optimizer"):
        lr = loop.scheduler.get_last_lr()[0]
        loop.optimizer.step()
    with phase("scheduler"):
        loop.scheduler.step()
    with phase("zero_grad"):
        loop.optimizer.zero_grad(set_to_none=True)
    with phase("bookkeeping"):
        st.step += 1
        st.step_in_epoch += 1
        st.tokens_seen += int(real_total)
        if st.step % loop.t.log_every == 0:
            loop._log_train(lr, grad_norm)
    per = {}
    for (_, a), (name, b) in zip(marks, marks[1:]):
        per[name] = per.get(name, 0.0) + (b - a)
    per["total"] = marks[-1][1] - marks[0][1]
    return per, ok


def phase_table(rows: list[dict], title: str) -> None:
    say(f"\n{title} (median over {len(rows)} steps, ms)")
    say(f"{'phase':<18} {'ms':>9}")
    for name in PHASES + ["total"]:
        vals = [r.get(name, 0.0) * 1e3 for r in rows]
        say(f"{name:<18} {median(vals):>9.2f}")


# ----------------------------------------------------------------------------------- profiler analysis
LAUNCH = ("cudaLaunchKernel", "cuLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernelEx", "cudaLaunchCooperativeKernel",
          "cudaGraphLaunch")
SYNCS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize", "cudaStreamWaitEvent")
FAMILIES = [("bnb dequant (nf4)", ("dequantize", "kdequant")),
            ("gemm / matmul", ("gemm", "gemv", "cutlass", "sm90_", "nvjet", "cublas", "xmma", "matmul")),
            ("attention (sdpa)", ("fmha", "flash", "attention", "efficient")),
            ("triton (compiled)", ("triton",)),
            ("optimizer (adam)", ("adam",)),
            ("reduce / norm", ("reduce", "norm")),
            ("copy / memcpy / memset", ("memcpy", "memset", "copy", "cat")),
            ("elementwise / other", ("",))]


def analyse_trace(trace: dict, n_steps: int) -> dict:
    """Per-step costs from a torch.profiler chrome trace (kineto): CPU ranges, launches, syncs, GPU timeline."""
    evs = [e for e in trace.get("traceEvents", []) if e.get("ph") == "X"]
    cat = lambda e: e.get("cat", "")  # noqa: E731
    steps = [e for e in evs if cat(e) == "user_annotation" and e["name"] == "ttq_step"]
    phases = [e for e in evs if cat(e) == "user_annotation" and e["name"].startswith("ttq:")]
    runtime = [e for e in evs if cat(e) in ("cuda_runtime", "cuda_driver")]
    gpu = [e for e in evs if cat(e) in ("kernel", "gpu_memcpy", "gpu_memset")]
    launches = [e for e in runtime if e["name"] in LAUNCH]
    syncs = [e for e in runtime if e["name"] in SYNCS]
    memcpy = [e for e in runtime if e["name"].startswith("cudaMemcpy")]
    n = max(n_steps, 1)
    res = {"steps": n_steps, "launches_per_step": len(launches) / n,
           "syncs_per_step": {k: sum(1 for e in syncs if e["name"] == k) / n for k in SYNCS},
           "sync_wait_ms_per_step": sum(e["dur"] for e in syncs) / 1e3 / n,
           "memcpy_calls_per_step": len(memcpy) / n, "memcpy_ms_per_step": sum(e["dur"] for e in memcpy) / 1e3 / n,
           "launch_cpu_ms_per_step": sum(e["dur"] for e in launches) / 1e3 / n}
    # which phase launched each GPU event: runtime call (by correlation id) -> enclosing ttq: range (same thread)
    by_corr = {e.get("args", {}).get("correlation"): e for e in runtime}
    ph_sorted = sorted(phases, key=lambda e: e["ts"])

    def phase_of(ev):  # the range on the same thread, else any range open at that time (autograd's thread)
        inside = [p for p in ph_sorted if p["ts"] <= ev["ts"] <= p["ts"] + p["dur"]]
        same = [p for p in inside if p.get("tid") == ev.get("tid")]
        return (same or inside)[0]["name"][4:] if (same or inside) else "(outside ttq ranges)"

    per_phase = {}
    for p in phases:
        d = per_phase.setdefault(p["name"][4:], {"cpu_ms": 0.0, "launches": 0, "syncs": 0, "gpu_ms": 0.0, "kernels": 0})
        d["cpu_ms"] += p["dur"] / 1e3
    for e in launches:
        per_phase.setdefault(phase_of(e), {"cpu_ms": 0.0, "launches": 0, "syncs": 0, "gpu_ms": 0.0, "kernels": 0})["launches"] += 1
    for e in syncs:
        per_phase.setdefault(phase_of(e), {"cpu_ms": 0.0, "launches": 0, "syncs": 0, "gpu_ms": 0.0, "kernels": 0})["syncs"] += 1
    for g in gpu:
        launch = by_corr.get(g.get("args", {}).get("correlation"))
        name = phase_of(launch) if launch else "(unattributed)"
        d = per_phase.setdefault(name, {"cpu_ms": 0.0, "launches": 0, "syncs": 0, "gpu_ms": 0.0, "kernels": 0})
        d["gpu_ms"] += g["dur"] / 1e3
        d["kernels"] += 1
    for d in per_phase.values():
        for k in d:
            d[k] = d[k] / n
    res["phases"] = per_phase
    # GPU busy and idle inside the step windows
    iv = sorted((g["ts"], g["ts"] + g["dur"]) for g in gpu)
    merged = []
    for a, b in iv:
        if merged and a <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], b)
        else:
            merged.append([a, b])
    window = sum(s["dur"] for s in steps)
    busy = 0.0
    gaps = []
    for s in steps:
        lo, hi = s["ts"], s["ts"] + s["dur"]
        inside = [(max(a, lo), min(b, hi)) for a, b in merged if b > lo and a < hi]
        busy += sum(b - a for a, b in inside)
        gaps += [b0 - a1 for (_, a1), (b0, _) in zip(inside, inside[1:])]
        if inside:
            gaps += [inside[0][0] - lo, hi - inside[-1][1]]
    res["window_ms_per_step"] = window / 1e3 / n
    res["gpu_busy_ms_per_step"] = busy / 1e3 / n
    res["gpu_idle_ms_per_step"] = max(0.0, window - busy) / 1e3 / n
    res["gpu_kernels_per_step"] = len(gpu) / n
    res["gaps_over_20us_per_step"] = sum(1 for g in gaps if g > 20) / n
    res["gaps_over_20us_ms_per_step"] = sum(g for g in gaps if g > 20) / 1e3 / n
    res["largest_gaps_ms"] = [round(g / 1e3, 3) for g in sorted(gaps, reverse=True)[:10]]
    fam = {}
    for g in gpu:
        low = g["name"].lower()
        for label, keys in FAMILIES:
            if any(k in low for k in keys):
                f = fam.setdefault(label, [0, 0.0])
                f[0] += 1
                f[1] += g["dur"]
                break
    res["gpu_families"] = {k: {"kernels_per_step": v[0] / n, "ms_per_step": v[1] / 1e3 / n}
                           for k, v in sorted(fam.items(), key=lambda kv: -kv[1][1])}
    top = {}
    for e in gpu:
        t = top.setdefault(e["name"][:90], [0, 0.0])
        t[0] += 1
        t[1] += e["dur"]
    res["top_kernels"] = [{"name": k, "per_step": v[0] / n, "ms_per_step": v[1] / 1e3 / n}
                          for k, v in sorted(top.items(), key=lambda kv: -kv[1][1])[:25]]
    # CPU ops: self time is not in the trace; total time of selected ops and torch.compile's wrappers
    wanted = ("aten::item", "aten::_local_scalar_dense", "aten::nonzero", "aten::index_select", "aten::pin_memory",
              "aten::_pin_memory", "aten::copy_", "aten::to", "aten::_to_copy", "Optimizer.step#AdamW.step",
              "aten::_fused_adamw_", "aten::_foreach_norm", "aten::linalg_vector_norm", "aten::_foreach_mul_",
              "aten::stack", "aten::tolist", "autograd::engine::evaluate_function: CompiledFunctionBackward")
    sel = {}
    for e in evs:
        if cat(e) in ("cpu_op", "user_annotation") and (e["name"] in wanted or any(
                s in e["name"] for s in ("Dynamo", "Torch-Compiled", "CompiledFunction", "Guard", "bitsandbytes::"))):
            s = sel.setdefault(e["name"][:80], [0, 0.0])
            s[0] += 1
            s[1] += e["dur"]
    res["selected_ops"] = [{"name": k, "calls_per_step": v[0] / n, "cpu_total_ms_per_step": v[1] / 1e3 / n}
                           for k, v in sorted(sel.items(), key=lambda kv: -kv[1][1])]
    return res


def print_profile(res: dict) -> None:  # noqa: C901
    say(f"\nC. torch.profiler over {res['steps']} instrumented steps (per step)")
    say(f"  step window {res['window_ms_per_step']:.2f} ms; GPU busy {res['gpu_busy_ms_per_step']:.2f} ms, "
        f"idle {res['gpu_idle_ms_per_step']:.2f} ms; {res['gpu_kernels_per_step']:.0f} GPU kernels/copies, "
        f"{res['launches_per_step']:.0f} launch calls ({res['launch_cpu_ms_per_step']:.2f} ms of CPU in them)")
    say(f"  host syncs: " + ", ".join(f"{k} {v:.1f}" for k, v in res["syncs_per_step"].items() if v)
        + f"; CPU blocked in syncs {res['sync_wait_ms_per_step']:.2f} ms; cudaMemcpy* calls "
        f"{res['memcpy_calls_per_step']:.1f} ({res['memcpy_ms_per_step']:.2f} ms)")
    say(f"  GPU gaps > 20 us: {res['gaps_over_20us_per_step']:.0f} per step, {res['gaps_over_20us_ms_per_step']:.2f} ms; "
        f"largest (ms): {res['largest_gaps_ms']}")
    say(f"\n  {'phase':<22} {'CPU ms':>8} {'GPU ms':>8} {'kernels':>8} {'launches':>9} {'syncs':>6}")
    for name in PHASES + sorted(k for k in res["phases"] if k not in PHASES):
        d = res["phases"].get(name)
        if d:
            say(f"  {name:<22} {d['cpu_ms']:>8.2f} {d['gpu_ms']:>8.2f} {d['kernels']:>8.0f} {d['launches']:>9.0f} "
                f"{d['syncs']:>6.1f}")
    say(f"\n  GPU time by kernel family (per step)")
    for k, v in res["gpu_families"].items():
        say(f"  {k:<26} {v['ms_per_step']:>8.2f} ms  {v['kernels_per_step']:>6.0f} kernels")
    say(f"\n  top GPU kernels (per step)")
    for r in res["top_kernels"][:15]:
        say(f"  {r['name']:<90} {r['per_step']:>6.0f} x {r['ms_per_step']:>8.2f} ms")
    say(f"\n  selected CPU ops and torch.compile wrappers (per step, inclusive time)")
    for r in res["selected_ops"]:
        say(f"  {r['name']:<60} {r['calls_per_step']:>7.1f} calls {r['cpu_total_ms_per_step']:>8.2f} ms")


# ----------------------------------------------------------------------------------- main
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=str(HERE / "configs" / "qwen2.5-1.5b-instruct.json"))
    ap.add_argument("--lengths", help="JSON of real [length, prompt_len] pairs (train/val)")
    ap.add_argument("--n-train", type=int, default=4000)
    ap.add_argument("--n-val", type=int, default=535)
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--warmup", type=int, default=12)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--profile-steps", type=int, default=5)
    ap.add_argument("--sweep", default="ex4,ex2x2,2048,4096,8192",
                    help="token budgets per step (ex4: one micro-batch of ~4 examples; ex2x2: 2 of ~2)")
    ap.add_argument("--sweep-steps", type=int, default=12)
    ap.add_argument("--epoch-end-examples", type=int, default=400, help="train examples of the 2-epoch run (E)")
    ap.add_argument("--skip", default="", help="comma list of parts to skip: A,B,C,D,E,F")
    ap.add_argument("--budget", type=float, default=480, help="seconds: skip later parts past this")
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--work", default="/tmp/ttq-profile")
    ap.add_argument("--out", default=None)
    ap.add_argument("--analyse-trace", metavar="TRACE.json[.gz]", help="only analyse a saved trace (with --profile-steps)")
    args = ap.parse_args()
    if args.analyse_trace:
        opener = gzip.open if args.analyse_trace.endswith(".gz") else open
        with opener(args.analyse_trace, "rt") as fh:
            print_profile(analyse_trace(json.load(fh), args.profile_steps))
        return
    t_begin = time.time()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    skip = set(args.skip.upper().split(","))
    if args.tiny:
        args.n_train, args.n_val = min(args.n_train, 120), min(args.n_val, 20)
        args.warmup, args.steps, args.profile_steps, args.sweep_steps = 2, 4, 2, 3
        args.epoch_end_examples = min(args.epoch_end_examples, 40)
        args.tokens = min(args.tokens, 512)
        args.sweep = "ex4,ex2x2,512,1024"
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    out = Path(args.out or work / "out")
    out.mkdir(parents=True, exist_ok=True)
    result: dict = {"args": vars(args)}

    import torch

    from lora_cli.modeling import quiet_libraries
    from train_speed import build_model

    quiet_libraries()
    import importlib

    vers = {m: getattr(importlib.import_module(m), "__version__", "?") for m in
            ("transformers", "peft", "accelerate", "bitsandbytes", "datasets")}
    result["stack"] = {"torch": torch.__version__, **vers}
    say(f"stack: {vers}")
    say(f"torch {torch.__version__}, cuda {torch.cuda.is_available()}"
        + (f" ({torch.cuda.get_device_name(0)})" if torch.cuda.is_available() else ""))
    t = time.perf_counter()
    model_dir = work / ("model-tiny" if args.tiny else "model")
    build_model(Path(args.config), model_dir, args.tiny)
    result["build_model_s"] = time.perf_counter() - t
    arch = json.loads((model_dir / "config.json").read_text())
    train_cols, val_cols = make_examples(args.lengths, args.n_train, args.n_val, arch["vocab_size"])
    lens = train_cols["length"]
    mean_len = sum(lens) / len(lens)
    result["data"] = {"train": len(lens), "val": len(val_cols["length"]), "mean_len": mean_len,
                      "tokens": sum(lens), "source": args.lengths or "synthetic"}
    say(f"model built in {result['build_model_s']:.1f} s; data {json.dumps(result['data'])}")

    reporter = TimingReporter()
    loop, model, rt, tm = build_loop(args, model_dir, train_cols, None, args.tokens, work / "adapters-a", reporter)
    result["load_s"] = tm.get("load_s")
    result["decisions"] = rt.decisions()
    result["memory_plan"] = reporter.messages
    say(f"loaded (lora-cli path) in {tm.get('load_s', 0):.1f} s; {rt.decisions()}; {reporter.messages}")
    groups = loop.plan(0)
    tok_per_step = sum(lens) / max(1, math.ceil(len(groups) / loop.group))
    say(f"{len(groups)} micro-batches in epoch 0 at {args.tokens} tokens: ~{tok_per_step:.0f} real tokens per step")

    # ---- A: real steps
    if "A" not in skip:
        t = time.perf_counter()
        warm = real_steps(loop, groups, args.warmup)
        result["warmup_s"] = time.perf_counter() - t
        result["warmup_steps_s"] = [round(x, 3) for x in warm]
        steps = real_steps(loop, groups, args.steps, start=args.warmup)
        real_tok = [sum(lens[i] for mb in groups[(k * loop.group) % len(groups):][:loop.group] for i in mb)
                    for k in range(args.warmup, args.warmup + args.steps)]
        result["A"] = {"median_step_s": median(steps), "mean_step_s": sum(steps) / len(steps),
                       "min_step_s": min(steps), "max_step_s": max(steps), "steps_s": [round(x, 4) for x in steps],
                       "real_tok_s": sum(real_tok) / sum(steps)}
        say(f"\nA. real TrainingLoop._step at {args.tokens} tokens: median {median(steps) * 1e3:.1f} ms, "
            f"min {min(steps) * 1e3:.1f}, max {max(steps) * 1e3:.1f}; {result['A']['real_tok_s']:,.0f} real tok/s "
            f"(warm-up {result['warmup_s']:.1f} s over {args.warmup} steps: {result['warmup_steps_s']})")

    # ---- B: instrumented
    k0 = args.warmup + args.steps
    if "B" not in skip:
        rows_nosync, rows_sync = [], []
        for i in range(args.steps):
            grp = groups[((k0 + i) * loop.group) % len(groups):][:loop.group] or groups[:loop.group]
            per, _ = instrumented_step(loop, grp, sync_each=False)
            sync()
            rows_nosync.append(per)
        for i in range(min(args.steps, 15)):
            grp = groups[((k0 + i) * loop.group) % len(groups):][:loop.group] or groups[:loop.group]
            per, _ = instrumented_step(loop, grp, sync_each=True)
            rows_sync.append(per)
        result["B"] = {"no_sync": {n: median([r.get(n, 0.0) for r in rows_nosync]) for n in PHASES + ["total"]},
                       "sync_each": {n: median([r.get(n, 0.0) for r in rows_sync]) for n in PHASES + ["total"]}}
        say(f"\nB. instrumented step at {args.tokens} tokens, median ms per phase")
        say(f"{'phase':<18} {'no sync':>9} {'sync each':>10}")
        for n in PHASES + ["total"]:
            say(f"{n:<18} {result['B']['no_sync'][n] * 1e3:>9.2f} {result['B']['sync_each'][n] * 1e3:>10.2f}")
        say("(no sync: CPU time per phase, a phase that waits for the GPU shows the wait; sync each: ~GPU time)")

    # ---- C: profiler
    if "C" not in skip and time.time() - t_begin < args.budget:
        from torch.profiler import ProfilerActivity, profile

        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda() else [])
        sync()
        with profile(activities=acts, record_shapes=False) as prof:
            for i in range(args.profile_steps):
                grp = groups[((k0 + 20 + i) * loop.group) % len(groups):][:loop.group] or groups[:loop.group]
                with torch.profiler.record_function("ttq_step"):
                    instrumented_step(loop, grp, sync_each=False)
                    sync()
        tmp = work / "trace.json"
        try:
            prof.export_chrome_trace(str(tmp))
            with open(tmp, "rb") as src_f, gzip.open(out / "trace.json.gz", "wb", compresslevel=6) as dst:
                shutil.copyfileobj(src_f, dst)
            say(f"  chrome trace: {out / 'trace.json.gz'} ({(out / 'trace.json.gz').stat().st_size / 1e6:.1f} MB)")
            res = analyse_trace(json.loads(tmp.read_text()), args.profile_steps)
            result["C"] = res
            print_profile(res)
        except Exception as exc:  # the analysis must not cost the rest of the run
            import traceback

            traceback.print_exc()
            result["C_error"] = repr(exc)
        try:
            ka = prof.key_averages()
            say("\n" + ka.table(sort_by="self_cpu_time_total", row_limit=25, max_name_column_width=60))
            if cuda():
                key = "self_device_time_total" if hasattr(next(iter(ka)), "self_device_time_total") else "self_cuda_time_total"
                say("\n" + ka.table(sort_by=key, row_limit=25, max_name_column_width=60))
        except Exception as exc:  # noqa: BLE001
            say(f"  (no key_averages table: {exc})")

    # ---- E: epoch end
    if "E" not in skip and time.time() - t_begin < args.budget:
        result["E"] = epoch_end(args, loop, model, rt, model_dir, train_cols, val_cols, work)

    # ---- D: token sweep (same model and compiled layers; the memory plan stays the one made for --tokens)
    if "D" not in skip and time.time() - t_begin < args.budget:
        from lora_cli.batching import Batcher

        sweep = []
        orig = loop.batcher
        for spec in args.sweep.split(","):
            # ex4: one micro-batch of ~4 examples; ex2x2: the recipe's 2 micro-batches of ~2 examples
            budget = round(4 * mean_len) if spec == "ex4" else round(2 * mean_len) if spec == "ex2x2" else int(spec)
            loop.group = 2 if spec == "ex2x2" else 1
            b = Batcher(orig.dataset, True, 2, budget, orig.pad_id, 42, min(rt.pack_length or budget, budget))
            b.lengths, b.targets = orig.lengths, orig.targets
            loop.batcher = b
            plan = b.plan(3)
            warm = real_steps(loop, plan, 3)
            st = real_steps(loop, plan, args.sweep_steps, start=3)
            toks = [sum(lens[i] for mb in plan[(k * loop.group) % len(plan):][:loop.group] for i in mb)
                    for k in range(3, 3 + args.sweep_steps)]
            ex = [sum(len(mb) for mb in plan[(k * loop.group) % len(plan):][:loop.group])
                  for k in range(3, 3 + args.sweep_steps)]
            row = {"spec": spec, "max_tokens": budget, "median_step_s": median(st), "mean_real_tokens": sum(toks) / len(toks),
                   "mean_examples": sum(ex) / len(ex), "real_tok_s": sum(toks) / sum(st),
                   "warmup_s": [round(x, 3) for x in warm]}
            sweep.append(row)
            say(f"D. {spec:>5} ({budget} tokens/step, ~{row['mean_examples']:.1f} examples, "
                f"{row['mean_real_tokens']:.0f} real tokens): median step {row['median_step_s'] * 1e3:.1f} ms, "
                f"{row['real_tok_s']:,.0f} real tok/s (first steps {row['warmup_s']})")
            if time.time() - t_begin > args.budget:
                break
        loop.batcher, loop.group = orig, 1
        sweep_fit = [r for r in sweep if r["spec"] != "ex2x2"]  # one micro-batch per step: the fit's model
        if len(sweep_fit) >= 2:  # least squares: step = fixed + tokens / rate
            xs = [r["mean_real_tokens"] for r in sweep_fit]
            ys = [r["median_step_s"] for r in sweep_fit]
            mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
            slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / max(sum((x - mx) ** 2 for x in xs), 1e-9)
            fixed = my - slope * mx
            result["D"] = {"sweep": sweep, "fixed_s": fixed, "marginal_tok_s": 1 / slope if slope > 0 else None}
            say(f"D. fit: step = {fixed * 1e3:.1f} ms + tokens / {1 / slope if slope > 0 else float('nan'):,.0f} tok/s "
                "(fixed cost per optimizer step = the intercept)")
        else:
            result["D"] = {"sweep": sweep}

    # ---- F: padded batching recompiles
    if "F" not in skip and time.time() - t_begin < args.budget:
        result["F"] = padded_check(args, loop, model, rt, model_dir, train_cols, work)

    result["peak_alloc_gib"] = torch.cuda.max_memory_allocated() / 2**30 if cuda() else None
    result["total_s"] = time.time() - t_begin
    say(f"\npeak allocated {result['peak_alloc_gib']} GiB; total {result['total_s']:.0f} s")
    (out / "profile.json").write_text(json.dumps(result, indent=1, default=str))
    (out / "profile.txt").write_text("\n".join(LINES) + "\n")


def dynamo_counters() -> dict:
    try:
        from torch._dynamo.utils import counters

        return {f"{k}.{kk}": vv for k, v in counters.items() for kk, vv in v.items()}
    except Exception:  # noqa: BLE001
        return {}


def counter_diff(a: dict, b: dict) -> dict:
    keys = ("stats.unique_graphs", "stats.calls_captured", "recompiles", "frames.total", "frames.ok")
    return {k: b.get(k, 0) - a.get(k, 0) for k in b if any(s in k for s in ("unique_graphs", "recompil", "frames", "graph_break"))
            and b.get(k, 0) != a.get(k, 0)} or {k: 0 for k in keys}


def epoch_end(args, loop, model, rt, model_dir, train_cols, val_cols, work) -> dict:
    """The pieces of an epoch end, then a real 2-epoch run whose step times show the epoch-end step."""
    from peft import get_peft_model_state_dict

    from lora_cli.batching import Batcher
    from lora_cli.checkpoint import save_checkpoint

    res = {}
    # E1: the packing plan of a 4000-example epoch (what _run_epoch computes at each epoch start)
    orig = loop.batcher
    for budget in (args.tokens, 16384):
        b = Batcher(orig.dataset, True, 2, budget, orig.pad_id, 42, min(rt.pack_length or budget, budget))
        b.lengths, b.targets = orig.lengths, orig.targets
        t = time.perf_counter()
        plan = b.plan(7)
        res[f"plan_{budget}_s"] = time.perf_counter() - t
        say(f"\nE1. packing plan of one epoch ({len(orig.lengths)} examples, {budget} tokens): "
            f"{res[f'plan_{budget}_s'] * 1e3:.0f} ms, {len(plan)} micro-batches")
    t = time.perf_counter()
    _ = loop.total_steps  # computed in __init__: _groups_in(e) for every epoch
    # E2: evaluations (the loop's own evaluate over the val split)
    val = dataset(val_cols)
    eval_tokens = max(args.tokens, loop.cfg.train.eval_batch_size * loop.cfg.data.max_length)
    loop.val_batcher = Batcher(val, True, 2, eval_tokens, orig.pad_id, 42, rt.pack_length)
    for name in ("first", "second"):
        c0 = dynamo_counters()
        sync()
        t = time.perf_counter()
        value = loop.evaluate()
        sync()
        res[f"eval_{name}_s"] = time.perf_counter() - t
        res[f"eval_{name}_dynamo"] = counter_diff(c0, dynamo_counters())
        say(f"E2. {name} evaluation ({len(val_cols['length'])} val examples, {eval_tokens} tokens per batch): "
            f"{res[f'eval_{name}_s']:.2f} s, loss {value:.4f}; dynamo {res[f'eval_{name}_dynamo']}")
    # after an evaluation, the next training step (back in train mode)
    st = real_steps(loop, loop.plan(0), 3, start=100)
    res["steps_after_eval_s"] = [round(x, 3) for x in st]
    say(f"E2. the 3 training steps after the evaluations: {res['steps_after_eval_s']} s")
    # E3: the checkpoint, piece by piece, then whole
    sync()
    t = time.perf_counter()
    adapter = get_peft_model_state_dict(loop.model)
    res["ckpt_adapter_state_s"] = time.perf_counter() - t
    t = time.perf_counter()
    optim = loop.optimizer.state_dict()
    res["ckpt_optimizer_state_s"] = time.perf_counter() - t
    t = time.perf_counter()
    save_checkpoint(loop.out.path, "probe", loop.state, adapter, optim, loop.scheduler, 2)
    res["ckpt_save_files_s"] = time.perf_counter() - t
    t = time.perf_counter()
    loop._checkpoint("epoch-probe")
    sync()
    res["ckpt_whole_s"] = time.perf_counter() - t
    size = sum(f.stat().st_size for f in (loop.out.path / "checkpoints" / "epoch-probe").iterdir())
    res["ckpt_bytes"] = size
    say(f"E3. checkpoint: adapter state dict {res['ckpt_adapter_state_s'] * 1e3:.0f} ms, optimizer state dict "
        f"{res['ckpt_optimizer_state_s'] * 1e3:.0f} ms, files {res['ckpt_save_files_s'] * 1e3:.0f} ms; "
        f"_checkpoint whole {res['ckpt_whole_s'] * 1e3:.0f} ms ({size / 1e6:.1f} MB)")
    # E4: a real 2-epoch run (same model, a fresh loop) on a small set, timing the loop's own pieces
    from lora_cli import loop as loop_mod

    n = args.epoch_end_examples
    small = {k: v[:n] for k, v in train_cols.items()}
    small_val = {k: v[:min(len(v), 64)] for k, v in val_cols.items()}
    rep = TimingReporter()
    loop2, _, _, _ = build_loop(args, model_dir, small, small_val, args.tokens, work / "adapters-e", rep, model=model,
                                rt=rt, epochs=2)
    spans: list = []
    originals = {}
    for meth in ("plan", "evaluate", "_checkpoint", "_end_epoch", "_log_train"):
        fn = getattr(loop_mod.TrainingLoop, meth)
        originals[meth] = fn

        def wrapped(self, *a, _fn=fn, _name=meth, **kw):
            sync()
            t0 = time.perf_counter()
            try:
                return _fn(self, *a, **kw)
            finally:
                sync()
                spans.append((_name, t0, time.perf_counter()))

        setattr(loop_mod.TrainingLoop, meth, wrapped)
    try:
        t = time.perf_counter()
        loop2.run()
        res["run_2_epochs_s"] = time.perf_counter() - t
    finally:
        for meth, fn in originals.items():
            setattr(loop_mod.TrainingLoop, meth, fn)
    ups = rep.updates
    durs = [b - a for a, b in zip(ups, ups[1:])]
    spe = loop2.steps_per_epoch
    res["steps_per_epoch"] = spe
    res["step_s"] = [round(x, 4) for x in durs]
    ordinary = median(durs)
    boundary = durs[spe - 1] if len(durs) >= spe else None  # update spe -> spe+1 holds epoch 1's end
    res["ordinary_step_s"] = ordinary
    res["epoch_end_step_s"] = boundary
    res["spans"] = [(n_, round(b - a, 4)) for n_, a, b in spans if b - a > 0.002]
    say(f"E4. real 2-epoch run ({n} examples, {spe} steps per epoch): ordinary step {ordinary * 1e3:.1f} ms, "
        f"the step after epoch 1's end {boundary if boundary is None else round(boundary * 1e3, 1)} ms")
    by = {}
    for n_, a, b in spans:
        by.setdefault(n_, []).append(round(b - a, 3))
    for k, v in by.items():
        say(f"E4.   {k}: {v[:8]}{' ...' if len(v) > 8 else ''} s")
    res["span_by_method"] = by
    return res


def padded_check(args, loop, model, rt, model_dir, train_cols, work) -> dict:
    """--batching padded with compiled layers: recompiles and step times over 30 steps."""
    from lora_cli.batching import Batcher

    say("\nF. padded batching (2 examples per micro-batch, grad accum 1), compiled layers")
    res = {}
    orig = loop.batcher
    b = Batcher(orig.dataset, False, 2, args.tokens, orig.pad_id, 42, 0)
    b.lengths, b.targets = orig.lengths, orig.targets
    loop.batcher = b
    plan = b.plan(5)
    c0 = dynamo_counters()
    durs = []
    try:
        durs = real_steps(loop, plan, 30 if not args.tiny else 4)
    except Exception as exc:  # noqa: BLE001
        res["error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
    loop.batcher = orig
    res["dynamo"] = counter_diff(c0, dynamo_counters())
    res["step_s"] = [round(x, 3) for x in durs]
    say(f"F. step times {res['step_s']}; dynamo {res['dynamo']}; {res.get('error', '')}")
    return res


if __name__ == "__main__":
    main()
