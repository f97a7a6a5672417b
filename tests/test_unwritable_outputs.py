"""Outputs that cannot be written: a file where a folder should be (or the reverse), a read-only
folder, a full disk, a file larger than the file system allows. Each is one line naming the flag or
path and the cause, exit 1, before any weights load where it can be known then; what was there
(the last good checkpoint, the adapter, the user's files) stays."""

import hashlib
import json
import os
import shutil
import subprocess
import sys
from collections import namedtuple
from pathlib import Path

import pytest
from helpers import make_records, tiny_config, write_jsonl
from typer.testing import CliRunner

from lora_cli.cli.app import app

runner = CliRunner()
HERE = Path(__file__).resolve().parent


@pytest.fixture(scope="module")
def adapter(tmp_path_factory, tiny_model_dir):
    from lora_cli.train.recipe import train

    folder = tmp_path_factory.mktemp("unwritable")
    train_f = write_jsonl(folder / "train.jsonl", make_records(8, seed=1))
    out = folder / "adapters"
    train(tiny_config(tiny_model_dir, train_f, None, out, max_steps=2, max_tokens=128, save_every_steps=1,
                      eval_at_start=False).replace({"model.quantization": "none"}))
    return out


def _commands(model, adapter, data, where: str, zip_name: str = "a.zip") -> list:
    """One command of each kind writing under `where` (a path prefix), by name."""
    return [["train", ["train", "--model", str(model), "--train", str(data), "--quantization", "none",
                       "--device", "cpu", "--max-steps", "1", "--cache-dir", f"{where}/cache", "-o", f"{where}/adapters"]],
            ["tokenize", ["tokenize", "--model", str(model), "--train", str(data), "--cache-dir", f"{where}/cache"]],
            ["merge", ["merge", "--adapter", str(adapter), "--dtype", "fp32", "-o", f"{where}/merged"]],
            ["package", ["package", str(adapter), "-o", f"{where}/{zip_name}"]],
            ["export", ["export", "--adapter", str(adapter), "--outtype", "f32", "-o", f"{where}/model.gguf"]]]


def _one_line_error(res_output: str, exit_code: int) -> str:
    assert exit_code == 1, res_output
    assert "Traceback" not in res_output and "internal error" not in res_output, res_output
    errors = [line for line in res_output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, res_output
    return errors[0]


@pytest.mark.parametrize("kind", ["train", "tokenize", "merge", "package", "export"])
def test_a_file_where_an_output_folder_should_be_is_refused_before_anything_loads(kind, tiny_model_dir, adapter,
                                                                               tmp_path):
    notes = tmp_path / "notes.txt"
    notes.write_text("my notes")
    data = write_jsonl(tmp_path / "train.jsonl", make_records(4))
    (name, args), = [c for c in _commands(tiny_model_dir, adapter, data, "notes.txt") if c[0] == kind]
    res = runner.invoke(app, args)
    line = _one_line_error(res.output, res.exit_code)
    assert "notes.txt is a file, not a folder" in line and ("--output" in line or "--cache-dir" in line or "-o" in line)
    assert "Loading" not in res.output and "Merging" not in res.output
    assert notes.read_text() == "my notes"


@pytest.mark.parametrize("force", [[], ["--force"]])
def test_package_into_an_existing_folder_is_refused_without_offering_force(force, adapter, tmp_path):
    folder = tmp_path / "myfolder"
    folder.mkdir()
    (folder / "keep.txt").write_text("keep me")
    res = runner.invoke(app, ["package", str(adapter), "-o", str(folder), *force])
    line = _one_line_error(res.output, res.exit_code)
    assert f"-o {folder}: is a folder" in line and "--force" not in res.output
    assert [p.name for p in folder.iterdir()] == ["keep.txt"] and (folder / "keep.txt").read_text() == "keep me"


def test_an_output_without_room_for_a_checkpoint_is_refused_before_the_model_loads(tiny_model_dir, tmp_path,
                                                                                  monkeypatch):
    import lora_cli.writable as writable

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(writable.shutil, "disk_usage", lambda path: usage(10**9, 10**9 - 50_000, 50_000))
    data = write_jsonl(tmp_path / "train.jsonl", make_records(4))
    (_, args), = [c for c in _commands(tiny_model_dir, tmp_path, data, "out") if c[0] == "train"]
    res = runner.invoke(app, args)
    line = _one_line_error(res.output, res.exit_code)
    # q_proj and v_proj of the tiny model's 2 layers: 7,168 LoRA parameters (what training reports as
    # trainable) x 12 bytes (fp32 weights and AdamW's two moments)
    assert ("--output out/adapters: not enough space on its device: 49 KiB free, about 84 KiB needed (one "
            "checkpoint of 7,168 LoRA parameters") in line
    assert "Loading" not in res.output and not (tmp_path / "out").exists()


def _digests(folder: Path) -> dict:
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _namespace_command(tmp_path: Path) -> list[str] | None:
    """A shell prefix that runs the worker with ro/ a read-only and full/ a nearly full 1 MiB tmpfs
    (a private mount namespace: root only); None where that cannot be made."""
    if os.geteuid() != 0 or not shutil.which("unshare"):
        return None
    probe = subprocess.run(["unshare", "-m", "--propagation", "private", "true"], capture_output=True)
    if probe.returncode != 0:
        return None
    setup = ("mount -t tmpfs -o size=1m,ro tmpfs ro && mount -t tmpfs -o size=1m tmpfs full && "
             "(dd if=/dev/zero of=full/filler bs=4k 2>/dev/null; truncate -s -20K full/filler) && exec \"$@\"")
    return ["unshare", "-m", "--propagation", "private", "bash", "-c", setup, "worker"]


def test_read_only_full_and_size_limited_outputs_end_in_one_line_for_every_command(tiny_model_dir, adapter,
                                                                                     tmp_path):
    prefix = _namespace_command(tmp_path)
    if prefix is None:
        pytest.skip("needs root and unshare for a read-only and a full tmpfs")
    for name in ("ro", "full", "big"):
        (tmp_path / name).mkdir()
    data = write_jsonl(tmp_path / "train.jsonl", make_records(300, seed=4))  # its cache entry > the size limit
    run = tmp_path / "run"
    shutil.copytree(adapter, run)  # a finished run of 2 steps with its checkpoints, to resume to step 4
    resume = ["train", "--model", str(tiny_model_dir), "--train", str(adapter.parent / "train.jsonl"), "-o", str(run),
              "--resume", "--max-steps", "4", "--save-every-steps", "1", "--quantization", "none", "--device", "cpu",
              "--precision", "fp32", "--max-length", "64", "--max-tokens", "128", "--epochs", "2",
              "--cache-dir", str(adapter.parent / "cache"), "--no-eval-at-start", "--eval-generate", "0",
              "--log-every", "1"]
    before, checkpoints = _digests(run), sorted(os.listdir(run / "checkpoints"))
    assert checkpoints == ["epoch-1", "step-1"]  # the run's 2 steps are its first epoch
    spec = {"phases": [
        {"commands": [[f"ro-{n}", a] for n, a in _commands(tiny_model_dir, adapter, data, "ro")]
         + [[f"full-{n}", a] for n, a in _commands(tiny_model_dir, adapter, data, "full")]},
        {"file_size_limit": 20_000,
         "commands": [[f"big-{n}", a] for n, a in _commands(tiny_model_dir, adapter, data, "big")]
         + [["big-resume", resume]]}]}
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "OMP_NUM_THREADS": "1", "COLUMNS": "200"}
    proc = subprocess.run([*prefix, sys.executable, str(HERE / "unwritable_worker.py"), "spec.json"], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=600)
    lines = [x for x in proc.stdout.splitlines() if x.startswith("RESULTS ")]
    assert lines, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads(lines[0][len("RESULTS "):])
    said = {name: _one_line_error(r["output"], r["exit"]) for name, r in results.items()}
    for name in ("train", "tokenize", "merge", "package", "export"):
        assert said[f"ro-{name}"].endswith(": cannot write in " + str(tmp_path / "ro") + ": Read-only file system.")
        assert "Loading" not in results[f"ro-{name}"]["output"]
        assert ("not enough space on its device" in said[f"full-{name}"]  # known before writing
                or "No space left on the device while writing full/" in said[f"full-{name}"]
                or "full/model.gguf: the write was cut short" in said[f"full-{name}"])  # numpy drops the errno
        assert "big/" in said[f"big-{name}"] and ("File too large." in said[f"big-{name}"]
                                                  or "big/model.gguf: the write was cut short" in said[f"big-{name}"])
    for name in ("train", "merge", "package"):  # their room is estimated before anything loads
        assert "not enough space on its device" in said[f"full-{name}"]
    assert said["big-resume"] == f"error: Could not write {run}/checkpoints/step-3: File too large."
    after = _digests(run)
    kept = ("checkpoints/", "adapter_model")  # the last good checkpoint (epoch-1, step 2) and the adapter stay
    assert {k: v for k, v in after.items() if k.startswith(kept)} == {k: v for k, v in before.items()
                                                                      if k.startswith(kept)}
    assert sorted(os.listdir(run / "checkpoints")) == checkpoints  # and no half-written step-3
    assert not [p for p in (tmp_path / "big").rglob("*") if p.is_file()]  # no half-written output left
