"""Ctrl-C and SIGTERM during training: finish the step, checkpoint, stop."""

from __future__ import annotations

import contextlib
import signal
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from types import FrameType, TracebackType

    from lora_cli.progress import Reporter


class InterruptFlag:
    """First Ctrl-C (or SIGTERM, as schedulers and spot instances send before a kill): finish the
    step, checkpoint, stop. A second one: stop at once."""

    def __init__(self, reporter: Reporter):
        self.reporter = reporter
        self.set = False
        self.signum = signal.SIGINT
        self._old: dict[int, Any] = {}  # signal -> the handler it had

    def _handler(self, signum: int, frame: FrameType | None) -> None:
        if self.set:
            raise KeyboardInterrupt
        self.set, self.signum = True, signum
        self.reporter.message("Interrupted: finishing this step and saving a checkpoint (Ctrl-C again to abort).")

    def __enter__(self) -> InterruptFlag:
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(ValueError):  # not the main thread: no handler
                self._old[sig] = signal.signal(sig, self._handler)
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 trace: TracebackType | None) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)
