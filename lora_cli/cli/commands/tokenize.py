"""`lora-cli tokenize`: the tokenized dataset, cached on disk, reused while nothing changed."""

from __future__ import annotations

import json
from typing import Annotated

import typer

from lora_cli.cli.options import ConfigOpt, SetOpt, config_flags


@config_flags("data.*", "model.name", "model.trust_remote_code")
def tokenize(
    settings: dict,
    force: Annotated[bool, typer.Option("--force", help="Rebuild the cache entries even if they exist.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the cache entries as JSON.")] = False,
    config: ConfigOpt = None,
    set_: SetOpt = None,
) -> None:
    """Tokenize the data (template, response-only labels, eos, truncation) into the on-disk cache.

    What it tokenized becomes the current dataset (.lora-cache/current.json): train, validate-data
    and param-report use it when given no data.
    """
    from lora_cli.cli.render import RichReporter, out, table
    from lora_cli.config import build_config
    from lora_cli.data.prepare import prepare_data
    from lora_cli.model.load import quiet_libraries

    quiet_libraries()
    cfg = build_config(str(config) if config else None, set_, settings)
    data = prepare_data(cfg, RichReporter(), force=force, record=True)
    entries = [e for e in (data.train, data.val) if e is not None]
    if as_json:
        typer.echo(json.dumps([{"split": e.split, "key": e.key, "path": str(e.path), "cache_hit": e.hit,
                                "counts": e.meta.get("counts"), "left_out_lines": e.meta.get("left_out_lines", [])}
                               for e in entries], indent=2))
        return
    rows = []
    for e in entries:
        c = e.meta.get("counts", {})
        rows.append([e.split, "cache hit" if e.hit else "built", c.get("examples"), c.get("tokens"),
                     c.get("targets"), c.get("truncated"), c.get("no_target"), c.get("invalid"), str(e.path)])
    out.print(table(f"tokenize ({cfg.model.name}, template {cfg.data.template}, max length {cfg.data.max_length})",
                    ["split", "status", "examples", "tokens", "target tokens", "truncated", "left out", "skipped",
                     "cache entry"], rows, right=(2, 3, 4, 5, 6, 7)))
    for e in entries:  # left-out examples and warnings: prepare_data told the reporter
        out.print(f"{e.split}: {'cache hit' if e.hit else 'tokenized'} ({e.key})")
    out.print(f"Recorded as the current dataset ({data.current.file}): lora-cli train, validate-data and "
              "param-report use it when given no data.")


def register(app: typer.Typer, handle_errors) -> None:
    app.command("tokenize")(handle_errors(tokenize))
