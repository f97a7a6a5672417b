"""Command-line flags generated from the config tree (config.py), one per field.

A field's flag is its name (`max_length` -> `--max-length`) unless its metadata names another,
its help text is the field's, and --help shows the config's default. Only flags the user typed
become settings (click's parameter source tells them apart); the others come from --config,
--set, or the recipe default, in that order (config_files.build_config). A command declares which fields it takes with
`@config_flags("train.*", "model.name", ...)` and receives the given ones as `settings`, a dict of
dotted keys (`{"train.epochs": 5}`), built by field name.
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from lora_cli.config import HELP_PANELS, RunConfig, flag_for

CONTEXT = "click_context"  # typer hands the command's context to the parameter of this name

ConfigOpt = Annotated[Optional[Path], typer.Option("--config", "-c", help="Run config (YAML); flags override it.")]
SetOpt = Annotated[Optional[list[str]], typer.Option("--set", "-s", help="Override any setting: section.key=value "
                                                                        "(repeatable).")]


@dataclass(frozen=True)
class ConfigField:
    """A field of the run config as its flag sees it: name, default, and what `config.setting` recorded
    (help, flag, short, panel)."""

    name: str
    default: Any
    metadata: dict[str, Any]


def model_fields(model: Any) -> list[ConfigField]:
    """The fields of a pydantic model whose fields are declared with config.setting, in declaration order."""
    return [ConfigField(name, f.get_default(call_default_factory=True), dict(f.json_schema_extra or {}))
            for name, f in model.model_fields.items()]


def config_fields() -> list[tuple[str, ConfigField]]:
    """(section, field) for every field of the run config, in declaration order."""
    return [(section, f) for section, info in RunConfig.model_fields.items() for f in model_fields(info.annotation)]


def flag_name(f: ConfigField) -> str:
    """The flag as typed, e.g. `--max-length`, or `--add-eos/--no-eos` for a bool."""
    return flag_for(f.name, f.metadata)


def _shown(value: Any) -> Any:
    """The default as --help should print it (the value itself is never used: see config_flags)."""
    if isinstance(value, list):
        return ",".join(value)
    if isinstance(value, float) and value and abs(value) < 1e-2:
        mantissa, _, exponent = f"{value:.0e}".partition("e")
        return f"{mantissa}e{int(exponent)}"  # 2e-4, not 0.0002
    return value


def _parameter(section: str, f: ConfigField) -> inspect.Parameter:
    from rich.markup import escape

    decls = [flag_name(f)] + ([f.metadata["short"]] if f.metadata.get("short") else [])
    panel = f.metadata.get("panel") or section
    option = typer.Option(_shown(f.default), *decls, help=escape(f.metadata.get("help", "")),
                          rich_help_panel=HELP_PANELS.get(panel, panel))
    kind = type(f.default) if isinstance(f.default, (bool, int, float)) else str  # str: also paths, lists (a,b)
    return inspect.Parameter(f"{section}__{f.name}", inspect.Parameter.KEYWORD_ONLY, default=option,
                             annotation=Optional[kind])


def select(patterns: tuple[str, ...]) -> list[tuple[str, ConfigField]]:
    """The config fields named by `section.*` or `section.field` patterns, in declaration order."""
    chosen = [(s, f) for s, f in config_fields()
              if f"{s}.*" in patterns or f"{s}.{f.name}" in patterns or "*" in patterns]
    unknown = set(patterns) - {"*"} - {f"{s}.*" for s, _ in chosen} - {f"{s}.{f.name}" for s, f in chosen}
    if unknown:
        raise ValueError(f"no such config field: {', '.join(sorted(unknown))}")
    return chosen


def config_flags(*patterns: str):
    """Give a command one flag per selected config field; it receives the given ones as `settings`.

    The command's own parameters come first in --help; the generated ones follow, grouped in
    panels. `settings` holds only flags the user typed (dotted key -> value): a flag's default would
    hide the --config file's value.
    """
    chosen = select(patterns)
    return lambda fn: _with_flags(fn, "settings", chosen, lambda given: {
        key: value for key, (value, typed) in given.items() if typed})


def model_flags(model: Any, receiver: str):
    """Give a command one flag per field of `model` (a pydantic model declared with config.setting); it
    receives them as `receiver`, an instance of `model` (the defaults where no flag was typed)."""
    chosen = [(receiver, f) for f in model_fields(model)]
    return lambda fn: _with_flags(fn, receiver, chosen, lambda given: model(**{
        key.partition(".")[2]: value for key, (value, _) in given.items()}))


def _with_flags(fn, receiver: str, chosen: list[tuple[str, ConfigField]], build):
    """`fn` with a flag per chosen field after its own parameters; it receives build({dotted key: (value,
    typed by the user)}) as `receiver`. The one flag generator of every command."""
    own = [p for p in inspect.signature(fn, eval_str=True).parameters.values() if p.name != receiver]
    generated = [_parameter(s, f) for s, f in chosen]

    @functools.wraps(fn)
    def command(**kwargs):
        ctx = kwargs.pop(CONTEXT)
        given = {}
        for section, f in chosen:
            name = f"{section}__{f.name}"
            typed = getattr(ctx.get_parameter_source(name), "name", "DEFAULT") != "DEFAULT"
            given[f"{section}.{f.name}"] = (kwargs.pop(name), typed)
        return fn(**{receiver: build(given)}, **kwargs)

    context = inspect.Parameter(CONTEXT, inspect.Parameter.KEYWORD_ONLY, annotation=typer.Context)
    params = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in own] + generated + [context]
    command.__signature__ = inspect.Signature(params)
    command.__annotations__ = {p.name: p.annotation for p in params}
    return command
