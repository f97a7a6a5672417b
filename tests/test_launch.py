"""Starting several processes: the launcher command, the FSDP settings, and what fails early."""

import pytest
import yaml
from helpers import REPO
from typer.testing import CliRunner

from lora_cli.cli.app import app
from lora_cli.train.launch import launch_command
from lora_cli.train.sharding import LAUNCH_FLAGS

runner = CliRunner()


def _pairs(flags: list[str]) -> dict:
    it = iter(flags)
    return {a.removeprefix("--"): (next(it) if a != "--use_fsdp" else "true") for a in it}


def test_gpus_and_fsdp_become_accelerate_flags_and_leave_the_workers_argv():
    argv = ["train", "--gpus", "2", "--fsdp", "--epochs", "1", "--gpus=2"]
    cmd = launch_command(2, argv, fsdp=True)
    assert cmd[cmd.index("-m", 3) + 1:] == ["lora_cli", "train", "--epochs", "1"]
    assert "--multi_gpu" not in cmd and cmd[cmd.index("--use_fsdp"):][:len(LAUNCH_FLAGS)] == LAUNCH_FLAGS
    plain = launch_command(4, ["train", "--gpus", "4"])
    assert "--multi_gpu" in plain and "--use_fsdp" not in plain and plain[plain.index("--num_processes") + 1] == "4"


def test_the_documented_accelerate_config_says_what_the_fsdp_flag_does():
    conf = yaml.safe_load((REPO / "configs" / "accelerate" / "fsdp-qlora.yaml").read_text())
    assert conf["distributed_type"] == "FSDP"
    flags = _pairs(LAUNCH_FLAGS)
    assert flags.pop("use_fsdp") == "true"
    for key, value in flags.items():
        assert str(conf["fsdp_config"][key]).lower() == value.lower(), key


def test_two_host_config_names_the_main_host():
    conf = yaml.safe_load((REPO / "configs" / "accelerate" / "two-hosts.yaml").read_text())
    assert conf["num_machines"] == 2 and conf["machine_rank"] == 0 and conf["main_process_ip"]


def test_fsdp_without_gpus_fails_early_and_clearly(data_files):
    train = str(data_files[0])  # a real file: a missing one would be refused first, for that
    res = runner.invoke(app, ["train", "--gpus", "2", "--fsdp", "--train", train])
    assert res.exit_code == 1 and "needs CUDA GPUs" in res.output and "Traceback" not in res.output
    res = runner.invoke(app, ["train", "--fsdp", "--train", train])
    assert res.exit_code == 1 and "--gpus N" in res.output


def test_fsdp_from_an_accelerate_config_on_a_cpu_machine_is_refused(tiny_model_dir, data_files, tmp_path, monkeypatch):
    from helpers import tiny_config

    from lora_cli.errors import LoraCliError
    from lora_cli.train.runtime import place

    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    cfg = tiny_config(tiny_model_dir, *data_files, tmp_path / "out")
    with pytest.raises(LoraCliError, match="needs CUDA GPUs"):
        place(cfg)
