"""One definition of a loadable adapter folder, asked the same way by every command that reads one."""

import json

import pytest
from helpers import write_jsonl
from typer.testing import CliRunner

from lora_cli.adapter.folder import (
    ADAPTER_CONFIG,
    PICKLED_WEIGHTS,
    RUN_CONFIG,
    check_loadable,
    is_finished,
    lora_settings,
)
from lora_cli.cli.app import app
from lora_cli.config import LoraSettings
from lora_cli.errors import LoraCliError

runner = CliRunner()


def _commands(folder, tmp_path):
    data = write_jsonl(tmp_path / "val.jsonl", [{"instruction": "hi", "output": "there"}])
    return {
        "package": ["package", str(folder), "-o", str(tmp_path / "a.zip")],
        "generate": ["generate", "--adapter", str(folder), "Name three colors."],
        "eval": ["eval", "--adapter", str(folder), "--data", str(data)],
        "merge": ["merge", "--adapter", str(folder), "-o", str(tmp_path / "merged")],
        "chat": ["chat", "--adapter", str(folder)],
    }


def _first_line(output: str) -> str:
    return output.strip().splitlines()[0]


@pytest.mark.parametrize("with_config", [False, True])
def test_a_folder_with_only_pickled_weights_is_refused_by_every_command_with_the_same_message(tmp_path, with_config):
    folder = tmp_path / "adapter"
    folder.mkdir()
    (folder / PICKLED_WEIGHTS).write_bytes(b"not unpickled")
    if with_config:
        (folder / ADAPTER_CONFIG).write_text(json.dumps({"r": 8, "lora_alpha": 16, "target_modules": ["q_proj"],
                                                         "base_model_name_or_path": "x"}))
    messages = {}
    for name, argv in _commands(folder, tmp_path).items():
        res = runner.invoke(app, argv, input="")
        assert res.exit_code == 1, (name, res.output)
        messages[name] = _first_line(res.output)
    assert len(set(messages.values())) == 1, messages
    expected = "safetensors only" if with_config else f"no {ADAPTER_CONFIG}"
    assert expected in next(iter(messages.values()))
    assert not (tmp_path / "a.zip").exists() and not (tmp_path / "merged").exists()


def test_an_unfinished_run_is_refused_by_every_command_with_the_same_message(tmp_path):
    folder = tmp_path / "adapter"
    folder.mkdir()
    (folder / ADAPTER_CONFIG).write_text(json.dumps({"r": 8, "lora_alpha": 16, "target_modules": ["q_proj"]}))
    (folder / "adapter_model.safetensors").write_bytes(b"old weights")
    (folder / RUN_CONFIG).write_text("run:\n  finished: false\n")
    assert is_finished(folder) is False
    messages = set()
    for name, argv in _commands(folder, tmp_path).items():
        res = runner.invoke(app, argv, input="")
        assert res.exit_code == 1, (name, res.output)
        messages.add(_first_line(res.output))
    assert len(messages) == 1 and "has not finished" in messages.pop()


def test_an_interrupted_run_with_checkpoints_but_no_adapter_yet_is_unfinished_for_every_command(tmp_path):
    folder = tmp_path / "run5"
    (folder / "checkpoints" / "step-2").mkdir(parents=True)
    (folder / RUN_CONFIG).write_text("run:\n  finished: false\n")
    commands = {**_commands(folder, tmp_path), "param-report": ["param-report", str(folder)],
                "export": ["export", "--adapter", str(folder), "-o", str(tmp_path / "m.gguf")]}
    messages = {}
    for name, argv in commands.items():
        res = runner.invoke(app, argv, input="")
        assert res.exit_code == 1, (name, res.output)
        messages[name] = res.output.strip()
    assert len(set(messages.values())) == 1, messages
    assert "has not finished" in messages["param-report"] and "--resume" in messages["param-report"]


def _lora_weights(path, rank: int, modules: list[str]) -> None:
    import torch
    from safetensors.torch import save_file

    prefix = "base_model.model.model.layers.0.self_attn"
    save_file({f"{prefix}.{m}.lora_{ab}.weight": torch.zeros((rank, 8) if ab == "A" else (8, rank))
               for m in modules for ab in "AB"}, str(path))


def test_a_peft_folder_without_a_run_config_is_loadable_and_its_lora_settings_read_as_the_config_dataclass(tmp_path):
    folder = tmp_path / "peft"
    folder.mkdir()
    (folder / ADAPTER_CONFIG).write_text(json.dumps({"r": 8, "lora_alpha": 16, "lora_dropout": 0.1,
                                                     "target_modules": ["v_proj", "q_proj"], "bias": "none"}))
    _lora_weights(folder / "adapter_model.safetensors", 8, ["q_proj", "v_proj"])
    assert is_finished(folder) is None
    assert check_loadable(folder) == folder
    assert lora_settings(folder) == LoraSettings(r=8, alpha=16, dropout=0.1, target_modules=["q_proj", "v_proj"])
    (folder / ADAPTER_CONFIG).write_text(json.dumps({"lora_alpha": 16}))
    with pytest.raises(LoraCliError, match="not a valid adapter config"):
        lora_settings(folder)
