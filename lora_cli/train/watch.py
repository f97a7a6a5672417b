"""What a run shows of itself besides its log lines: the stop-rate probe, the trackers, the loss-curve picture.

The loop hands every metrics.jsonl row to `record` (the trackers get it) and calls `after_eval`
at each evaluation: the probe answers its prompts (their stop rate joins the evaluation's row)
and loss_curve.png is redrawn. `close` draws the last picture and closes the trackers.
Only the main process writes; every process calls, so that the probe's barrier is met.
"""

from __future__ import annotations

from typing import TYPE_CHECKING
from lora_cli.train import curves, trackers

if TYPE_CHECKING:
    from pathlib import Path

    from peft import PeftModel

    from lora_cli.train.probe import StopProbe
    from lora_cli.train.runtime import Placement


class RunWatch:
    def __init__(self, placement: Placement, folder: Path, probe: StopProbe | None = None, tracking: bool = False):
        self.placement, self.folder, self.probe, self.tracking = placement, folder, probe, tracking
        self._drawn_rows = -1

    def probe_row(self, peft_model: PeftModel) -> tuple[dict, str | None]:
        """(fields for the evaluation's row, a line for the user); empty without a probe."""
        if self.probe is None:
            return {}, None
        result = self.probe.run(peft_model, self.placement)
        return (result.row(), result.line()) if result is not None else ({}, None)

    def record(self, row: dict) -> None:
        if self.tracking:
            trackers.log(self.placement.accelerator, row)

    def draw(self, rows_written: int) -> None:
        """Redraw loss_curve.png when rows were added since the last drawing (main process)."""
        if self.placement.is_main and rows_written != self._drawn_rows:
            curves.refresh(self.folder)
            self._drawn_rows = rows_written

    def close(self, rows_written: int | None = None) -> None:
        if rows_written is not None:
            self.draw(rows_written)
        if self.tracking:
            trackers.finish(self.placement.accelerator)
            self.tracking = False
