"""Loss curves as a picture: metrics.jsonl drawn with matplotlib (Agg backend, no display needed).

One figure, optimizer steps on the x axis: the train loss of each logged window (a line), the
eval loss of each evaluation (a line with markers), the stop rate of the evaluations' greedy
answers on a second axis (dashed, in percent) where the run measured it, and each epoch's end
marked with a dotted vertical line. Several runs share the figure in different colours, to
compare settings (`lora-cli plot`). Training redraws its own folder's picture at each
evaluation and at the end; the PNG is written atomically.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lora_cli.adapter.folder import LOSS_CURVE, METRICS
from lora_cli.atomic import atomic_path
from lora_cli.errors import LoraCliError


@dataclass(frozen=True)
class MetricsRow:
    """One line of metrics.jsonl: a train window or an evaluation, at an optimizer step."""

    type: str  # train | eval
    step: int  # optimizer steps done
    epoch: float  # a train row's epoch as a fraction; an evaluation's, the epochs done
    values: dict[str, Any]  # the rest (loss, lr, ... / eval_loss, stop_rate, ...); a value not measured is absent or None

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> MetricsRow:
        """KeyError when a field every lora-cli writes is missing."""
        return cls(raw["type"], raw["step"], raw["epoch"],
                   {k: v for k, v in raw.items() if k not in ("type", "step", "epoch")})


def read_metrics(run: str | Path) -> list[MetricsRow]:
    """The rows of a run's metrics.jsonl; `run` is an adapter folder or the file itself.

    Errors: LoraCliError naming the run when there is no metrics file or a line is not a metrics row.
    """
    path = Path(run)
    path = path / METRICS if path.is_dir() else path
    if not path.is_file():
        raise LoraCliError(f"{run} has no {METRICS}.", "Give an adapter folder written by lora-cli train.")
    rows = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            rows.append(MetricsRow.from_dict(json.loads(line)))
        except (ValueError, KeyError, TypeError):
            raise LoraCliError(f"{path}:{number}: not a metrics row; the metrics file is damaged.") from None
    return rows


def _series(rows: list[MetricsRow], kind: str, key: str) -> tuple[list[int], list[float]]:
    points = [(r.step, r.values[key]) for r in rows if r.type == kind and r.values.get(key) is not None]
    return [p[0] for p in points], [p[1] for p in points]


def _epoch_ends(rows: list[MetricsRow]) -> list[tuple[int, int]]:
    """(step, epoch) of each completed epoch: the evaluations made at an epoch's end."""
    seen, ends = set(), []
    for r in rows:
        if r.type == "eval" and r.step > 0 and isinstance(r.epoch, int) and r.epoch > 0 and r.epoch not in seen:
            seen.add(r.epoch)
            ends.append((r.step, r.epoch))
    return ends


def draw(runs: list[tuple[str, list[MetricsRow]]], dest: Path, title: str | None = None) -> None:
    """Draw one or several runs' metrics rows on one figure and write it to `dest` (PNG, atomically).

    runs: (label, metrics rows) pairs. Errors: LoraCliError when no run has a loss to draw, or when
    matplotlib is missing (a training run then goes on without its picture: refresh).
    """
    try:
        import matplotlib
    except ImportError:
        raise LoraCliError("matplotlib is not installed, so no loss curve can be drawn.",
                           "pip install matplotlib (lora-cli depends on it; the install is incomplete).") from None

    matplotlib.use("Agg", force=True)  # files only: no display, no GUI toolkit
    from matplotlib.figure import Figure

    if not any(_series(rows, "train", "loss")[0] or _series(rows, "eval", "eval_loss")[0] for _, rows in runs):
        raise LoraCliError("Nothing to draw: no train or eval loss in " + ", ".join(label for label, _ in runs) + ".")
    fig = Figure(figsize=(8, 4.5), dpi=100, layout="constrained")
    ax = fig.add_subplot()
    stops = None
    colors = matplotlib.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (label, rows) in enumerate(runs):
        # one run: a colour per curve; several: a colour per run, the curves told apart by their style
        train_c, eval_c, stop_c = colors[:3] if len(runs) == 1 else [colors[i % len(colors)]] * 3
        name = f"{label}: " if len(runs) > 1 else ""
        ax.plot(*_series(rows, "train", "loss"), color=train_c, linewidth=1.2, label=f"{name}train loss")
        ax.plot(*_series(rows, "eval", "eval_loss"), color=eval_c, marker="o", linewidth=2, label=f"{name}eval loss")
        steps, rates = _series(rows, "eval", "stop_rate")
        if steps:
            stops = stops or ax.twinx()
            stops.plot(steps, [100 * r for r in rates], color=stop_c, marker="s", linestyle="--", linewidth=1.2,
                       label=f"{name}stop rate (greedy)")
        if len(runs) == 1:
            for step, epoch in _epoch_ends(rows):
                ax.axvline(step, color="grey", linestyle=":", linewidth=1)
                ax.annotate(f"epoch {epoch}", (step, 0.02), xycoords=("data", "axes fraction"), ha="right",
                            va="bottom", fontsize=8, color="grey", rotation=90)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (nats per target token)")
    handles, labels = ax.get_legend_handles_labels()
    if stops is not None:
        stops.set_ylabel("stop rate (%)")
        stops.set_ylim(-5, 105)
        more = stops.get_legend_handles_labels()
        handles, labels = handles + more[0], labels + more[1]
    fig.legend(handles, labels, fontsize=8, loc="outside lower center", ncols=min(len(labels), 3), frameon=False)
    ax.set_title(title or ", ".join(label for label, _ in runs), fontsize=10)
    ax.grid(alpha=0.3)
    with atomic_path(dest) as tmp:
        fig.savefig(tmp, format="png")


def refresh(folder: Path) -> None:
    """Redraw a run folder's loss_curve.png from its metrics.jsonl; nothing while there is nothing to draw."""
    rows = read_metrics(folder)
    with contextlib.suppress(LoraCliError):  # no loss yet, or no matplotlib: the run goes on without its picture
        draw([(folder.name, rows)], folder / LOSS_CURVE)
