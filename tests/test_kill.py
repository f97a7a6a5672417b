"""SIGKILL at named points inside every writer (tokenize cache, checkpoints, adapter folder, zip).

Each command runs as `python -m lora_cli ...` in a subprocess that the test hook
LORA_CLI_TEST_KILL_AT (lora_cli/faults.py: a named fault point) kills with SIGKILL at an exact point.
Afterwards nothing half-written is read as valid, and running the command again succeeds; for
training, the resumed run ends equal to an uninterrupted one.
"""

import json
import os
import signal
import subprocess
import sys
import zipfile

import pytest
import torch
from helpers import make_records, write_jsonl
from safetensors.torch import load_file
from typer.testing import CliRunner

from lora_cli.atomic import TMP_PREFIX
from lora_cli.faults import KILL_ENV
from lora_cli.cli.app import app
from lora_cli.train.checkpoint import list_checkpoints, load_checkpoint

pytestmark = pytest.mark.slow  # each test runs lora-cli processes and kills them
runner = CliRunner()
KILLED = -signal.SIGKILL


def lora(cwd, *args, kill_at=None, timeout=240):
    """`lora-cli ARGS` in a fresh process (single-threaded torch: fast and deterministic)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "LORA_CLI_HOME": str(cwd / "home"), "COLUMNS": "200"}
    env.pop(KILL_ENV, None)
    if kill_at:
        env[KILL_ENV] = kill_at
    return subprocess.run([sys.executable, "-m", "lora_cli", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)


def invoke(*args):
    res = runner.invoke(app, [str(a) for a in args])
    return res


def temporaries(folder):
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(TMP_PREFIX)) if folder.is_dir() else []


# ---- tokenize ---------------------------------------------------------------------------------
@pytest.mark.parametrize("point, existing", [("tokenize:rows", False), ("dir-swap:*", True)])
def test_killed_tokenize_leaves_no_entry_and_runs_again(tiny_model_dir, tmp_path, point, existing):
    train = write_jsonl(tmp_path / "big.jsonl", make_records(1200))  # > 1000: the generator flushes mid-file
    args = ["tokenize", "--model", str(tiny_model_dir), "--train", str(train), "--cache-dir", "cache"]
    entries = tmp_path / "cache" / "tokenized"
    if existing:  # --force rebuilds over a complete entry: killed between setting it aside and renaming
        assert invoke(*args).exit_code == 0
    proc = lora(tmp_path, *args, *(["--force"] if existing else []), kill_at=point)
    assert proc.returncode == KILLED, proc.stderr[-2000:]
    assert temporaries(entries), "the kill should have left a temporary behind"
    # no entry to trust; the killed writer's lock file stays, held by nobody
    assert [p for p in entries.iterdir() if not p.name.startswith(TMP_PREFIX) and p.suffix != ".lock"] == []
    res = invoke(*args, "--json")
    assert res.exit_code == 0, res.output
    [entry] = json.loads(res.stdout)
    assert not entry["cache_hit"] and entry["counts"]["examples"] == 1200
    assert temporaries(entries) == []  # the killed writer's leftovers are cleaned up
    assert not list(entries.glob(".*.lock"))  # its lock taken over, then released


# ---- train --------------------------------------------------------------------------------------
def train_args(model_dir, data_dir, out):
    return ["train", "--model", str(model_dir), "--train", str(data_dir / "train.jsonl"),
            "--val", str(data_dir / "val.jsonl"), "-o", str(out), "--epochs", "3", "--precision", "fp32",
            "--device", "cpu", "--quantization", "none", "--max-length", "64", "--max-tokens", "128",
            "--lr", "5e-3", "--log-every", "1", "--cache-dir", "cache"]


def metrics(folder):
    rows = [json.loads(x) for x in (folder / "metrics.jsonl").read_text().splitlines()]
    for row in rows:
        row.pop("tokens_per_s", None)  # wall-clock
        row.pop("generate_s", None)  # wall-clock too: the stop-rate probe's time
        row.pop("generate_warmup_s", None)
    return rows


def assert_same_run(a, b):
    wa, wb = load_file(str(a / "adapter_model.safetensors")), load_file(str(b / "adapter_model.safetensors"))
    assert wa.keys() == wb.keys()
    assert max((wa[k] - wb[k]).abs().max().item() for k in wa) <= 1e-6
    ma, mb = metrics(a), metrics(b)
    assert [(r["type"], r["step"]) for r in ma] == [(r["type"], r["step"]) for r in mb]
    for ra, rb in zip(ma, mb):
        assert ra.keys() == rb.keys()
        for key in ra:
            assert ra[key] == pytest.approx(rb[key], abs=1e-6), (key, ra, rb)


@pytest.fixture
def reference(tiny_model_dir, data_files, tmp_path):
    """The uninterrupted run, in this process with one thread like the subprocesses."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        res = invoke(*train_args(tiny_model_dir, data_files[0].parent, tmp_path / "reference"))
    finally:
        torch.set_num_threads(threads)
    assert res.exit_code == 0, res.output
    return tmp_path / "reference"


def test_train_killed_in_a_checkpoint_then_in_the_final_save_resumes_to_the_same_adapter(
        tiny_model_dir, data_files, tmp_path, reference):
    out = tmp_path / "adapters"
    args = train_args(tiny_model_dir, data_files[0].parent, out)

    # 1. killed after epoch 1, while writing the epoch-2 checkpoint (its metrics rows already written)
    proc = lora(tmp_path, *args, kill_at="checkpoint:partial#2")
    assert proc.returncode == KILLED, proc.stderr[-2000:]
    assert [p.name for p in list_checkpoints(out)] == ["epoch-1"]
    assert any(n.startswith(".tmp-epoch-2") for n in temporaries(out / "checkpoints"))
    assert load_checkpoint(out / "checkpoints" / "epoch-1").state.epoch == 1
    assert not (out / "adapter_model.safetensors").exists()
    assert len(metrics(out)) > load_checkpoint(out / "checkpoints" / "epoch-1").state.metrics_lines  # rows to drop
    res = invoke(*args)  # the same command again: told to resume, nothing touched
    assert res.exit_code == 1 and "--resume" in res.output

    # 2. resumed, then killed after the first final file was renamed into the folder
    proc = lora(tmp_path, *args, "--resume", kill_at="adapter:renaming")
    assert proc.returncode == KILLED, proc.stderr[-2000:]
    assert (out / "adapter_config.json").exists() and not (out / "tokenizer.json").exists()
    res = invoke("package", out, "-o", tmp_path / "a.zip")
    assert res.exit_code == 1 and "not finished" in res.output and not (tmp_path / "a.zip").exists()

    # 3. resumed again: finishes, equal to the run that was never interrupted
    proc = lora(tmp_path, *args, "--resume")
    assert proc.returncode == 0, proc.stderr[-3000:]
    said = next(line for line in proc.stdout.splitlines() if line.startswith("Resumed from "))
    assert "the run is at step" in said and "this command trained for" in said  # counts vs this command's time
    assert temporaries(out) == [] and temporaries(out / "checkpoints") == []
    assert_same_run(out, reference)
    assert invoke("package", out, "-o", tmp_path / "a.zip").exit_code == 0
    assert invoke("package", "--verify", tmp_path / "a.zip").exit_code == 0


# ---- package ------------------------------------------------------------------------------------
@pytest.fixture
def adapter(tmp_path):
    folder = tmp_path / "adapters"
    folder.mkdir()
    (folder / "adapter_model.safetensors").write_bytes(os.urandom(300_000))
    (folder / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": "m", "r": 4}))
    (folder / "tokenizer.json").write_text("{}")
    return folder


@pytest.mark.parametrize("point", ["zip:partial", "file:*.zip"])
def test_killed_package_keeps_the_previous_zip(adapter, tmp_path, point):
    dest = tmp_path / "adaptermodel.zip"
    assert invoke("package", adapter, "-o", dest).exit_code == 0
    before = dest.read_bytes()
    (adapter / "adapter_model.safetensors").write_bytes(os.urandom(300_000))  # a new adapter to pack
    proc = lora(tmp_path, "package", str(adapter), "-o", str(dest), "--force", kill_at=point)
    assert proc.returncode == KILLED, proc.stderr[-2000:]
    assert dest.read_bytes() == before and invoke("package", "--verify", dest).exit_code == 0
    assert temporaries(tmp_path)  # the half-written zip is there, under a name nothing reads
    assert invoke("package", adapter, "-o", dest, "--force").exit_code == 0
    assert temporaries(tmp_path) == []
    with zipfile.ZipFile(dest) as zf:
        assert zf.read("adapter_model.safetensors") == (adapter / "adapter_model.safetensors").read_bytes()
    assert invoke("package", "--verify", dest).exit_code == 0


# ---- Ctrl-C -------------------------------------------------------------------------------------
def test_ctrl_c_saves_a_checkpoint_prints_the_resume_command_and_exits_130(tiny_model_dir, data_files, tmp_path):
    import shlex
    import time

    out = tmp_path / "adapters"
    args = train_args(tiny_model_dir, data_files[0].parent, out)
    args[args.index("--epochs") + 1] = "12"  # long enough to be caught in the middle
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "LORA_CLI_HOME": str(tmp_path / "home"),
           "COLUMNS": "300"}
    env.pop(KILL_ENV, None)
    proc = subprocess.Popen([sys.executable, "-m", "lora_cli", *args], cwd=tmp_path, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 180
    while not list_checkpoints(out) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGINT)  # what Ctrl-C sends
    stdout, stderr = proc.communicate(timeout=180)
    assert proc.returncode == 130, stderr[-3000:]
    assert "Traceback" not in stderr and "checkpoint saved to" in stderr
    lines = stderr.splitlines()
    command = lines[lines.index("Resume with:") + 1].strip()
    assert command == shlex.join(["lora-cli", *args, "--resume"])
    stopped = list_checkpoints(out)[-1]
    step = load_checkpoint(stopped).state.step
    assert step > 0 and not (out / "adapter_model.safetensors").exists()

    resumed = subprocess.run([sys.executable, "-m", "lora_cli", *shlex.split(command)[1:]], cwd=tmp_path, env=env,
                             capture_output=True, text=True, timeout=240)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"Resuming from {stopped}" in resumed.stdout + resumed.stderr
    import yaml

    saved = yaml.safe_load((out / "run_config.yaml").read_text())
    assert saved["run"]["finished"] and saved["run"]["summary"]["steps"] > step
    assert (out / "adapter_model.safetensors").exists()
