"""Resume, in one place: which existing output folder a run may write into, the checkpoint it continues
from, restoring that checkpoint's state, and cutting metrics.jsonl back to it.

Admission rules (nothing a user had is lost):
- a missing or empty folder: a fresh run;
- `--resume`: continue the run whose checkpoints are there: the same settings and the same data
  (the fingerprint holds the tokenized content), except its length: a larger --epochs or
  --max-steps continues it, finished or not, to the new end;
- a folder holding another lora-cli run (different settings or data), an unfinished run, or this
  very run finished: refused without `--overwrite` (or `--resume`), with the way forward;
- a folder lora-cli did not write: refused, even with `--overwrite`.
`refuse_early` applies the same rules before torch loads, where the folder's record allows.

Restoring: the adapter weights go in before the model is wrapped (FSDP shards them), the optimizer,
schedule and RNG after (optim.prepare_trainable calls `restore_adapter` and `restore_training`); the
loop then goes on from the checkpoint's LoopState, and metrics.jsonl keeps only the rows written
up to the checkpoint (`announce`), so the steps done again are not logged twice.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

from lora_cli.adapter.folder import (
    CHECKPOINTS,
    EXTENDABLE,
    RESUME_FREE,
    legacy_fingerprint,
    read_saved_run,
)
from lora_cli.adapter.record import RunRecord, SavedRun
from lora_cli.atomic import TMP_PREFIX, remove_stale_temporaries, write_text
from lora_cli.config import RunConfig
from lora_cli.errors import LoraCliError
from lora_cli.model.identity import describe_change
from lora_cli.train.checkpoint import STATE, Checkpoint, list_checkpoints, read_state
from lora_cli.train.run_folder import OutputFolder, refuse_if_in_use

if TYPE_CHECKING:
    import torch
    from peft import PeftModel
    from torch.optim.lr_scheduler import LRScheduler

    from lora_cli.progress import Reporter
    from lora_cli.train.runtime import Placement


def _same_run(folder: OutputFolder, fingerprint: str | None) -> bool:
    return fingerprint in (folder.fingerprint, folder.fingerprint_without_base, legacy_fingerprint(folder.cfg))


def _describe_difference(folder: OutputFolder, saved: SavedRun, skip: tuple[str, ...] = RESUME_FREE) -> str:
    mine = folder.cfg.model_dump()
    diffs = [f"{section}.{key}: {value!r} there, {mine[section][key]!r} now"
             for section, values in saved.settings().items() for key, value in values.items()
             if key not in skip and mine[section][key] != value]
    diffs += _content_difference(folder, saved.run)
    return "; ".join(diffs[:4]) or "settings differ"


def _content_difference(folder: OutputFolder, run: RunRecord) -> list[str]:
    """What changed in the data since `run` (a saved run record) started."""
    out = []
    for split in ("train", "val"):
        then_sha, now_sha = run.data_sha256.get(split), folder.data_sha256.get(split)  # a split may be absent
        then_key, now_key = run.tokenize_cache.get(split), folder.cache_keys.get(split)
        if then_sha and now_sha and then_sha != now_sha:
            out.append(f"data.{split} {getattr(folder.cfg.data, split)}: its content changed (sha256 "
                       f"{then_sha[:12]}... there, {now_sha[:12]}... now)")
        elif then_key and now_key and then_key != now_key:
            out.append(f"data.{split}: its tokens changed (the tokenizer or the template file is not the same)")
    base = describe_change(run.base_model, folder.base_identity) if run.base_model else ""
    if base and folder.base_identity:
        out.insert(0, f"model.name {folder.cfg.model.name}: the base model changed: {base}")
    return out


def _length_change(folder: OutputFolder, saved: SavedRun) -> str:
    then, now = saved.train, folder.cfg.train
    return "; ".join(f"train.{k}: {getattr(then, k)!r} there, {getattr(now, k)!r} now" for k in EXTENDABLE
                     if getattr(then, k) != getattr(now, k))


def admit(folder: OutputFolder, resume: bool | str, overwrite: bool) -> Path | None:
    """Apply the folder rules (module docstring); return the checkpoint to resume from, if any."""
    path = folder.path
    if path.exists() and not path.is_dir():
        raise LoraCliError(f"Output {path} exists and is a file, not a folder.")
    saved = read_saved_run(path)
    if folder.is_main and saved is not None:  # leftovers of a killed run of ours
        remove_stale_temporaries(path)
        remove_stale_temporaries(path / CHECKPOINTS)
    entries = [p for p in path.iterdir() if not p.name.startswith(TMP_PREFIX)] if path.is_dir() else []
    folder.saved_run = saved.run if saved is not None else RunRecord()
    if resume:
        return _resume_point(folder, resume, saved)
    if not entries:
        return None
    if saved is None:
        raise LoraCliError(
            f"Output folder {path} is not empty and was not written by lora-cli; refusing to write into it.",
            "Choose another --output folder.")
    if not overwrite:  # passes only this run, started but killed before its first checkpoint: start it again
        _refuse_unless_new(folder, saved)
    elif folder.is_main:
        folder.clear()
    return None


def _refuse_unless_new(folder: OutputFolder, saved: SavedRun) -> None:
    """Without --overwrite or --resume: refuse another run, this run unfinished, and this run finished."""
    run, path = folder.saved_run, folder.path
    if not _same_run(folder, run.fingerprint):
        raise LoraCliError(f"Output folder {path} holds a different run ({_describe_difference(folder, saved)}).",
                           "Pass --overwrite to replace it, or choose another --output folder.")
    length = _length_change(folder, saved)
    to_length = f" ({length})" if length else ""
    if list_checkpoints(path) and not run.finished:
        raise LoraCliError(f"Output folder {path} holds an unfinished run of these settings{to_length}.",
                           "Pass --resume to continue it" + (" to the new length" if length else "") +
                           ", or --overwrite to start over.")
    if run.finished:
        steps = run.summary.steps if run.summary else None
        done = f", finished after {steps} steps" if steps is not None else ", finished"
        more = ("Add --resume to continue it from its last checkpoint to the new length" if length else
                "To train it further, raise --epochs or --max-steps and add --resume")
        raise LoraCliError(f"Output folder {path} already holds this run{done}{to_length}; training it again "
                           "would replace its adapter.", f"{more}; --overwrite trains it again from scratch.")


def _resume_point(folder: OutputFolder, resume: bool | str, saved: SavedRun | None) -> Path:
    explicit = isinstance(resume, str) and resume not in ("", "latest")
    if explicit:
        ckpt = Path(resume)
        if not (ckpt / STATE).is_file():
            raise LoraCliError(f"--resume-from {resume}: not a checkpoint folder (no {STATE}).",
                               f"Checkpoints are the folders under {folder.path / CHECKPOINTS}; --resume takes "
                               "the latest.")
    else:
        found = list_checkpoints(folder.path)
        if not found:
            raise LoraCliError(f"--resume: no checkpoint in {folder.path / CHECKPOINTS}.",
                               "Start the run without --resume.")
        ckpt = found[-1]
    if not _same_run(folder, read_state(ckpt).fingerprint):
        origin = read_saved_run(ckpt.parent.parent) or saved
        detail = _describe_difference(folder, origin, RESUME_FREE + EXTENDABLE) if origin else "settings differ"
        raise LoraCliError(f"Checkpoint {ckpt} belongs to a run with other settings or data ({detail}).",
                           "Resume with the same base model, settings and data (only --epochs and --max-steps "
                           "may grow), or start a new run with --overwrite.")
    if folder.saved_run.finished is True and not explicit and not (saved and _length_change(folder, saved)):
        _nothing_to_continue(folder, read_state(ckpt).step)  # said before the model loads
    return ckpt


def _nothing_to_continue(folder: OutputFolder, step: int) -> NoReturn:
    raise LoraCliError(f"Output folder {folder.path} holds a finished run: its last checkpoint is at step {step}, "
                       "the end of this run; there is nothing to continue.",
                       "To train it further, raise --epochs or --max-steps (with --resume); --overwrite instead "
                       "of --resume trains it again from scratch.")


def continuation(folder: OutputFolder, checkpoint: Checkpoint, total_steps: int) -> str:
    """On resume: a note when the run's length changed (its schedule is stretched to the new
    end), or LoraCliError when nothing is left to do (a finished run, or a checkpoint past the end)."""
    step, planned = checkpoint.state.step, checkpoint.state.total_steps
    if total_steps == step and folder.saved_run.finished is True:
        _nothing_to_continue(folder, step)
    if total_steps < step:
        raise LoraCliError(f"Checkpoint {checkpoint.path} is at step {step}, past the end of this run "
                           f"({total_steps} steps).", "Raise --epochs or --max-steps, or start over with --overwrite.")
    if planned and total_steps != planned:
        return (f"Continuing to step {total_steps} (the run was planned for {planned}): the learning-rate "
                f"schedule is recomputed for {total_steps} steps and goes on from step {step}.")
    return ""


def announce(folder: OutputFolder, checkpoint: Checkpoint, note: str, reporter: Reporter) -> None:
    """The run goes on from `checkpoint`: metrics.jsonl cut back to the rows written up to it (the steps
    done again are not logged twice), and said, with `continuation`'s note."""
    state = checkpoint.state
    if folder.is_main:
        rows = folder.metrics_path.read_text(encoding="utf-8") if folder.metrics_path.is_file() else ""
        write_text(folder.metrics_path, "".join(rows.splitlines(keepends=True)[:state.metrics_lines]))
    reporter.message(f"Resuming from {checkpoint.path} (step {state.step} of {state.total_steps}).")
    if note:
        reporter.message(note)


def restore_adapter(peft_model: PeftModel, checkpoint: Checkpoint, placement: Placement) -> None:
    """The checkpoint's LoRA weights into the model, before it is wrapped (under FSDP it waits on the CPU).
    A checkpoint resumes only on as many processes, sharded the same way (LoraCliError otherwise)."""
    from peft import set_peft_model_state_dict

    state = checkpoint.state
    if state.world_size != placement.world_size:
        raise LoraCliError(f"Checkpoint {checkpoint.path} was made with {state.world_size} process(es); "
                           f"resume with the same number (now {placement.world_size}).")
    if state.fsdp != placement.fsdp:
        how = "with FSDP" if state.fsdp else "without FSDP"
        raise LoraCliError(f"Checkpoint {checkpoint.path} was made {how}; resume it the same way.")
    device = "cpu" if placement.fsdp else placement.device
    set_peft_model_state_dict(peft_model, {k: v.to(device) for k, v in checkpoint.adapter.items()})


def restore_training(module: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler: LRScheduler,
                     checkpoint: Checkpoint, placement: Placement, total_steps: int) -> None:
    """The optimizer, schedule and RNG of the checkpoint, into the wrapped module's optimizer and schedule."""
    import torch

    if placement.fsdp:
        from lora_cli.train import sharding

        sharding.load_optimizer(module, optimizer, checkpoint.optimizer)
    else:
        optimizer.load_state_dict(checkpoint.optimizer)
    scheduler.load_state_dict(checkpoint.scheduler)
    if checkpoint.state.total_steps not in (0, total_steps):  # a run continued to a new length
        # the optimizer still holds the rate the old schedule gave this step (0 at the end of a linear
        # one), which the next step would use: a step back and forth sets it from the new schedule
        scheduler.last_epoch -= 1
        scheduler.step()
    rng = checkpoint.rng  # its "cuda" states saved where CUDA was available: restored on as many devices
    torch.set_rng_state(rng["cpu"])
    if "cuda" in rng and torch.cuda.is_available() and len(rng["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(rng["cuda"])


def refuse_early(cfg: RunConfig, resume: bool | str, overwrite: bool) -> None:
    """The output folder's refusals (another run, this run unfinished or finished, --resume with nothing
    to continue) before torch loads, so they cost well under a second instead of a model load.

    The same rules as `admit`, with the tokenize cache keys the folder recorded, when the
    data files are the bytes it recorded; when they are not (or a template file is in play, whose text
    is in the keys), the check after tokenizing decides. Changes nothing on disk. A folder a live run
    holds is refused as in use, whatever it holds now.
    """
    refuse_if_in_use(cfg)
    if overwrite:
        return
    from lora_cli.data.cache import file_digest

    saved = read_saved_run(cfg.output.dir)
    run = saved.run if saved is not None else RunRecord()
    keys, recorded = run.tokenize_cache, run.data_sha256
    if saved is not None:  # a run of ours is recorded there
        if Path(cfg.data.template).is_file():
            return
        paths = {split: getattr(cfg.data, split) for split in ("train", "val") if getattr(cfg.data, split)}
        if set(paths) != set(recorded) or any(file_digest(Path(p))[0] != recorded[s] for s, p in paths.items()):
            return
    base = None
    if run.base_model:  # the fingerprint holds the base's identity: read it as the full check will
        from lora_cli.model.identity import base_identity
        from lora_cli.model.resolve import resolve_model

        try:
            base = base_identity(resolve_model(cfg.model.name, local_only=True))
        except LoraCliError:
            return  # not at hand without a download: the check after loading decides
    admit(OutputFolder(cfg.output.dir, cfg, is_main=False, cache_keys=keys, data_sha256=recorded,
                       base_identity=base), resume, False)
