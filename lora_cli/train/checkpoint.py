"""Resumable training state: adapter weights, optimizer, scheduler, RNG and loop position.

A checkpoint folder is written whole under a temporary name and renamed into place, so a
folder named `epoch-N` or `step-N` is always complete. Tensors are loaded back with
`weights_only=True`; loop state is plain JSON.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lora_cli.adapter.folder import ADAPTER_WEIGHTS, CHECKPOINTS
from lora_cli import faults
from lora_cli.atomic import TMP_PREFIX, atomic_dir
from lora_cli.errors import LoraCliError

if TYPE_CHECKING:
    import torch
    from torch.optim.lr_scheduler import LRScheduler

STATE = "trainer_state.json"


@dataclass
class LoopState:
    """Where the loop stands: saved in every checkpoint as trainer_state.json, restored on resume."""

    step: int = 0  # optimizer steps done
    epoch: int = 0  # current epoch (0-based)
    step_in_epoch: int = 0  # optimizer steps done within `epoch`
    metrics_lines: int = 0  # lines of metrics.jsonl written so far
    window_loss: float = 0.0  # summed token loss since the last log line
    window_targets: int = 0  # target tokens since the last log line
    window_tokens: int = 0  # real tokens since the last log line
    tokens_seen: int = 0
    fingerprint: str = ""  # adapter_folder.run_fingerprint of the run's settings
    total_steps: int = 0
    world_size: int = 1  # processes: a checkpoint resumes only on as many
    fsdp: bool = False  # made with the base sharded (FSDP): resumes only the same way
    first_loss: float | None = None  # train loss of the first log window (the whole run's, across resumes)
    last_loss: float | None = None
    eval_losses: list[float] = field(default_factory=list)
    stop_rates: list[list[int]] = field(default_factory=list)  # [stopped, prompts] of each evaluation's probe (--eval-generate)
    # early stopping (--early-stopping-patience): the best evaluation after training began, and since when
    best_eval_loss: float | None = None
    best_stop_rate: float | None = None  # that evaluation's stop rate (--select-by stop-rate)
    best_step: int = 0
    best_checkpoint: str = ""  # the checkpoint saved right after that evaluation (kept from pruning)
    evals_since_best: int = 0
    stopped_early: bool = False

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> LoopState:
        """From trainer_state.json as any lora-cli wrote it (see _from_unnamed_layout). A field added since a
        checkpoint was made takes its default, which is what the loop did before it existed."""
        raw = _from_unnamed_layout(raw) if "extra" in raw else raw
        return cls(**{k: v for k, v in raw.items() if k in {f.name for f in fields(cls)}})


def _from_unnamed_layout(raw: dict[str, Any]) -> dict[str, Any]:
    """trainer_state.json as lora-cli wrote it before the loop state's fields were named, in today's layout.

    Why: such a checkpoint kept the whole run's losses (`summary`: first_loss, last_loss,
    eval_losses) and whether it was sharded (`fsdp`, absent when not) in an `extra` dict; its
    `window_steps` is no longer counted. It still resumes, with the same numbers."""
    today = {k: v for k, v in raw.items() if k not in ("extra", "window_steps")}
    extra = raw["extra"]
    if "summary" in extra:
        today |= {k: v for k, v in extra["summary"].items() if k in ("first_loss", "last_loss", "eval_losses")}
    return today | {"fsdp": bool(extra["fsdp"]) if "fsdp" in extra else False}


@dataclass
class Checkpoint:
    """A checkpoint folder read back: the loop state, LoRA tensors (adapter-file names), and the
    optimizer, scheduler and RNG states."""

    path: Path
    state: LoopState
    adapter: dict[str, torch.Tensor]
    optimizer: dict[str, Any]
    scheduler: dict[str, Any]
    rng: dict[str, Any]


def checkpoint_dir(root: Path) -> Path:
    return Path(root) / CHECKPOINTS


def list_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints, oldest first (by optimizer step)."""
    return [p for _, p in _by_step(root)]


def _by_step(root: Path) -> list[tuple[int, Path]]:
    """(optimizer step, folder) of each complete checkpoint, oldest first."""
    folder = checkpoint_dir(root)
    found = []
    for p in folder.iterdir() if folder.is_dir() else []:
        if p.name.startswith(TMP_PREFIX) or not (p / STATE).is_file():
            continue
        try:
            found.append((int(json.loads((p / STATE).read_text())["step"]), p))
        except (OSError, ValueError, KeyError, TypeError):
            continue
    return sorted(found, key=lambda x: (x[0], x[1].name))


def _torch_save(obj: Any, path: Path) -> None:
    """torch.save through a Python file: a full disk then surfaces as OSError(ENOSPC) in the
    exception chain (given a path, torch's own writer reports only "unexpected pos")."""
    import torch

    faults.point("checkpoint:file", path)
    with open(path, "wb") as fh:
        torch.save(obj, fh)


def save_checkpoint(root: Path, name: str, state: LoopState, adapter_state: dict, optimizer_state: dict,
                    scheduler: LRScheduler, keep: int) -> Path:
    """Write checkpoint `name` whole, then prune to the newest `keep` (the best one, for early stopping, stays)."""
    import torch
    from safetensors.torch import save_file

    dest = checkpoint_dir(root) / name
    hint = (f"Training stopped at step {state.step}; the checkpoints already in {checkpoint_dir(root)} are intact. "
            "Free some disk space and run the same command with --resume." if list_checkpoints(root) else
            f"Training stopped at step {state.step}, before its first checkpoint. Free some disk space and run the "
            "same command again.")
    with atomic_dir(dest, replace=True, hint=hint) as tmp:
        save_file({k: v.detach().contiguous().cpu() for k, v in adapter_state.items()}, str(tmp / ADAPTER_WEIGHTS))
        faults.point("checkpoint:partial")
        _torch_save(optimizer_state, tmp / "optimizer.pt")
        _torch_save(scheduler.state_dict(), tmp / "scheduler.pt")
        rng = {"cpu": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        _torch_save(rng, tmp / "rng.pt")
        (tmp / STATE).write_text(json.dumps(asdict(state), indent=2))
    best = checkpoint_dir(root) / state.best_checkpoint if state.best_checkpoint else None
    prune(root, keep, protect=dest, step=state.step, also_keep=best)
    return dest


def prune(root: Path, keep: int, protect: Path | None = None, step: int | None = None,
          also_keep: Path | None = None) -> None:
    """Keep the newest `keep` checkpoints (and `also_keep`). With `step` (the one just saved), also
    drop any made at a later step: they belong to a timeline abandoned by --resume-from an older
    checkpoint, and left in place a later --resume would pick them as the latest."""
    found = _by_step(root)
    stale = [p for n, p in found if step is not None and n > step]
    existing = [p for n, p in found if p not in stale]
    kept = {p.resolve() for p in (protect, also_keep) if p is not None}
    for old in stale + existing[: max(0, len(existing) - keep)]:
        if old.resolve() not in kept:
            shutil.rmtree(old, ignore_errors=True)


def read_state(path: Path) -> LoopState:
    """The loop state of a checkpoint folder (LoraCliError if it is not one)."""
    try:
        return LoopState.from_dict(json.loads((Path(path) / STATE).read_text()))
    except FileNotFoundError:
        raise LoraCliError(f"{path} is not a checkpoint folder (no {STATE}).") from None
    except (OSError, ValueError, TypeError) as exc:
        raise LoraCliError(f"Checkpoint {path} cannot be read: {type(exc).__name__}: {exc}") from None


def load_checkpoint(path: Path) -> Checkpoint:
    """Everything a checkpoint folder holds; tensors loaded with weights_only (no pickled code runs)."""
    import torch
    from safetensors.torch import load_file

    path = Path(path)
    try:
        state = LoopState.from_dict(json.loads((path / STATE).read_text()))
        adapter = load_file(str(path / ADAPTER_WEIGHTS))
        optim, sched, rng = (torch.load(path / f"{name}.pt", weights_only=True, map_location="cpu")
                             for name in ("optimizer", "scheduler", "rng"))
    except FileNotFoundError as exc:
        raise LoraCliError(f"Checkpoint {path} is incomplete ({Path(exc.filename).name} is missing).") from None
    except Exception as exc:  # corrupt or foreign files: say which checkpoint, not a traceback
        raise LoraCliError(f"Checkpoint {path} cannot be read: {type(exc).__name__}: {exc}") from None
    return Checkpoint(path, state, adapter, optim, sched, rng)
