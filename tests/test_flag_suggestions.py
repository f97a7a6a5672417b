"""An unknown flag is answered with the flag it meant: by meaning for other tools' names, else by spelling."""

import pytest
from typer.testing import CliRunner

from lora_cli.cli.app import app
from lora_cli.cli.suggest import suggestions

runner = CliRunner()


def _said(args: list[str]) -> tuple[int, str]:
    res = runner.invoke(app, args)
    return res.exit_code, " ".join(res.output.replace("│", " ").split())  # the error box unwrapped


@pytest.mark.parametrize("typed, meant", [
    ("--learning-rate", "--lr"),
    ("--learning_rate", "--lr"),
    ("--num-train-epochs", "--epochs"),
    ("--num_train_epochs", "--epochs"),
    ("--per-device-train-batch-size", "--batch-size"),
    ("--gradient-accumulation-steps", "--grad-accum"),
    ("--lora_r", "--lora-r"),
    ("--lora-rank", "--lora-r"),
    ("--lora_alpha", "--lora-alpha"),
    ("--output-dir", "--output"),
    ("--output_dir", "--output"),
    ("--max-seq-length", "--max-length"),
])
def test_train_suggests_the_flag_of_the_same_meaning_for_another_tools_name(typed, meant):
    code, said = _said(["train", typed, "1"])
    assert code == 2
    assert f"No such option: {typed} (Possible options: {meant})" in said


@pytest.mark.parametrize("typed, meant", [("--epcohs", "--epochs"), ("--grad-acum", "--grad-accum"),
                                          ("--max_length", "--max-length"), ("--lora-alhpa", "--lora-alpha")])
def test_a_misspelt_flag_is_still_suggested_by_spelling(typed, meant):
    code, said = _said(["train", typed, "1"])
    assert code == 2 and f"(Possible options: {meant}" in said


def test_the_names_users_bring_for_rank_and_alpha_are_trains_own_flags():
    from typer.main import get_command

    opts = {opt for param in get_command(app).commands["train"].params for opt in param.opts}
    assert {"--lora-r", "--lora-alpha"} <= opts


def test_only_a_flag_the_command_has_is_suggested():
    code, said = _said(["generate", "--learning-rate", "1", "hi"])
    assert code == 2 and "No such option: --learning-rate" in said and "--lr" not in said
    code, said = _said(["generate", "--max_tokens", "5", "hi"])
    assert code == 2 and "(Possible options: --max-new-tokens)" in said


def test_nothing_close_suggests_nothing():
    assert suggestions("--zzzz", ["--epochs", "--lr", "--help"]) == []
