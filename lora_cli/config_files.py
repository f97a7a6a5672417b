"""Config files and overrides: a YAML file, `--set section.key=value`, typed flags and the current
dataset's settings layered into one RunConfig (the tree itself lives in config.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lora_cli.config import RunConfig
from lora_cli.errors import LoraCliError


def _read_config_file(path: Path) -> Any:
    """The YAML of a config file as read (not yet validated); LoraCliError naming the file and line."""
    import yaml

    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise LoraCliError(f"Config file {path} does not exist.") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise LoraCliError(f"Cannot read config file {path}: {exc}.") from None
    try:
        return yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise LoraCliError(f"Config file {path}{where}: not valid YAML ({getattr(exc, 'problem', exc)}).") from None


def parse_set_options(items: list[str] | None) -> dict[str, Any]:
    """`--set train.lr=1e-4` strings into a dict of dotted keys; values parsed as YAML scalars."""
    import yaml

    out: dict[str, Any] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or "." not in key:
            raise LoraCliError(f"--set {item!r}: expected section.key=value, e.g. train.lr=1e-4.")
        try:
            out[key.strip()] = yaml.safe_load(value)
        except yaml.YAMLError:
            out[key.strip()] = value
    return out


def build_config(config_file: str | None, sets: list[str] | None, flags: dict[str, Any],
                 base: dict[str, Any] | None = None) -> RunConfig:
    """Defaults < base < config file < --set < explicit flags (None means 'not given').

    `base`: dotted settings under everything the user wrote (the current dataset's data and model
    settings, data/current.py); a key the config file sets, --set or a typed flag wins over it.
    """
    cfg, in_file = RunConfig(), set()
    if config_file:
        raw = _read_config_file(Path(config_file))
        cfg = RunConfig.from_dict(raw, source=str(config_file))
        in_file = {f"{s}.{k}" for s, values in raw.items() if isinstance(values, dict) for k in values}
    overrides = {k: v for k, v in (base or {}).items() if k not in in_file}
    overrides.update(parse_set_options(sets))
    overrides.update({k: v for k, v in flags.items() if v is not None})
    return cfg.replace(overrides) if overrides else cfg
