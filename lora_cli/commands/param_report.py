"""`lora-cli param-report`: total, trainable and percent, from an adapter folder or a model's config.

Built on the meta device from config.json alone: no weights are loaded or downloaded.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from lora_cli.options import AlphaOpt, DropOpt, ModelOpt, RankOpt, TargetsOpt, TrustOpt, lora_flags


def param_summary(adapter_dir: Path | None, model: str | None, lora_overrides: dict, trust_remote_code: bool):
    from lora_cli.config import LoraSettings, RunConfig
    from lora_cli.errors import LoraCliError
    from lora_cli.modeling import quiet_libraries, resolve_model
    from lora_cli.params import summary_from_config

    quiet_libraries()
    if adapter_dir is not None:
        cfg_path = Path(adapter_dir) / "adapter_config.json"
        if not cfg_path.is_file():
            raise LoraCliError(f"{adapter_dir} is not an adapter folder (no adapter_config.json).")
        try:
            ac = json.loads(cfg_path.read_text())
            lora = LoraSettings(r=ac["r"], alpha=ac["lora_alpha"], dropout=ac.get("lora_dropout", 0.0),
                                target_modules=sorted(ac["target_modules"]) if isinstance(ac["target_modules"], list)
                                else [ac["target_modules"]], bias=ac.get("bias", "none"))
            base = model or ac["base_model_name_or_path"]
        except (ValueError, KeyError, TypeError) as exc:
            raise LoraCliError(f"{cfg_path} is not a valid adapter config ({exc}).") from None
    else:
        base = model or RunConfig().model.name
        lora = RunConfig().replace({k: v for k, v in lora_overrides.items() if v is not None}).lora
    resolved = resolve_model(base, need_weights=False)
    return summary_from_config(resolved.path, lora, base, trust_remote_code)


def param_report(
    adapter_dir: Annotated[Optional[Path], typer.Argument(help="Adapter folder (its base model and LoRA settings).")] = None,
    model: ModelOpt = None,
    lora_r: RankOpt = None,
    lora_alpha: AlphaOpt = None,
    lora_dropout: DropOpt = None,
    target_modules: TargetsOpt = None,
    trust_remote_code: TrustOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the summary as JSON.")] = False,
) -> None:
    """Total, trainable and percent of parameters, with a per-module breakdown."""
    from lora_cli.render import out, param_table

    summary = param_summary(adapter_dir, model, lora_flags(lora_r, lora_alpha, lora_dropout, target_modules),
                            bool(trust_remote_code))
    if as_json:
        typer.echo(json.dumps(summary.to_dict(), indent=2))
        return
    out.print(f"Base model: {summary.base_model}   LoRA: {summary.lora}")
    for t in param_table(summary):
        out.print(t)
    out.print(f"trainable params: {summary.trainable:,} || all params: {summary.total:,} || "
              f"trainable%: {summary.percent:.4f}")


def register(app: typer.Typer, handle_errors) -> None:
    app.command("param-report")(handle_errors(param_report))
