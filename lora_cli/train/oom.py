"""What to say when the GPU runs out of memory: how much the run tried to use, and what lowers it.

torch's OutOfMemoryError text holds the numbers (the allocation that failed, the device's
capacity, what the process held); we keep those and add the settings that decide a step's
memory with their current values, so the user knows which flag to change and to what.
"""

from __future__ import annotations

import contextlib
import re
from dataclasses import dataclass
from typing import Callable, Iterator

from lora_cli.errors import OutOfMemory

_NUMBERS = {
    "tried": r"Tried to allocate ([\d.]+ [KMGT]?i?B)",
    "capacity": r"total capacity of ([\d.]+ [KMGT]?i?B)",
    "in_use": r"this process has ([\d.]+ [KMGT]?i?B) memory in use",
}


def _usage(exc: BaseException) -> str:
    text = str(exc)
    found = {k: m.group(1) for k, pattern in _NUMBERS.items() if (m := re.search(pattern, text))}
    peak = _peak_allocated()
    parts = []
    if "tried" in found:
        parts.append(f"tried to allocate {found['tried']} more")
    if "in_use" in found:
        parts.append(f"with {found['in_use']} already in use")
    elif peak:
        parts.append(f"after a peak of {peak} allocated")
    if "capacity" in found:
        parts.append(f"on a GPU of {found['capacity']}")
    return (" The run " + ", ".join(parts) + ".") if parts else ""


def _peak_allocated() -> str:
    with contextlib.suppress(Exception):
        import torch

        if torch.cuda.is_available() and torch.cuda.is_initialized():
            return f"{torch.cuda.max_memory_allocated() / 2**30:.2f} GiB"
    return ""


@dataclass(frozen=True)
class StepMemory:
    """The settings that decide an optimizer step's memory, as the run has them."""

    step: int  # the optimizer step that ran out (1-based)
    packed: bool
    max_tokens: int  # packing budget per micro-batch, in tokens
    batch_size: int
    max_length: int  # tokens
    grad_accum: int
    checkpoint_layers: int  # decoder layers with gradient checkpointing; -1: all


def _levers(s: StepMemory | None) -> list[str]:
    """Each setting that lowers a step's memory, with its current value and a smaller one."""
    if s is None:
        return ["--max-tokens (tokens per packed micro-batch)", "--batch-size (padded batches)", "--max-length",
                "--set train.gradient_checkpointing=on"]
    out = []
    if s.packed:
        out.append(f"--max-tokens {max(s.max_tokens // 2, 64)} (packing budget per micro-batch, now {s.max_tokens})")
    bs = s.batch_size
    out.append(f"--batch-size {max(bs // 2, 1)} (now {bs})" if bs > 1 else "--batch-size (already 1)")
    out.append(f"--max-length {max(s.max_length // 2, 8)} (now {s.max_length})")
    layers = s.checkpoint_layers
    now = "all layers" if layers == -1 else ("off" if not layers else f"{layers} layers")
    if layers != -1:
        out.append(f"--set train.gradient_checkpointing=on (gradient checkpointing, now {now})")
    return out


def oom_message(exc: BaseException, settings: StepMemory | None = None) -> str:
    """The one-line message for torch's OutOfMemoryError; `settings`: the run's, None outside a training step."""
    where = f" at step {settings.step}" if settings else ""
    text = f"Out of GPU memory{where}.{_usage(exc)} Lower the memory a step needs with: " + "; ".join(_levers(settings))
    if settings and settings.grad_accum:
        text += (f". To keep the same effective batch, raise --grad-accum (now {settings.grad_accum}) "
                 "by the factor you lower the micro-batch")
    return text + "."


def is_oom(exc: BaseException) -> bool:
    return type(exc).__name__ == "OutOfMemoryError"


@contextlib.contextmanager
def out_of_memory_as_error(settings: Callable[[], StepMemory]) -> Iterator[None]:
    """Turn torch's OutOfMemoryError inside the block into an OutOfMemory message (no traceback)."""
    message = None
    try:
        yield
    except Exception as exc:
        if not is_oom(exc):
            raise
        message = oom_message(exc, settings())
    if message is not None:
        raise OutOfMemory(message)
