"""Named fault points: the one place where tests make lora-cli fail, or look inside it, on purpose.

The code calls `point(name)` (or `point(name, value)`) at a few chosen moments. In normal use it
does nothing and returns `value`. Two things can act there:

- `LORA_CLI_TEST_KILL_AT=<pattern>` (fnmatch, e.g. `dir:*`; `<pattern>#<n>`: the n-th time a
  matching point is reached) makes the process send itself SIGKILL at the first matching point,
  as `kill -9` or a power cut would, so a test can stop a writer exactly between two of its
  steps (also in a child process).
- `inject(name, action)` (a context manager, in-process) calls `action(value)` at each point
  `name` reached inside the block; what it returns replaces the value (a loss, an evaluation
  loss), and what it raises is raised there (a crash, an out-of-memory error).

Every point is listed in POINTS with what it is; `inject` refuses a name that is not there, so
a test cannot wait at a point the code no longer reaches. Tests use these points rather than
replacing private functions, so the code can be reorganised without rewriting them.
"""

from __future__ import annotations

import contextlib
import fnmatch
import os
import signal
from typing import Any, Callable, Iterator

KILL_ENV = "LORA_CLI_TEST_KILL_AT"

POINTS: dict[str, str] = {
    "tokenize:rows": "a batch of tokenized rows was handed to the cache writer (value: None)",
    "checkpoint:partial": "a checkpoint's adapter is written, its optimizer state not yet (value: None)",
    "checkpoint:file": "a checkpoint's torch file (optimizer, scheduler, rng) is about to be written (value: its path)",
    "train:begin": "the training loop is built and about to take its first step (value: the TrainingLoop)",
    "train:loss": "a micro-batch's summed token loss, before its backward pass (value: the loss tensor)",
    "train:step": "an optimizer step was taken (value: None)",
    "train:eval-loss": "an evaluation's mean response loss (value: the loss, a float)",
    "train:end": "the loop has finished, the adapter is not yet written (value: the TrainingLoop)",
    "adapter:staged": "the adapter's weights are staged, its other files not yet (value: None)",
    "adapter:renaming": "the first staged adapter file was renamed into the output folder (value: None)",
    "zip:partial": "the package zip is partly written (value: None)",
    "file:*": "a finished temporary file is about to be renamed onto file <name> (value: None)",
    "dir:*": "a finished temporary folder is about to be renamed onto folder <name> (value: None)",
    "dir-swap:*": "the old folder <name> is set aside, the new one not yet in place (value: None)",
}

_kill_hits: dict[str, int] = {}
_actions: list[tuple[str, Callable[[Any], Any]]] = []


def point(name: str, value: Any = None) -> Any:
    """Reach point `name` (one of POINTS) carrying `value`; returns `value`, or what an injected action made of it."""
    kill_at, _, nth = os.environ.get(KILL_ENV, "").partition("#")
    if kill_at and fnmatch.fnmatchcase(name, kill_at):
        _kill_hits[kill_at] = _kill_hits.get(kill_at, 0) + 1
        if _kill_hits[kill_at] == int(nth or 1):
            os.kill(os.getpid(), signal.SIGKILL)
    for pattern, action in list(_actions):
        if fnmatch.fnmatchcase(name, pattern):
            value = action(value)
    return value


@contextlib.contextmanager
def inject(name: str, action: Callable[[Any], Any]) -> Iterator[None]:
    """Within the block, call `action(value)` at every point matching `name`; its result replaces the value.

    Raises ValueError for a name that is not one of POINTS (nor matches one of its patterns).
    """
    if not any(fnmatch.fnmatchcase(name, known) for known in POINTS):  # a point, or a pattern such as `dir:*`
        raise ValueError(f"{name!r} is not a fault point; the points: {', '.join(POINTS)}")
    entry = (name, action)
    _actions.append(entry)
    try:
        yield
    finally:
        _actions.remove(entry)
