"""A run's output folder, before the run: writable with room for its checkpoints, and its own.

`check_output` runs before any data is tokenized or weight loaded; `output_lock` holds the folder's
lock (lock.py) from before the data is prepared to the run's end, so two runs given one -o never
write into each other's folder: the second is refused in one line naming the first.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from lora_cli.config import RunConfig
from lora_cli.lock import exclusive, refuse_if_held
from lora_cli.writable import check_writable

if TYPE_CHECKING:
    from contextlib import AbstractContextManager
    from pathlib import Path

    from lora_cli.progress import Reporter
    from lora_cli.train.runtime import Placement

# a checkpoint holds the LoRA weights and AdamW's two moments, fp32 each
CHECKPOINT_BYTES_PER_PARAMETER = 12


def checkpoint_bytes(lora_parameters: int) -> int:
    """The room one checkpoint of `lora_parameters` LoRA entries takes (bytes, an estimate: the
    tensors alone, so a lower bound). The previous checkpoint stays until the next is complete,
    so this is what a run needs free beside what its folder already holds."""
    return CHECKPOINT_BYTES_PER_PARAMETER * lora_parameters


def check_output(cfg: RunConfig, lora_parameters: int, is_main: bool = True) -> None:
    """The output folder can be written and has room for one checkpoint; LoraCliError (one line
    naming --output) otherwise. (The tokenize cache is checked where an entry is built.)"""
    if not is_main:
        return
    need = checkpoint_bytes(lora_parameters)
    check_writable(cfg.output.dir, "folder", "--output", need, f"one checkpoint of {lora_parameters:,} LoRA "
                   "parameters with their optimizer state", inside=True)


IN_USE_HINT = "Wait for that run to finish, or choose another --output folder."


def refuse_if_in_use(cfg: RunConfig) -> None:
    """OutputInUse when a live run holds the output folder: said before its contents are judged."""
    refuse_if_held(cfg.output.dir, f"Output folder {cfg.output.dir}", IN_USE_HINT)


def output_lock(cfg: RunConfig, placement: Placement, reporter: Reporter) -> AbstractContextManager[Path | None]:
    """The output folder's lock, held by the main process (the others write nothing there)."""
    return exclusive(cfg.output.dir, f"Output folder {cfg.output.dir}", IN_USE_HINT, reporter,
                     enabled=placement.is_main)
