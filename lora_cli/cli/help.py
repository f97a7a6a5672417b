"""--help that fits an 80-column terminal: flags in titled panels, never cut.

Typer's own layout gives each of a flag's names, its type and its `--no-` form a column of
their own, and rich then cuts the longest names with "…" to make room. Here a row has two
cells: the names (`--add-eos / --no-eos`, `--template, -t TEXT`), which never wrap or shrink,
and the help, which wraps and ends with the default. Panels come from each option's
rich_help_panel: the command's arguments and own options first, then the config's panels in HELP_PANELS order.
"""

from __future__ import annotations

import os
from typing import Any

import typer.core

METAVARS = {"int": "INT", "float": "FLOAT", "path": "PATH", "str": "TEXT", "list[str]": "TEXT"}


def names(param: Any, ctx: Any) -> str:
    """`--long, -s METAVAR`, or `--flag / --no-flag` for a boolean with an off switch; an argument's NAME."""
    if isinstance(param, typer.core.TyperArgument):
        return (param.display_name_raw or param.name or "").upper() + ("..." if param.nargs != 1 else "")
    text = ", ".join(sorted(param.opts, key=lambda o: not o.startswith("--")))  # long names first
    if getattr(param, "secondary_opts", None):
        text += " / " + ", ".join(param.secondary_opts)
    if not getattr(param, "is_flag", False):
        kind = (param.display_type_rich(ctx=ctx) or "").strip("<>")
        text += " " + METAVARS.get(kind, kind.upper())
    return text


def default_text(param: Any) -> str | None:
    """The default as the help shows it: the switch that is on for a boolean (a list's is already comma-joined:
    options._shown)."""
    default = param.default
    if getattr(param, "is_flag", False):
        if not param.secondary_opts or default is None:
            return None
        return (param.opts if default else param.secondary_opts)[0].lstrip("-")
    if default is None or getattr(param, "show_default", True) is False:
        return None
    return str(default) or None  # an empty text default says nothing


def _table(params: list[Any], ctx: Any):
    from rich.table import Table
    from rich.text import Text

    table = Table(show_header=False, box=None, padding=(0, 1), expand=True)
    table.add_column(no_wrap=True, min_width=max(len(names(p, ctx)) for p in params), style="bold cyan")
    table.add_column(ratio=1, overflow="fold")
    for param in params:
        help_text = Text((getattr(param, "help", None) or "").replace("\\[", "["))  # escapes for rich markup elsewhere
        default = default_text(param)
        if default is not None:
            help_text.append((" " if help_text else "") + f"[default: {default}]", style="dim")
        table.add_row(Text(names(param, ctx)), help_text)
    return table


class PanelledCommand(typer.core.TyperCommand):
    """A command whose --help groups its options into panels that fit the terminal (see module doc)."""

    def format_help(self, ctx: Any, formatter: Any) -> None:
        from rich.console import Console
        from rich.padding import Padding
        from rich.panel import Panel
        from rich.text import Text

        width = os.environ.get("TERMINAL_WIDTH")
        console = Console(highlight=False, width=int(width) if width and width.isdigit() else None)
        arguments = [names(p, ctx) for p in self.get_params(ctx) if isinstance(p, typer.core.TyperArgument)]
        usage = " ".join([ctx.command_path, self.options_metavar or "[OPTIONS]", *arguments])
        console.print(Padding(Text(f"Usage: {usage}", style="bold"), (1, 1, 0, 1)))
        if self.help:
            paragraphs = [" ".join(p.split()) for p in self.help.split("\n\n")]
            console.print(Padding(Text("\n\n".join(paragraphs)), (1, 1, 1, 1)))
        panels: dict[str, list[Any]] = {}
        for param in self.get_params(ctx):
            default = "Arguments" if isinstance(param, typer.core.TyperArgument) else "Options"
            panels.setdefault(getattr(param, "rich_help_panel", None) or default, []).append(param)
        from lora_cli.config import HELP_PANELS

        order = list(HELP_PANELS.values())
        for title, params in sorted(panels.items(), key=lambda kv: order.index(kv[0]) if kv[0] in order else -1):
            console.print(Panel(_table(params, ctx), title=title, title_align="left", border_style="dim"))
