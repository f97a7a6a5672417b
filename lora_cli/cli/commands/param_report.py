"""`lora-cli param-report`: total, trainable and percent, from an adapter folder or a model's config.

Built on the meta device from config.json alone: no weights are loaded or downloaded.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from lora_cli.cli.options import config_flags


@config_flags("model.name", "model.trust_remote_code", "lora.*")
def param_report(
    settings: dict,
    adapter_dir: Annotated[Optional[Path], typer.Argument(help="Adapter folder (its base model and LoRA settings).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the summary as JSON.")] = False,
) -> None:
    """Total, trainable and percent of parameters, with a per-module breakdown."""
    from lora_cli.adapter.folder import summary_for_adapter
    from lora_cli.cli.render import out, param_table
    from lora_cli.config import RunConfig
    from lora_cli.model.load import quiet_libraries
    from lora_cli.model.params import summary_for_model

    quiet_libraries()
    cfg = RunConfig().replace(settings)
    if adapter_dir is not None:
        summary = summary_for_adapter(adapter_dir, settings.get("model.name"), cfg.model.trust_remote_code)
    else:
        summary = summary_for_model(cfg.model.name, cfg.lora, cfg.model.trust_remote_code)
    if as_json:
        typer.echo(json.dumps(summary.to_dict(), indent=2))
        return
    lora = summary.lora
    out.print(f"Base model: {summary.base_model}   LoRA: r={lora.r}, alpha={lora.alpha}, dropout={lora.dropout}, "
              f"target modules {','.join(lora.target_modules)}")
    for t in param_table(summary):
        out.print(t)
    out.print(f"trainable params: {summary.trainable:,} || all params: {summary.total:,} || "
              f"trainable%: {summary.percent:.4f}")


def register(app: typer.Typer, handle_errors) -> None:
    app.command("param-report")(handle_errors(param_report))
