"""`lora-cli plot RUN [RUN...]`: one or several runs' metrics.jsonl on one figure, written as a PNG."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from lora_cli.adapter.folder import METRICS


def plot(
    runs: Annotated[list[Path], typer.Argument(help="Adapter folders written by lora-cli train (or their "
                                                    f"{METRICS} files).", show_default=False)],
    output: Annotated[Path, typer.Option("--output", "-o", help="The PNG to write.")] = Path("loss_curves.png"),
    title: Annotated[str, typer.Option("--title", help="Title of the figure (default: the runs' names).")] = "",
    force: Annotated[bool, typer.Option("--force", help="Replace an existing file.")] = False,
) -> None:
    """Draw train loss, eval loss and stop rate of one or several runs on one figure, to compare settings."""
    from lora_cli.atomic import check_new_file
    from lora_cli.cli.render import err
    from lora_cli.errors import LoraCliError
    from lora_cli.train.curves import draw, read_metrics

    check_new_file(output, force, "-o", tuple(runs))
    if output.suffix.lower() != ".png":
        raise LoraCliError(f"-o {output}: the figure is written as PNG; name the file .png.")
    named = [(run.name if run.is_dir() else run.parent.name, read_metrics(run)) for run in runs]
    draw(named, output, title or None)
    err.print(f"Wrote {output} ({len(runs)} run(s))", markup=False)
