"""Flags are generated from the config tree: one per field, named after it, its default shown in --help."""

import re

import pytest
from lora_cli.cli.options import config_fields, field_default, flag_name, select
from typer.testing import CliRunner

from lora_cli.cli.app import app

runner = CliRunner()

RECIPE_DEFAULTS = {"--epochs": "3", "--lr": "2e-4", "--batch-size": "2", "--grad-accum": "2", "--max-length": "512",
                   "--lora-r": "16", "--lora-alpha": "32", "--lora-dropout": "0.05",
                   "--target-modules": "q_proj,v_proj", "--model": "Qwen/Qwen2.5-1.5B-Instruct",
                   "--quantization": "nf4", "--template": "alpaca", "--output": "adapters"}


def _help(command: str) -> str:
    res = runner.invoke(app, [command, "--help"], env={"COLUMNS": "400", "TERMINAL_WIDTH": "400", "NO_COLOR": "1"})
    assert res.exit_code == 0, res.output
    return res.output


def _option_lines(text: str) -> dict[str, str]:
    """{first flag: its help line} from the rendered help."""
    lines = {}
    for line in text.splitlines():
        m = re.match(r"[│|\s]*(--[a-z0-9-]+)", line)
        if m:
            lines[m.group(1)] = line
    return lines


def test_every_config_field_has_a_flag_or_is_declared_set_only():
    with_flags = {f"{s}.{f.name}" for s, f in select(("*",))}
    for section, f in config_fields():
        key = f"{section}.{f.name}"
        assert key in with_flags or f.metadata.get("set_only"), f"{key} has no flag and is not declared --set-only"
        assert f.metadata.get("help"), f"{key} has no help text"
    shown = _option_lines(_help("train"))
    missing = [flag_name(f).split("/")[0] for _, f in select(("*",)) if flag_name(f).split("/")[0] not in shown]
    assert not missing, f"train --help lacks {missing}"


def test_train_help_shows_the_recipe_default_of_every_flag():
    shown = _option_lines(_help("train"))
    for flag, default in RECIPE_DEFAULTS.items():
        assert f"[default: {default}]" in shown[flag], shown[flag]
    for _, f in select(("*",)):
        first = flag_name(f).split("/")[0]
        if field_default(f) is not None:
            assert "[default: " in shown[first], f"{first} shows no default"


def test_flag_names_follow_field_names_unless_the_field_names_another():
    for section, f in config_fields():
        if not f.metadata.get("flag"):
            assert flag_name(f) == "--" + f.name.replace("_", "-")


@pytest.mark.parametrize("command,flags", [
    ("tokenize", ("--train", "--max-length", "--model", "--add-eos")),
    ("validate-data", ("--model", "--template", "--max-length")),
    ("param-report", ("--model", "--lora-r", "--target-modules")),
])
def test_the_other_commands_take_their_settings_from_the_same_tree(command, flags):
    shown = _option_lines(_help(command))
    for flag in flags:
        assert flag in shown and "[default: " in shown[flag] or flag == "--train", (command, flag)


def test_an_unknown_field_pattern_is_a_programming_error():
    with pytest.raises(ValueError, match="no such config field"):
        select(("train.nope",))
