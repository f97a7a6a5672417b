"""`lora-cli param-report`: total, trainable and percent, from an adapter folder or a model's config.

With no argument: ./adapters when it holds an adapter, else the current dataset's model (what
`lora-cli tokenize` recorded last) with the LoRA flags.

Built on the meta device from config.json alone: no weights are loaded or downloaded.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from lora_cli.cli.options import config_flags


def _default_source(settings: dict):
    """No argument: (what is reported, in words; its summary). ./adapters when it holds an adapter and
    no LoRA flag was typed, else the current dataset's model with the LoRA flags."""
    from lora_cli.adapter.folder import check_loadable, summary_for_adapter
    from lora_cli.config import OutputConfig
    from lora_cli.data.current import resolve
    from lora_cli.errors import LoraCliError
    from lora_cli.model.params import summary_for_model

    folder, why = Path(OutputConfig().dir), None
    if not any(k.startswith("lora.") for k in settings):  # LoRA flags ask about a model, not the adapter
        try:
            check_loadable(folder)
            summary = summary_for_adapter(folder, None, bool(settings.get("model.trust_remote_code")))
            return f"Reporting: The adapter in ./{folder}", summary
        except LoraCliError as exc:
            why = exc.message.rstrip(".") if folder.exists() else None
    work = resolve("param-report", settings, detail=why)
    cfg = work.cfg
    return work.said + (f" ({why})" if why else ""), summary_for_model(cfg.model.name, cfg.lora,
                                                                        cfg.model.trust_remote_code)


@config_flags("model.name", "model.trust_remote_code", "lora.*", "data.cache_dir")
def param_report(
    settings: dict,
    adapter_dir: Annotated[Optional[Path], typer.Argument(
        help="Adapter folder or zip (its base model and LoRA settings). [default: ./adapters when it holds an adapter "
             "(and no LoRA flag is given), else --model, else the current dataset's model, with the LoRA flags]",
        show_default=False)] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the summary as JSON.")] = False,
) -> None:
    """Total, trainable and percent of parameters, with a per-module breakdown."""
    from lora_cli.adapter.folder import summary_for_adapter
    from lora_cli.cli.render import err, out, param_table
    from lora_cli.config import RunConfig
    from lora_cli.model.load import quiet_libraries
    from lora_cli.model.params import summary_for_model

    quiet_libraries()
    cfg = RunConfig().replace(settings)
    if adapter_dir is not None:
        from lora_cli.adapter.packaging import adapter_folder

        with adapter_folder(adapter_dir) as folder:  # a packaged zip too
            summary = summary_for_adapter(folder, settings.get("model.name"), cfg.model.trust_remote_code)
    elif "model.name" in settings:
        summary = summary_for_model(cfg.model.name, cfg.lora, cfg.model.trust_remote_code)
    else:
        source, summary = _default_source(settings)
        err.print(source, markup=False, soft_wrap=True)
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
