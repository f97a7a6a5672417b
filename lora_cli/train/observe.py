"""What a run shows of itself: one observer interface over metrics.jsonl, the trackers, the stop-rate probe
and the loss-curve picture.

The loop holds a list of observers and tells each the same three things: each evaluation
(`on_eval`, where an observer may add fields to the evaluation's row: the probe's stop rate),
every metrics row (`on_row`: a train row at each log step, an eval row at each evaluation), and
the run's end (`on_end`). The writers (metrics file, picture) are the main process's alone; every
process tells the probe, so that its barrier is met. The order of the list is the order they are told: the metrics file comes before
the picture drawn from it.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from lora_cli.train import curves, trackers

if TYPE_CHECKING:
    from pathlib import Path

    from accelerate import Accelerator
    from peft import PeftModel

    from lora_cli.adapter.record import RunDecisions
    from lora_cli.config import RunConfig
    from lora_cli.progress import Reporter
    from lora_cli.train.probe import StopProbe
    from lora_cli.train.runtime import Placement

Row = dict[str, Any]  # one line of metrics.jsonl


class Observer:
    """Sees the run; each method does nothing unless a subclass says otherwise."""

    def on_eval(self, model: PeftModel) -> Row:
        """Fields to add to the evaluation's row, measured on the model being trained."""
        return {}

    def on_row(self, row: Row) -> None:
        """A metrics row, as metrics.jsonl gets it."""

    def on_end(self, finished: bool) -> None:
        """The run ended: `finished` when its adapter was written, False when it stopped (interrupt, error)."""


class MetricsFile(Observer):
    """metrics.jsonl, one JSON object a line, appended as the rows come."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def on_row(self, row: Row) -> None:
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(row) + "\n")


class Trackers(Observer):
    """The experiment trackers of --report-to (trackers.py), through accelerate: each row at its optimizer step."""

    def __init__(self, accelerator: Accelerator) -> None:
        self.accelerator = accelerator

    def on_row(self, row: Row) -> None:
        keys = trackers.KEYS[row["type"]]  # every row is a train or an eval row
        values = {name: row[key] for key, name in keys.items() if row.get(key) is not None}
        if values:
            self.accelerator.log(values, step=int(row["step"]))

    def on_end(self, finished: bool) -> None:
        """Close every tracker (flush TensorBoard, end the MLflow run). Not accelerator.end_training(),
        which also tears down the process group that the run's last barrier still needs."""
        for tracker in self.accelerator.trackers:
            tracker.finish()
        self.accelerator.trackers = []


class StopRate(Observer):
    """The stop-rate probe (probe.py) at each evaluation: its fields join the evaluation's row, its line is said."""

    def __init__(self, probe: StopProbe, placement: Placement, reporter: Reporter) -> None:
        self.probe, self.placement, self.reporter = probe, placement, reporter

    def on_eval(self, model: PeftModel) -> Row:
        result = self.probe.run(model, self.placement)
        if result is None:
            return {}
        self.reporter.message(result.line())
        return result.row()


class LossPicture(Observer):
    """loss_curve.png, redrawn from metrics.jsonl at each evaluation and at the end."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.rows, self.drawn = 0, -1  # rows seen, and how many there were at the last drawing

    def on_row(self, row: Row) -> None:
        self.rows += 1
        if row["type"] == "eval":
            self._draw()

    def on_end(self, finished: bool) -> None:
        if finished and self.rows != self.drawn:
            self._draw()

    def _draw(self) -> None:
        curves.refresh(self.folder)
        self.drawn = self.rows


def observers_for(cfg: RunConfig, placement: Placement, folder: Path, metrics: Path, decisions: RunDecisions,
                  resumed_step: int | None, probe: StopProbe | None, reporter: Reporter) -> list[Observer]:
    """The observers of a run, in the order they are told: the metrics file, the trackers it asked for
    (started here), the stop-rate probe it asked for, the picture (the writers on the main process only)."""
    found: list[Observer] = [MetricsFile(metrics)] if placement.is_main else []
    if trackers.start(placement.accelerator, cfg, decisions, resumed_step):
        found.append(Trackers(placement.accelerator))
    if probe is not None:
        found.append(StopRate(probe, placement, reporter))
    return found + ([LossPicture(folder)] if placement.is_main else [])
