"""Refusals that need no model come before torch loads: a missing data file or --config, and a run the
output folder already holds, each refused by train and tokenize in under a second."""

import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import make_records, write_jsonl
from typer.testing import CliRunner

from lora_cli.cli.app import app

REPO = Path(__file__).resolve().parent.parent
# The command in a fresh process; afterwards it says which heavy libraries it imported.
PROBE = ("import sys; from lora_cli.cli.app import main; sys.argv = ['lora-cli'] + sys.argv[1:]\n"
         "try:\n    main()\nexcept SystemExit as exc:\n    code = exc.code\n"
         "heavy = [m for m in ('torch', 'transformers', 'datasets', 'peft') if m in sys.modules]\n"
         "sys.stderr.write('\\nIMPORTED ' + repr(heavy) + '\\n'); sys.exit(code)")


def refused(args: list[str], cwd: Path) -> tuple[str, float, float]:
    """Run a command that must be refused: (its message, CPU seconds, wall seconds). CPU time is what the
    refusal costs; the wall time also counts other jobs on a busy machine, so it gets a looser bound."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "COLUMNS": "200"}
    before, t0 = resource.getrusage(resource.RUSAGE_CHILDREN), time.perf_counter()
    res = subprocess.run([sys.executable, "-c", PROBE, *map(str, args)], cwd=cwd, env=env, capture_output=True,
                         text=True)
    wall, after = time.perf_counter() - t0, resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    message, _, imported = res.stderr.rpartition("\nIMPORTED ")
    assert res.returncode == 1, res.stderr
    assert imported.strip() == "[]", f"imported {imported.strip()} before refusing"
    assert "Traceback" not in res.stderr and "error:" in message and not message.strip().startswith("Traceback")
    return message.strip(), cpu, wall


@pytest.mark.parametrize("command", ["train", "tokenize"])
@pytest.mark.parametrize("args, says", [
    (["--train", "absent.jsonl"], "error: Data file absent.jsonl does not exist."),
    (["--train", "data/train.jsonl", "--val", "absent.jsonl"], "error: Data file absent.jsonl does not exist."),
    (["--config", "absent.yaml"], "error: Config file absent.yaml does not exist."),
    (["--train", "data/train.jsonl", "--template", "alpacca"],
     "error: Unknown template 'alpacca': not one of alpaca, alpaca-seed, chat and not a file. Did you mean "
     "--template alpaca?"),
])
def test_a_missing_data_file_or_config_is_refused_in_under_a_second(command, args, says, tmp_path):
    (tmp_path / "data").mkdir()
    write_jsonl(tmp_path / "data" / "train.jsonl", make_records(4))
    message, cpu, wall = refused([command, "--model", "smollm2-135m", *args], tmp_path)
    assert message.splitlines()[0] == says
    assert cpu < 1.0 and wall < 5.0, (cpu, wall)


@pytest.mark.parametrize("command", ["train", "tokenize"])
@pytest.mark.parametrize("split", ["--train", "--val"])
def test_an_invalid_record_is_refused_before_torch_loads_naming_file_line_and_field(command, split, tmp_path):
    (tmp_path / "data").mkdir()
    write_jsonl(tmp_path / "data" / "train.jsonl", make_records(4))
    bad = tmp_path / "data" / "bad.jsonl"
    bad.write_text(json.dumps(make_records(1)[0]) + "\n" + json.dumps({"instruction": 5, "output": "x"}) + "\n")
    files = ["--train", "data/bad.jsonl"] if split == "--train" else ["--train", "data/train.jsonl", "--val", "data/bad.jsonl"]
    output = ["--output", "out"] if command == "train" else []
    message, cpu, wall = refused([command, "--model", "smollm2-135m", *files, *output], tmp_path)
    lines = message.splitlines()
    assert lines[0] == "error: data/bad.jsonl has 1 invalid line(s); nothing was tokenized."
    assert any(line.startswith("error data/bad.jsonl:2 [instruction]:") for line in lines), message
    assert cpu < 1.0 and wall < 5.0, (cpu, wall)
    assert not (tmp_path / "out").exists()


def test_a_finished_run_is_refused_in_under_a_second_and_kept(tiny_model_dir, data_files, tmp_path, one_thread):
    train_f, val_f = data_files
    args = ["train", "--model", tiny_model_dir, "--train", train_f, "--val", val_f, "-o", tmp_path / "out",
            "--max-length", "64", "--epochs", "1", "--max-steps", "2", "--precision", "fp32", "--device", "cpu",
            "--quantization", "none", "--eval-generate", "0"]
    res = CliRunner().invoke(app, [str(a) for a in args])
    assert res.exit_code == 0, res.output
    weights = (tmp_path / "out" / "adapter_model.safetensors").read_bytes()
    message, cpu, wall = refused(args, tmp_path)
    assert f"Output folder {tmp_path / 'out'} already holds this run, finished after 2 steps" in message
    assert cpu < 1.0 and wall < 5.0, (cpu, wall)
    assert (tmp_path / "out" / "adapter_model.safetensors").read_bytes() == weights
    message, cpu, _ = refused([*args, "--resume"], tmp_path)  # nothing left to continue: also before torch
    assert "holds a finished run" in message and "nothing to continue" in message and cpu < 1.0
    message, cpu, _ = refused([*args, "--lora-r", "4"], tmp_path)  # another run: also before torch
    assert "holds a different run" in message and "--overwrite" in message and cpu < 1.0


def test_a_changed_data_file_is_left_to_the_full_check_after_tokenizing(tiny_model_dir, data_files, tmp_path,
                                                                        one_thread):
    train_f, val_f = data_files
    args = ["train", "--model", str(tiny_model_dir), "--train", str(train_f), "-o", str(tmp_path / "out"),
            "--max-length", "64", "--epochs", "1", "--max-steps", "1", "--precision", "fp32", "--device", "cpu",
            "--quantization", "none", "--eval-generate", "0"]
    runner = CliRunner()
    assert runner.invoke(app, args).exit_code == 0
    rows = [json.loads(line) for line in train_f.read_text().splitlines()]
    write_jsonl(train_f, rows[:-1])  # the same settings, other data: not "this run"
    res = runner.invoke(app, args)
    assert res.exit_code == 1 and "holds a different run" in res.output and "its content changed" in res.output


def test_merge_into_an_existing_folder_is_refused_before_torch_loads(tmp_path):
    from helpers import write_small_adapter

    write_small_adapter(tmp_path / "adapters", base_model="smollm2-135m")
    (tmp_path / "merged").mkdir()
    (tmp_path / "merged" / "mine.txt").write_text("keep me")
    message, cpu, wall = refused(["merge", "-o", "merged", "--model", "smollm2-135m"], tmp_path)
    assert "error: merged already exists." in message.splitlines()
    assert cpu < 1.0 and wall < 5.0, (cpu, wall)
    assert (tmp_path / "merged" / "mine.txt").read_text() == "keep me"
