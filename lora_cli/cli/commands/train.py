"""`lora-cli train`: reads the cache (tokenizing first if needed), trains, writes ./adapters.

Without --train (and no data.train in --config) it trains on the current dataset, the one
`lora-cli tokenize` recorded last (data/current.py), with its data and model settings.

Every setting of the run config is a flag (options.config_flags); the ones below are about
where the run starts and how many processes run it.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Optional

import typer

from lora_cli.cli.options import ConfigOpt, SetOpt, config_flags

if TYPE_CHECKING:
    from lora_cli.adapter.record import LoopSummary
    from lora_cli.train.recipe import TrainResult

Opt = typer.Option


@config_flags("*")
def train(
    settings: dict,
    resume: Annotated[bool, Opt("--resume", help="Continue from the latest checkpoint in the output folder; with a "
                                                 "larger --epochs or --max-steps, also a finished run.")] = False,
    resume_from: Annotated[Optional[Path], Opt("--resume-from", help="Continue from this checkpoint folder.")] = None,
    overwrite: Annotated[bool, Opt("--overwrite", help="Replace the run in the output folder (another run, or this "
                                                       "one to train it again from scratch).")] = False,
    gpus: Annotated[Optional[int], Opt("--gpus", help="Run on N GPUs through accelerate's launcher.")] = None,
    fsdp: Annotated[bool, Opt("--fsdp", help="With --gpus: shard the 4-bit base over the GPUs (FSDP) instead of "
                                             "copying it to each, for models too large for one GPU.")] = False,
    config: ConfigOpt = None,
    set_: SetOpt = None,
) -> None:
    """Train a LoRA adapter (QLoRA by default) and write it with its config, metrics and parameter summary.

    Without --train: the current dataset (what lora-cli tokenize tokenized last), with its model and
    data settings; flags and --config still override them.
    """
    from lora_cli.data.current import resolve
    from lora_cli.data.precheck import refuse_invalid_records
    from lora_cli.train.launch import launch_if_asked, resume_command
    from lora_cli.train.resume import refuse_early

    started = time.time()
    work = resolve("train", settings, str(config) if config else None, set_)  # no --train: the current dataset
    start = str(resume_from) if resume_from else resume
    refuse_early(work.cfg, start, overwrite)  # before torch: a refusal costs no model load
    refuse_invalid_records(work.cfg)
    code = launch_if_asked(gpus, fsdp)
    if code is not None:
        raise typer.Exit(code)
    from lora_cli.cli.render import RichReporter
    from lora_cli.errors import TrainingInterrupted
    from lora_cli.train.recipe import train as run_training

    try:
        result = run_training(work.cfg, resume=start, overwrite=overwrite, reporter=RichReporter(),
                              current=work.current)
    except TrainingInterrupted as exc:
        exc.resume_command = resume_command(sys.argv[1:])
        raise
    if result.is_main:  # one summary for the run, not one per process
        _summary(result, time.time() - started)
        rose = loss_rose(result.summary, work.cfg.train.lr)
        if rose:
            from lora_cli.cli.render import err

            err.print(rose, markup=False)


DIVERGED = 1.5  # a final loss this many times the first: training diverged, not noise


def loss_rose(s: LoopSummary, lr: float) -> str | None:
    """A warning when the run ended far above where it began (eval loss, else train loss), else None."""
    pairs = [("eval", s.eval_losses[0], s.eval_losses[-1])] if len(s.eval_losses) >= 2 else []
    if s.first_loss is not None and s.last_loss is not None:
        pairs.append(("train", s.first_loss, s.last_loss))
    what, first, last = pairs[0] if pairs else ("", 0.0, 0.0)
    if not pairs or not last > DIVERGED * first:
        return None
    return (f"Warning: the {what} loss rose from {first:.4f} to {last:.4f}: training diverged, and the adapter "
            f"written is worse than none. Try a lower --lr (now {lr:g}).")


def _summary(result: TrainResult, whole: float) -> None:
    """What the run did, after it: steps, losses, stop rates, the probe's share, where the adapter is."""
    from lora_cli.adapter.folder import LOSS_CURVE
    from lora_cli.cli.render import out

    d, s = result.decisions, result.summary
    first = f"{s.first_loss:.4f}" if s.first_loss is not None else "-"
    last = f"{s.last_loss:.4f}" if s.last_loss is not None else "-"
    evals = " -> ".join(f"{x:.4f}" for x in s.eval_losses) or "-"
    if result.resumed_from:  # the loop's counts are the run's, its seconds this command's: say which is which
        out.print(f"Resumed from {result.resumed_from}: the run is at step {s.steps} ({s.tokens:,} tokens in all) "
                  f"on {d.device} ({d.precision}, {d.batching}); this command trained for {s.seconds:.1f} s.")
    else:
        out.print(f"Trained {s.steps} steps on {d.device} ({d.precision}, {d.batching}), "
                  f"{s.tokens:,} tokens in {s.seconds:.1f} s.")
    out.print(f"train loss {first} -> {last}; eval loss {evals}")
    stops = result.summary.stop_rates
    if stops:
        out.print(f"stop rate (greedy answers to the first {stops[0][1]} val prompts): "
                  + " -> ".join(f"{stopped}/{n}" for stopped, n in stops))
    if result.summary.best:
        best = result.summary.best
        how = f"stopped early at step {best.last_step}" if best.stopped_early else "ran every step"
        out.print(f"Early stopping {how}; the adapter written is the best evaluation's: step {best.step}, "
                  f"eval loss {best.eval_loss:.4f} (checkpoint {best.checkpoint}).")
    probe_s = result.summary.probe_seconds
    if probe_s:
        out.print(f"The stop-rate probe took {probe_s:.1f} s of the command's {whole:.1f} s ({probe_s / whole:.0%}; "
                  "--eval-generate 0 turns it off).")
    out.print(f"Adapter written to {result.output} (loss curve: {Path(result.output) / LOSS_CURVE})")
