"""Flags are generated from the config tree: one per field, named after it, its default shown in --help."""

import ast
import re
from pathlib import Path
from typing import Literal, get_args, get_origin

import pytest
from typer.testing import CliRunner

from lora_cli.cli.options import config_fields, flag_name, select
from lora_cli.config import RunConfig

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


def test_every_config_field_has_a_flag_and_help():
    with_flags = {f"{s}.{f.name}" for s, f in select(("*",))}
    for section, f in config_fields():
        key = f"{section}.{f.name}"
        assert key in with_flags, f"{key} has no flag"
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
        if f.default is not None:
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
    defaults = {flag_name(f).split("/")[0]: f.default for _, f in config_fields()}
    for flag in flags:
        assert flag in shown, (command, flag)
        # a field without a default (--train) shows none; every other shows the tree's
        assert ("[default: " in shown[flag]) == (defaults[flag] is not None), (command, flag, shown[flag])


def test_an_unknown_field_pattern_is_a_programming_error():
    with pytest.raises(ValueError, match="no such config field"):
        select(("train.nope",))


# Flags of other programs that lora-cli's messages and command lines spell out.
OTHER_PROGRAMS = {
    "--logdir": "tensorboard", "--backend-store-uri": "mlflow", "--no-deps": "pip",
    "--multi_gpu": "accelerate launch", "--num_processes": "accelerate launch", "--num_machines": "accelerate launch",
    "--mixed_precision": "accelerate launch", "--dynamo_backend": "accelerate launch",
    "--config_file": "accelerate launch",
}
FLAG = re.compile(r"(?<![\w-])--[a-z][a-z0-9_-]*[a-z0-9]")


def _every_flag() -> set[str]:
    import typer.main

    flags = {"--help"}

    def walk(command):
        for param in command.params:
            flags.update(param.opts + param.secondary_opts)
        for sub in getattr(command, "commands", {}).values():
            walk(sub)

    walk(typer.main.get_command(app))
    return flags


def _docstrings(tree: ast.AST) -> set[int]:
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                out.add(id(first.value))
    return out


def test_every_flag_a_message_names_exists():
    """Errors, hints, messages and help name flags; each must be a flag of some lora-cli command."""
    from lora_cli.train.sharding import LAUNCH_FLAGS

    accelerate_fsdp = {a for a in LAUNCH_FLAGS if a.startswith("--")}
    flags, wrong = _every_flag() | accelerate_fsdp, []
    for path in sorted((Path(__file__).resolve().parent.parent / "lora_cli").rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        skip = _docstrings(tree)  # docstrings speak to developers
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in skip:
                wrong += [f"{path.name}:{node.lineno}: {m}" for m in FLAG.findall(node.value)
                          if m not in flags and m not in OTHER_PROGRAMS]
    assert not wrong, "messages name flags that no command has:\n" + "\n".join(wrong)


def _flags_and_defaults(command: str) -> list[tuple[str, str | None]]:
    import typer.main

    from lora_cli.cli.help import default_text

    cmd = typer.main.get_command(app).commands[command]
    return [(name, default_text(p)) for p in cmd.params for name in p.opts + getattr(p, "secondary_opts", [])
            if name.startswith("-")]


@pytest.mark.parametrize("command", ["train", "tokenize", "validate-data", "param-report", "generate", "chat", "eval",
                                     "merge", "export", "package", "plot"])
def test_help_at_80_columns_shows_every_flag_name_and_default_whole(command):
    res = runner.invoke(app, [command, "--help"], env={"COLUMNS": "80", "TERMINAL_WIDTH": "80", "NO_COLOR": "1"})
    assert res.exit_code == 0, res.output
    lines = res.output.splitlines()
    assert max(len(line) for line in lines) <= 80 and "…" not in res.output
    words = set(" ".join(lines).replace(",", " ").replace("│", " ").split())
    flowing = " ".join(" ".join(line.strip("│ ").split()) for line in lines)  # a default may wrap onto the next line
    for name, default in _flags_and_defaults(command):
        assert name in words, f"{command} --help cuts {name}"
        if default is not None:
            assert f"[default: {default}]" in flowing, f"{command} --help cuts the default of {name}"


def test_train_help_groups_its_flags_into_panels_and_shows_booleans_as_on_and_off_switches():
    text = _help("train")
    titles = re.findall(r"╭─ (\w+) ", text)
    assert titles == ["Options", "Data", "Model", "LoRA", "Optimisation", "Schedule", "Evaluation", "Output", "Speed"]
    shown = _option_lines(text)
    assert "--add-eos / --no-eos" in shown["--add-eos"] and "<bool>" not in text
    assert re.search(r"--resume\s{2,}Continue", shown["--resume"])  # a plain switch takes no value


def _choices(annotation) -> tuple[str, ...]:
    """The values of a Literal type, also inside Annotated[...]; () for any other type."""
    if get_origin(annotation) is Literal:
        return tuple(get_args(annotation))
    return next((c for c in map(_choices, get_args(annotation)) if c), ())


def test_every_choice_a_setting_allows_is_named_in_its_help():
    shown = _option_lines(_help("train"))
    checked = 0
    for section, f in select(("*",)):
        for choice in _choices(RunConfig.model_fields[section].annotation.model_fields[f.name].annotation):
            assert choice in shown[flag_name(f).split("/")[0]], (f.name, choice)
            checked += 1
    assert checked > 10  # the Literal choices were found


@pytest.mark.parametrize("command, usage", [("check-export", "check-export [OPTIONS] ARTIFACT"),
                                            ("plot", "plot [OPTIONS] RUNS..."), ("train", "train [OPTIONS]")])
def test_help_usage_names_arguments_as_their_panel_does_and_shows_no_markup_escapes(command, usage):
    text = _help(command)
    assert usage in text.splitlines()[1] and "{" not in text.splitlines()[1]
    assert "\\[" not in text and "[default: ]" not in text


def test_the_top_level_help_shows_its_switches_as_switches():
    res = CliRunner().invoke(app, ["--help"], env={"COLUMNS": "120"})
    assert res.exit_code == 0 and "--version" in res.output and "--help" in res.output
    assert "<bool>" not in res.output
