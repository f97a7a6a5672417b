"""Time to quality: the reference recipe vs lora-cli's default (and candidate settings), whole commands.

Each run is one whole command, started as a subprocess and timed from outside with the wall
clock: Python start, imports, tokenization, model loading, compilation, the evaluations the
command does, training and its per-epoch checkpoints are all inside the time.

  recipe     HF Trainer with the seed's settings (DESIGN.md "The seed recipe"): 4-bit NF4 (or
             unquantized), fp16 mixed precision on a GPU (--recipe-precision), batch 2, grad accum 2,
             lr 2e-4, linear schedule, adamw_torch, 3 epochs, max length 512, the alpaca-seed template,
             labels on the prompt, no eos, a padding collator, prepare_model_for_kbit_training, adapter
             saved each epoch (save_strategy="epoch"). A callback records the wall time of every epoch
             end and checkpoint.
  default    `lora-cli train` with its defaults (plus --val, --keep-checkpoints EPOCHS so that every
             epoch's checkpoint survives, and a fresh cache folder so that tokenizing is paid).
  NAME       each --candidate NAME="FLAGS": `lora-cli train` with those flags added.

Every run's per-epoch adapters are then scored in ONE separate pass (its time is charged to no
run): lora-cli eval's response loss (lora_cli.infer.evaluation.response_loss: response tokens + the
closing eos, under the alpaca template by default, --score-template own for each adapter's own) on
the same val records, plus the base model's, and at the end the stop rate of each final adapter
(greedy, --stop-prompts val prompts, --max-new-tokens). The scorer loads the base once per
quantization and swaps the LoRA tensors in.

Time to the recipe's final val loss (the target): the wall time, from the command's start, at
which the first epoch checkpoint whose val loss is at or below the target was on disk ("first
epoch at or below": no interpolation; the primary figure). Also given: linear interpolation
between the epoch points, with (0 s, base loss) as the point before epoch 1.

    python bench/time_to_quality.py --data ../shared/data/gpteacher_codegen.jsonl --out /tmp/ttq
    python bench/time_to_quality.py --data D --candidate "4k=--max-tokens 4096 --grad-accum 1" --quantization nf4,none
    python bench/time_to_quality.py --model-shape qwen1.5b --data D      # wall time only (random weights)
    python bench/time_to_quality.py --tiny --data D                       # CPU check of the harness

Writes under --out: results.jsonl (one row per run, plus the base), table.md, curves.png
(val loss against wall time; needs matplotlib), logs.txt (the tail of every command's output).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(HERE))

QWEN_CONFIG = HERE / "configs" / "qwen2.5-1.5b-instruct.json"


# ----------------------------------------------------------------------------------- data
def split_data(source: Path, work: Path, n_train: int, n_val: int, seed: int) -> tuple[Path, Path, dict]:
    """Shuffle the non-blank lines with a fixed seed: the first n_val are val, the next n_train train."""
    lines = [x for x in source.read_text(encoding="utf-8").splitlines() if x.strip()]
    if n_train + n_val > len(lines):
        raise SystemExit(f"{source} has {len(lines)} records; --n-train {n_train} + --n-val {n_val} is more")
    random.Random(seed).shuffle(lines)
    val, train = lines[:n_val], lines[n_val:n_val + n_train]
    work.mkdir(parents=True, exist_ok=True)
    tf, vf = work / "train.jsonl", work / "val.jsonl"
    tf.write_text("\n".join(train) + "\n", encoding="utf-8")
    vf.write_text("\n".join(val) + "\n", encoding="utf-8")
    sha = lambda p: hashlib.sha256(p.read_bytes()).hexdigest()[:16]  # noqa: E731
    return tf, vf, {"source": str(source), "source_sha256": sha(source), "seed": seed, "train": len(train),
                    "val": len(val), "train_sha256": sha(tf), "val_sha256": sha(vf)}


# ----------------------------------------------------------------------------------- models
def build_tiny(work: Path) -> Path:
    """The tests' tiny random Qwen2 (2 layers, hidden 64) with its BPE tokenizer: a CPU check."""
    sys.path.insert(0, str(REPO / "tests"))
    from tiny_models import build_model, build_tokenizer

    folder = work / "tiny-model"
    if not (folder / "config.json").is_file():
        folder.mkdir(parents=True, exist_ok=True)
        tok = build_tokenizer(folder)
        build_model(folder, len(tok))
    return folder


def bpe_tokenizer(texts: list[str], folder: Path):
    """A byte-level BPE trained on the data itself (when no real tokenizer is at hand)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=32000, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    fast.save_pretrained(folder)


def build_qwen_shape(work: Path, tokenizer: str, data_files: list[Path], tiny: bool = False) -> Path:
    """Random-init Qwen2.5-1.5B architecture (PLATFORM.md), built on the GPU, with a real tokenizer
    (tiny: the same config shrunk to 2 layers of 64, a CPU check)."""
    from train_speed import build_model

    folder = work / ("qwen-shape-tiny" if tiny else "qwen1.5b-random")
    build_model(QWEN_CONFIG, folder, tiny=tiny)
    if not (folder / "tokenizer_config.json").is_file():
        if tokenizer == "bpe":
            texts = []
            for f in data_files:
                for line in f.read_text(encoding="utf-8").splitlines():
                    r = json.loads(line)
                    texts.append(f"{r['instruction']}\n{r.get('input') or ''}\n{r['output']}")
            bpe_tokenizer(texts, folder)
        else:
            src = Path(tokenizer) if tokenizer != "embedded" else _embedded_path()
            for f in src.iterdir():
                if f.name.startswith(("tokenizer", "special_tokens", "vocab", "merges", "chat_template")):
                    shutil.copy2(f, folder / f.name)
    return folder


def _embedded_path() -> Path:
    from lora_cli.model.resolve import resolve_model

    return resolve_model("smollm2-135m").path


# ----------------------------------------------------------------------------------- running
def run_env(args, run_dir: Path) -> dict:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": os.pathsep.join(
               [str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])}
    if not args.warm_compile_cache:  # every command compiles from scratch, as a user's first run does
        env["TORCHINDUCTOR_CACHE_DIR"] = str(run_dir / "inductor-cache")
        env["TRITON_CACHE_DIR"] = str(run_dir / "triton-cache")
    return env


def timed(cmd: list[str], run_dir: Path, env: dict, timeout: int) -> dict:
    run_dir.mkdir(parents=True, exist_ok=True)
    log = run_dir / "log.txt"
    print(f"$ {shlex.join(cmd)}", flush=True)
    t0 = time.time()
    with open(log, "w") as fh:
        try:
            rc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, timeout=timeout, cwd=REPO).returncode
        except subprocess.TimeoutExpired:
            rc = "timeout"
    t1 = time.time()
    print(f"  exit {rc}, {t1 - t0:.1f} s", flush=True)
    return {"rc": rc, "t_start": t0, "t_end": t1, "wall_s": round(t1 - t0, 2), "command": shlex.join(cmd)}


def run_recipe(args, model: str, quant: str, train_f: Path, val_f: Path, run_dir: Path) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", "recipe", "--model-dir", model,
           "--train", str(train_f), "--val", str(val_f), "--run-dir", str(run_dir), "--quantization", quant,
           "--epochs", str(args.epochs), "--recipe-precision", args.recipe_precision]
    if args.recipe_max_steps:
        cmd += ["--recipe-max-steps", str(args.recipe_max_steps)]
    if args.recipe_eval:
        cmd += ["--recipe-eval"]
    res = timed(cmd, run_dir, run_env(args, run_dir), args.timeout)
    info_f = run_dir / "recipe_times.json"
    info = json.loads(info_f.read_text()) if info_f.is_file() else {}
    epochs = []
    for s in info.get("saves", []):
        epochs.append({"epoch": s["epoch"], "step": s["step"], "t": round(s["time"] - res["t_start"], 2),
                       "adapter": s["path"]})
    res.update(kind="recipe", steps=info.get("global_step"), epochs=epochs, precision=info.get("precision"),
               train_loss=info.get("losses", [])[-1:] or None, nonfinite_losses=info.get("nonfinite_losses"),
               tokens=info.get("tokens"), e2e_tok_s=round(info["tokens"] / res["wall_s"], 1) if info.get("tokens") else None,
               t_first_step=round(info["step_times"][0] - res["t_start"], 2) if info.get("step_times") else None)
    if info.get("step_times") and args.recipe_max_steps:  # extrapolate a shortened recipe to its full length
        st = info["step_times"]
        warm = st[5:] if len(st) >= 8 else st  # after the first steps' warm-up
        mean = (warm[-1] - warm[0]) / max(len(warm) - 1, 1)
        full = info["steps_full"]
        first = st[0] - res["t_start"]  # the first step's end: loading and everything before it
        tail = res["t_end"] - st[-1]  # the save after the last step, and the process's exit
        save = info.get("save_seconds") or [0.0]
        res["extrapolated"] = {"steps_run": len(st), "steps_full": full, "mean_step_s": round(mean, 4),
                               "t_first_step": round(first, 2), "tail_s": round(tail, 2),
                               "wall_full_s": round(first + (full - 1) * mean + tail
                                                    + (args.epochs - 1) * sum(save) / len(save), 1)}
    return res


def run_loracli(args, name: str, flags: list[str], model: str, quant: str, train_f: Path, val_f: Path,
                run_dir: Path) -> dict:
    out = run_dir / "adapter"
    cmd = [sys.executable, "-m", "lora_cli", "train", "--model", model, "--train", str(train_f),
           "--output", str(out), "--epochs", str(args.epochs), "--keep-checkpoints", str(args.epochs),
           "--quantization", quant, "--cache-dir", str(run_dir / "cache"), "--overwrite"]
    if not args.no_val_in_train:
        cmd += ["--val", str(val_f)]
    res = timed(cmd + flags, run_dir, run_env(args, run_dir), args.timeout)
    epochs = []
    for e in range(1, args.epochs + 1):
        ck = out / "checkpoints" / f"epoch-{e}"
        if (ck / "trainer_state.json").is_file():
            state = json.loads((ck / "trainer_state.json").read_text())
            # written last inside the checkpoint (then renamed into place): the epoch's adapter is on disk
            t = (ck / "trainer_state.json").stat().st_mtime - res["t_start"]
            epochs.append({"epoch": e, "step": state["step"], "t": round(t, 2),
                           "adapter": str(ck / "adapter_model.safetensors")})
    metrics = out / "metrics.jsonl"
    rows = [json.loads(x) for x in metrics.read_text().splitlines()] if metrics.is_file() else []
    train_rows = [r for r in rows if r.get("type") == "train"]
    bar = [r["tokens_per_s"] for r in train_rows if r.get("tokens_per_s")]
    tokens = train_rows[-1]["tokens"] if train_rows else None
    res.update(kind="lora-cli", flags=shlex.join(flags), steps=train_rows[-1]["step"] if train_rows else None,
               epochs=epochs, cli_eval_losses=[r["eval_loss"] for r in rows if r.get("type") == "eval"],
               tokens=tokens, bar_tok_s_median=round(sorted(bar)[len(bar) // 2], 1) if bar else None,
               e2e_tok_s=round(tokens / res["wall_s"], 1) if tokens else None,
               train_loss=[train_rows[-1]["loss"]] if train_rows else None)
    cfg = out / "run_config.yaml"
    if cfg.is_file():
        import yaml

        run = (yaml.safe_load(cfg.read_text()) or {}).get("run") or {}
        res["decisions"] = {k: run.get(k) for k in ("device", "precision", "batching", "max_tokens", "pack_length",
                                                    "checkpoint_layers", "compile", "micro_batches_per_step")}
    log = (run_dir / "log.txt").read_text(errors="replace")
    res["stages"] = [ln.strip() for ln in log.replace("\r", "\n").splitlines() if ": done in" in ln][:40]
    return res


# ----------------------------------------------------------------------------------- workers
# ----------------------------------------------------------------------------------- analysis
def time_to_target(points: list[tuple[float, float]], base: float | None, target: float) -> tuple:
    """(first epoch at or below, interpolated) wall seconds to reach `target`; points = (t, loss) per epoch."""
    first = next((t for t, loss in points if loss <= target + 1e-12), None)
    interp = None
    prev = (0.0, base) if base is not None else None
    for t, loss in points:
        if loss <= target + 1e-12:
            if prev is None or prev[1] is None or prev[1] <= loss:
                interp = t
            else:
                interp = prev[0] + (t - prev[0]) * (prev[1] - target) / (prev[1] - loss)
            break
        prev = (t, loss)
    return first, interp


def analyse(runs: list[dict], scores: dict | None, epochs: int) -> list[dict]:
    by = {}
    for a in (scores or {}).get("adapters", []):
        by[(a["quant"], a["run"], a["epoch"])] = a
    out = []
    for r in runs:
        q = r["quant"]
        row = {k: r.get(k) for k in ("run", "quant", "kind", "flags", "rc", "wall_s", "steps", "tokens", "precision", "t_first_step",
                                     "bar_tok_s_median", "e2e_tok_s", "cli_eval_losses", "extrapolated", "decisions",
                                     "stages", "command", "train_loss", "nonfinite_losses")}
        row["epochs"] = []
        for e in r.get("epochs", []):
            s = by.get((q, r["run"], e["epoch_index"]))
            row["epochs"].append({**{k: e[k] for k in ("epoch_index", "step", "t")},
                                  "val_loss": s["loss"] if s else None, "val_loss_text": s["loss_text"] if s else None})
            if s and "stop_rate" in s:
                row["stop_rate"], row["mean_new_tokens"] = s["stop_rate"], s["mean_new_tokens"]
        base = (scores or {}).get("base", {}).get(q)
        row["base_loss"] = base["loss"] if base else None
        out.append(row)
    for q in {r["quant"] for r in out}:
        ref = next((r for r in out if r["quant"] == q and r["kind"] == "recipe"), None)
        if not ref or len(ref["epochs"]) < epochs or ref["epochs"][-1]["val_loss"] is None:
            continue
        target, t_ref = ref["epochs"][-1]["val_loss"], ref["epochs"][-1]["t"]
        for r in out:
            if r["quant"] != q:
                continue
            pts = [(e["t"], e["val_loss"]) for e in r["epochs"] if e["val_loss"] is not None]
            first, interp = time_to_target(pts, r["base_loss"], target)
            r.update(target_loss=target, t_to_target=first, t_to_target_interp=interp,
                     speedup=(t_ref / first) if first else None,
                     speedup_interp=(t_ref / interp) if interp else None,
                     wall_ratio=(ref["wall_s"] / r["wall_s"]) if r.get("wall_s") else None)
    return out


def fmt(x, spec=".4f", none="-"):
    return none if x is None else format(x, spec)


def table(rows: list[dict], shape_only: bool) -> str:
    if shape_only:
        lines = ["| run | quant | steps | wall s (whole command) | recipe wall / this | bar tok/s | e2e tok/s | "
                 "epoch ends at s |", "|---|---|---|---|---|---|---|---|"]
        ref = {r["quant"]: r for r in rows if r["kind"] == "recipe"}
        for r in rows:
            wall = r["wall_s"]
            ex = r.get("extrapolated")
            shown = f"{wall:.1f}" + (f" (ran {ex['steps_run']} steps; 3 epochs extrapolated: {ex['wall_full_s']:.0f})"
                                     if ex else "")
            rw = ref.get(r["quant"])
            rw_s = ((rw.get("extrapolated") or {}).get("wall_full_s") or rw["wall_s"]) if rw else None  # no recipe run: -
            ratio = f"{rw_s / wall:.1f}x" if rw_s and wall and r["kind"] != "recipe" else "-"
            ends = ", ".join(f"{e['t']:.0f}" for e in r["epochs"]) or "-"
            lines.append(f"| {r['run']} | {r['quant']} | {r['steps'] or '-'} | {shown} | {ratio} | "
                         f"{fmt(r.get('bar_tok_s_median'), ',.0f')} | {fmt(r.get('e2e_tok_s'), ',.0f')} | {ends} |")
        return "\n".join(lines)
    lines = ["| run | quant | steps | wall s | val loss: base -> epochs (at s) | stop rate | to recipe's final loss: "
             "first epoch at/below (interp.) | speedup vs recipe | bar / e2e tok/s |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        curve = " -> ".join(f"{fmt(e['val_loss'])} ({e['t']:.0f})" for e in r["epochs"])
        reach = "-" if r.get("target_loss") is None else (
            f"{fmt(r['t_to_target'], '.1f', 'not reached')} s ({fmt(r['t_to_target_interp'], '.1f', '-')})")
        speed = "-" if not r.get("speedup") else f"{r['speedup']:.1f}x ({fmt(r.get('speedup_interp'), '.1f')}x)"
        tok = f"{fmt(r.get('bar_tok_s_median'), ',.0f')} / {fmt(r.get('e2e_tok_s'), ',.0f')}"
        lines.append(f"| {r['run']} | {r['quant']} | {r['steps'] or '-'} | {fmt(r['wall_s'], '.1f')} | "
                     f"{fmt(r['base_loss'])} -> {curve} | {fmt(r.get('stop_rate'), '.1%')} | {reach} | {speed} | {tok} |")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("(matplotlib not installed: no curves.png)")
        return False
    quants = sorted({r["quant"] for r in rows})
    fig, axes = plt.subplots(1, len(quants), figsize=(6.5 * len(quants), 4.5), squeeze=False)
    for ax, q in zip(axes[0], quants):
        for r in (r for r in rows if r["quant"] == q):
            pts = [(e["t"], e["val_loss"]) for e in r["epochs"] if e["val_loss"] is not None]
            if not pts:
                continue
            xs, ys = [0.0] + [p[0] for p in pts], [r["base_loss"]] + [p[1] for p in pts]
            ax.plot(xs, ys, marker="o", label=f"{r['run']} ({r['wall_s']:.0f} s)")
            if r.get("target_loss") is not None and r["kind"] == "recipe":
                ax.axhline(r["target_loss"], ls="--", c="grey", lw=0.8)
        ax.set_xscale("symlog", linthresh=10)
        ax.set_xlabel("wall time from the command's start (s)")
        ax.set_ylabel("val response loss (response + eos)")
        ax.set_title(f"{q}: val loss per epoch vs wall time")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return True


# ----------------------------------------------------------------------------------- main
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "gpteacher_codegen.jsonl"))
    ap.add_argument("--n-train", type=int, default=4000)
    ap.add_argument("--n-val", type=int, default=535)
    ap.add_argument("--split-seed", type=int, default=0)
    ap.add_argument("--model", default="smollm2-135m", help="smollm2-135m (embedded), a model folder, or 'tiny'")
    ap.add_argument("--model-shape", choices=("qwen1.5b",), help="random-init Qwen2.5-1.5B shape: wall time only")
    ap.add_argument("--tokenizer", default="embedded",
                    help="with --model-shape: 'embedded' (SmolLM2's), a folder, or 'bpe' (trained on the data)")
    ap.add_argument("--quantization", default="nf4", help="nf4, none, or both as 'nf4,none'")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--runs", default="recipe,default", help="recipe and/or default, in this order")
    ap.add_argument("--candidate", action="append", default=[], metavar='NAME="FLAGS"',
                    help="a lora-cli train variant: NAME=flags (repeatable)")
    ap.add_argument("--recipe-precision", default="fp16", choices=("fp16", "bf16"))
    ap.add_argument("--recipe-max-steps", type=int, default=0,
                    help="stop the recipe after N steps and extrapolate its wall time (for the 1.5B shape)")
    ap.add_argument("--recipe-eval", action="store_true", help="the recipe also evaluates on val each epoch")
    ap.add_argument("--no-val-in-train", action="store_true", help="lora-cli runs without --val")
    ap.add_argument("--score-template", default="alpaca", choices=("alpaca", "own"))
    ap.add_argument("--no-score", action="store_true")
    ap.add_argument("--stop-prompts", type=int, default=128)
    ap.add_argument("--max-new-tokens", type=int, default=256)
    ap.add_argument("--gen-batch-size", type=int, default=64)
    ap.add_argument("--score-precision", default="auto")
    ap.add_argument("--warm-compile-cache", action="store_true",
                    help="share torch.compile's caches between runs (default: each run compiles cold)")
    ap.add_argument("--timeout", type=int, default=3600, help="seconds per command")
    ap.add_argument("--tiny", action="store_true", help="CPU check: tiny model, few records, 1 epoch")
    ap.add_argument("--work", default="/tmp/ttq-work")
    ap.add_argument("--out", default=None, help="results folder (default: WORK/results)")
    # workers
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--model-dir", help=argparse.SUPPRESS)
    ap.add_argument("--train", help=argparse.SUPPRESS)
    ap.add_argument("--val", help=argparse.SUPPRESS)
    ap.add_argument("--run-dir", help=argparse.SUPPRESS)
    ap.add_argument("--job", help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        from ttq_workers import recipe_worker, score_worker

        return {"recipe": recipe_worker, "score": score_worker}[args.worker](args)

    if args.tiny:
        given = set(a.split("=")[0] for a in sys.argv[1:])
        for flag, value in (("--n-train", 24), ("--n-val", 8), ("--epochs", 1), ("--stop-prompts", 4),
                            ("--max-new-tokens", 8), ("--model", "tiny"), ("--gen-batch-size", 4),
                            ("--recipe-max-steps", 3 if args.model_shape else 0)):
            if flag not in given:
                setattr(args, flag[2:].replace("-", "_"), value)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    work = Path(args.work).resolve()
    out = Path(args.out).resolve() if args.out else work / "results"
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    train_f, val_f, split = split_data(Path(args.data), work, args.n_train, args.n_val, args.split_seed)
    print(f"split: {json.dumps(split)}", flush=True)
    shape_only = args.model_shape is not None
    if shape_only:
        model = str(build_qwen_shape(work, args.tokenizer, [train_f, val_f], tiny=args.tiny))
        args.no_score = True
    elif args.model == "tiny":
        model = str(build_tiny(work))
    else:
        # the embedded model is converted from its GGUF once per machine, before any timed command
        from lora_cli.model.resolve import resolve_model

        resolved = resolve_model(args.model)
        model = str(resolved.path) if resolved.source != "embedded" else args.model
    model_dir = str(_embedded_path()) if model == "smollm2-135m" else model
    print(f"model: {model} ({model_dir}); ready after {time.time() - t0:.1f} s", flush=True)

    quants = [q.strip() for q in args.quantization.split(",") if q.strip()]
    names = [r.strip() for r in args.runs.split(",") if r.strip()]
    cands = []
    for c in args.candidate:
        name, _, flags = c.partition("=")
        cands.append((name.strip(), shlex.split(flags)))
    runs = []
    for q in quants:
        for name in names:
            run_dir = work / "runs" / f"{q}-{name}"
            shutil.rmtree(run_dir, ignore_errors=True)
            if name == "recipe":
                r = run_recipe(args, model_dir, q, train_f, val_f, run_dir)
            elif name == "default":
                r = run_loracli(args, "default", [], model, q, train_f, val_f, run_dir)
            else:
                raise SystemExit(f"unknown run {name!r}: recipe or default (others via --candidate)")
            runs.append({**r, "run": name, "quant": q})
        for name, flags in cands:
            run_dir = work / "runs" / f"{q}-{name}"
            shutil.rmtree(run_dir, ignore_errors=True)
            runs.append({**run_loracli(args, name, flags, model, q, train_f, val_f, run_dir), "run": name, "quant": q})
    for r in runs:  # epoch index 1..E (the Trainer's own epoch value can be fractional)
        for i, e in enumerate(r.get("epochs", []), 1):
            e["epoch_index"] = i

    scores = None
    if not args.no_score:
        job = {"val": str(val_f), "model": model, "precision": args.score_precision, "stop_prompts": args.stop_prompts,
               "max_new_tokens": args.max_new_tokens, "gen_batch_size": args.gen_batch_size, "by_quant": {}}
        for r in runs:
            for e in r.get("epochs", []):
                if not Path(e["adapter"]).is_file():
                    continue
                own = "alpaca-seed" if r["kind"] == "recipe" else "alpaca"
                job["by_quant"].setdefault(r["quant"], []).append({
                    "run": r["run"], "quant": r["quant"], "epoch": e["epoch_index"], "adapter": e["adapter"],
                    "template": own if args.score_template == "own" else "alpaca",
                    "final": e["epoch_index"] == len(r["epochs"])})
        for r in runs:  # the scorer reads adapter_config.json beside the first adapter it loads
            for e in r.get("epochs", []):
                folder = Path(e["adapter"]).parent
                if not (folder / "adapter_config.json").is_file():
                    src = work / "runs" / f"{r['quant']}-{r['run']}" / "adapter" / "adapter_config.json"
                    if src.is_file():
                        shutil.copy2(src, folder / "adapter_config.json")
        if job["by_quant"]:
            (work / "score_job.json").write_text(json.dumps(job, indent=1))
            score_dir = work / "score"
            res = timed([sys.executable, str(Path(__file__).resolve()), "--worker", "score", "--job",
                         str(work / "score_job.json"), "--result", str(work / "scores.json")], score_dir,
                        run_env(args, score_dir), args.timeout)
            if (work / "scores.json").is_file():
                scores = json.loads((work / "scores.json").read_text())
                scores["wall_s"] = res["wall_s"]
            else:
                print((score_dir / "log.txt").read_text()[-3000:])

    rows = analyse(runs, scores, args.epochs)
    meta = {"type": "meta", "split": split, "model": model, "epochs": args.epochs, "argv": sys.argv[1:],
            "score_seconds": (scores or {}).get("wall_s"), "score_template": args.score_template,
            "base": (scores or {}).get("base"), "stack": stack(), "total_s": round(time.time() - t0, 1)}
    with open(out / "results.jsonl", "w") as fh:
        fh.write(json.dumps(meta) + "\n")
        for r in rows:
            fh.write(json.dumps({"type": "run", **r}) + "\n")
    text = table(rows, shape_only)
    (out / "table.md").write_text(text + "\n")
    with open(out / "logs.txt", "w") as fh:
        for r in runs + ([{"run": "score", "quant": "-"}] if scores else []):
            name = f"{r['quant']}-{r['run']}" if r["run"] != "score" else "../score"
            log = work / "runs" / name / "log.txt"
            if log.is_file():
                fh.write(f"===== {r['run']} ({r['quant']}): {r.get('command', '')}\n")
                fh.write(log.read_text(errors="replace").replace("\r", "\n")[-6000:] + "\n")
    if not shape_only:
        plot(rows, out / "curves.png")
    print()
    print(text)
    print(f"\n(total {time.time() - t0:.0f} s; scoring {fmt((scores or {}).get('wall_s'), '.0f')} s, charged to no run; "
          f"results in {out})")


def stack() -> dict:
    import importlib

    out = {"python": sys.version.split()[0]}
    for m in ("torch", "transformers", "peft", "accelerate", "bitsandbytes", "datasets"):
        try:
            out[m] = importlib.import_module(m).__version__
        except Exception as exc:  # noqa: BLE001
            out[m] = f"missing ({type(exc).__name__})"
    try:
        import torch

        out["gpu"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    except Exception:  # noqa: BLE001
        pass
    return out


if __name__ == "__main__":
    main()
