"""How the core reports progress without printing: a reporter the caller supplies.

The CLI passes a rich-backed reporter (progress bars, messages); tests and library users get
the null one. The core only ever calls `stage(...)` and `message(...)`.
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Protocol


class Stage(Protocol):
    def update(self, advance: float = 1, **fields) -> None: ...


class Reporter(Protocol):
    def stage(self, name: str, total: float | None = None, unit: str = "") -> contextlib.AbstractContextManager[Stage]: ...

    def message(self, text: str) -> None: ...


class NullReporter:
    """Says nothing: each stage is the reporter itself, whose updates go nowhere."""

    @contextlib.contextmanager
    def stage(self, name: str, total: float | None = None, unit: str = "") -> Iterator[Stage]:
        yield self

    def update(self, advance: float = 1, **fields) -> None:
        pass

    def message(self, text: str) -> None:
        pass


NULL_REPORTER = NullReporter()
