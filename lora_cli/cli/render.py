"""Everything the terminal shows: rich progress bars, messages and tables.

The core reports through `RichReporter`; commands render results with the table helpers.
Progress and messages go to stderr, results (tables, JSON) to stdout, so `--json` output
can be piped.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from typing import Iterator

from rich.console import Console
from rich.table import Table

# Outside a terminal (logs, CI, pipes) rich would wrap tables at 80 columns; give them room, and
# leave long lines whole (soft wrap): a log line cut mid-sentence reads as two messages.
_WIDTH = None if sys.stdout.isatty() else int(os.environ.get("COLUMNS", "140"))
out = Console(highlight=False, width=_WIDTH, soft_wrap=not sys.stdout.isatty())
err = Console(stderr=True, highlight=False, width=None if sys.stderr.isatty() else _WIDTH,
              soft_wrap=not sys.stderr.isatty())


class _BarStage:
    def __init__(self, progress, task):
        self.progress, self.task = progress, task

    def update(self, advance: float = 1, **fields) -> None:
        self.progress.update(self.task, advance=advance, info=_info(fields))


LINE_EVERY_S = 30.0  # outside a terminal, a long stage says how far it is this often


class _LineStage:
    """Non-terminal output (CI logs, pipes): a line at start and end, no animation, and in between a
    line every LINE_EVERY_S seconds (done / total, elapsed, the latest fields), so a long stage shows life."""

    def __init__(self, console: Console, name: str, total: float | None, unit: str):
        self.console, self.name, self.total, self.unit = console, name, total, unit
        self.done, self.info = 0.0, ""
        self.t0 = self.last = time.time()

    def update(self, advance: float = 1, **fields) -> None:
        self.done += advance
        self.info = _info(fields) or self.info
        now = time.time()
        if now - self.last >= LINE_EVERY_S and self.done:
            self.last = now
            of = f"/{self.total:,.0f}" if self.total else ""
            info = f"  {self.info}" if self.info else ""
            self.console.print(f"{self.name}: {self.done:,.0f}{of} {self.unit}, {now - self.t0:.0f} s{info}",
                               markup=False)


def _info(fields: dict) -> str:
    """The fields given (None: not measured) as `key value` pairs."""
    return "  ".join(_fmt(k, v) for k, v in fields.items() if v is not None)


def _fmt(key: str, value) -> str:
    if isinstance(value, float):
        return f"{key} {value:,.0f}" if key.endswith("_s") or value >= 1000 else f"{key} {value:.4f}"
    return f"{key} {value}"


class RichReporter:
    def __init__(self, console: Console = err):
        self.console = console

    @contextlib.contextmanager
    def stage(self, name: str, total: float | None = None, unit: str = "") -> Iterator:
        t0 = time.time()
        if self.console.is_terminal:
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                SpinnerColumn,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
            )

            columns = [SpinnerColumn(), TextColumn("[bold]{task.description}"), BarColumn(),
                       MofNCompleteColumn(), TimeElapsedColumn(), TimeRemainingColumn(), TextColumn("{task.fields[info]}")]
            with Progress(*columns, console=self.console, transient=False) as progress:
                task = progress.add_task(name, total=total, info="")
                yield _BarStage(progress, task)
            return
        self.console.print(f"{name} ...", markup=False)
        stage = _LineStage(self.console, name, total, unit)
        yield stage
        unit_text = f", {stage.done:,.0f} {unit}" if unit and stage.done else ""
        info = f"  {stage.info}" if stage.info else ""
        self.console.print(f"{name}: done in {time.time() - t0:.1f} s{unit_text}{info}", markup=False)

    def message(self, text: str) -> None:
        self.console.print(text, markup=False, soft_wrap=True)


def table(title: str, columns: list[str], rows: list[list], right: tuple[int, ...] = ()) -> Table:
    t = Table(title=title, title_justify="left")
    for i, col in enumerate(columns):
        t.add_column(col, justify="right" if i in right else "left")
    for row in rows:
        t.add_row(*[str(c) for c in row])
    return t


def param_table(summary) -> list[Table]:
    """The headline numbers and the per-module breakdown of a ParamSummary."""
    head = table("Parameters", ["", "count"], [
        ["total", f"{summary.total:,}"], ["trainable", f"{summary.trainable:,}"],
        ["trainable %", f"{summary.percent:.4f}%"]], right=(1,))
    rows = [[m.module, m.count, f"{m.params:,}", f"{m.trainable:,}"] for m in summary.modules]
    detail = table("Per module (layer index as *)", ["module", "tensors", "params", "trainable"], rows, right=(1, 2, 3))
    return [head, detail]


def print_issues(issues, console) -> None:
    """Each data defect (records.Issue) on one line: severity, file:line [field]: reason."""
    from rich.markup import escape

    for issue in issues:
        style = "yellow" if issue.severity == "warning" else "red"
        console.print(f"[{style}]{issue.severity}[/] {escape(str(issue))}", markup=True, highlight=False,
                      soft_wrap=True)
