"""One writer per output: a second process is refused naming the live one, a dead one's lock is
taken over (and said), a cache entry being built is waited for. Every test runs the lock's other
holder in a real second process."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
from helpers import RecordingReporter, tiny_config
from typer.testing import CliRunner

from lora_cli.cli.app import app
from lora_cli.lock import OutputInUse, exclusive, lock_path, refuse_if_held

runner = CliRunner()
HOLDER = textwrap.dedent("""
    import sys, time
    from lora_cli.lock import exclusive
    with exclusive(sys.argv[1], sys.argv[1], wait=True):
        print("held", flush=True)
        if float(sys.argv[2]) > 0:
            time.sleep(float(sys.argv[2]))
        else:
            sys.stdin.read()  # until the test closes it, or kills this process
""")


@pytest.fixture
def holder():
    """holder(target, seconds=0): a second process that holds target's lock (for `seconds`, or until
    its stdin closes); yields the Popen once it holds it."""
    procs = []

    def start(target, seconds=0.0):
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
        proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(target), str(seconds)], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, text=True, env=env)
        procs.append(proc)
        assert proc.stdout.readline().strip() == "held"
        return proc

    yield start
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
        proc.wait()


def test_a_second_process_is_refused_naming_the_live_one_and_a_dead_ones_lock_is_taken_over(holder, tmp_path):
    target = tmp_path / "adapters"
    first = holder(target)
    owner = json.loads(lock_path(target).read_text())
    assert owner["pid"] == first.pid and owner["host"]
    started = time.monotonic()
    with pytest.raises(OutputInUse, match=rf"Output adapters is in use by another lora-cli process \(pid {first.pid} "):
        with exclusive(target, "Output adapters"):
            pass
    assert time.monotonic() - started < 1.0  # refused at once, not after a wait
    with pytest.raises(OutputInUse, match=f"pid {first.pid} "):
        refuse_if_held(target, "Output adapters")  # the check that takes nothing
    first.send_signal(signal.SIGKILL)  # dies holding it: its lock file stays, naming it
    first.wait()
    refuse_if_held(target, "Output adapters")  # a dead owner holds nothing
    assert json.loads(lock_path(target).read_text())["pid"] == first.pid
    said = RecordingReporter()
    with exclusive(target, "Output adapters", reporter=said) as path:
        assert json.loads(path.read_text())["pid"] == os.getpid()
    assert [m for m in said.messages if f"Took over the lock of {target} from pid {first.pid}" in m]
    assert not lock_path(target).exists()  # a clean release leaves nothing behind
    with exclusive(target, "Output adapters", reporter=said):  # and the next one takes it silently
        pass
    assert len(said.messages) == 1


def test_train_into_a_folder_another_process_writes_is_refused_in_one_line(holder, tiny_model_dir, data_files,
                                                                            tmp_path):
    train_f, val_f = data_files
    out = tmp_path / "same"
    first = holder(out)
    res = runner.invoke(app, ["train", "--model", str(tiny_model_dir), "--train", str(train_f), "-o", str(out),
                              "--quantization", "none", "--device", "cpu", "--max-steps", "1"])
    assert res.exit_code == 1, res.output
    first_line = res.output.strip().splitlines()[0]
    assert first_line.startswith(f"error: Output folder {out} is in use by another lora-cli process (pid {first.pid}")
    assert "Traceback" not in res.output and "Loading" not in res.output
    assert not out.exists()  # nothing written, not even the tokenize cache's data
    assert not (tmp_path / ".lora-cache").exists()


def test_a_live_runs_folder_is_said_to_be_in_use_not_judged_by_what_it_holds_now(holder, tiny_model_dir,
                                                                                  data_files, tmp_path):

    train_f, _ = data_files
    out = tmp_path / "run"
    args = ["train", "--model", str(tiny_model_dir), "--train", str(train_f), "-o", str(out), "--quantization", "none",
            "--device", "cpu", "--precision", "fp32", "--max-length", "64", "--max-tokens", "128", "--epochs", "2",
            "--max-steps", "1", "--eval-generate", "0", "--cache-dir", str(tmp_path / "cache")]
    assert runner.invoke(app, args).exit_code == 0
    first = holder(out)  # that run's folder, written again by a live process
    for extra in ([], ["--resume", "--max-steps", "2"], ["--overwrite"]):
        res = runner.invoke(app, args + extra)
        assert res.exit_code == 1, res.output
        assert res.output.startswith(f"error: Output folder {out} is in use by another lora-cli process (pid {first.pid}")


def test_package_merge_and_export_refuse_an_output_another_process_writes(holder, tiny_model_dir, data_files,
                                                                         tmp_path):
    from lora_cli.train.recipe import train

    train_f, val_f = data_files
    adapter = tmp_path / "adapters"
    train(tiny_config(tiny_model_dir, train_f, None, adapter, max_steps=1, eval_at_start=False)
          .replace({"model.quantization": "none"}))
    for command, dest in ((["package", str(adapter)], "adapter.zip"), (["merge", "--adapter", str(adapter)], "merged"),
                          (["export", "--adapter", str(adapter)], "model.gguf")):
        proc = holder(tmp_path / dest)
        res = runner.invoke(app, [*command, "-o", str(tmp_path / dest)])
        assert res.exit_code == 1, res.output
        assert f"is in use by another lora-cli process (pid {proc.pid}" in res.output.splitlines()[0]
        assert not (tmp_path / dest).exists()
        proc.stdin.close()
        proc.wait()
    res = runner.invoke(app, ["package", str(adapter), "-o", str(tmp_path / "adapter.zip")])
    assert res.exit_code == 0, res.output  # released: the next one writes it


def test_a_tokenize_cache_entry_being_built_is_waited_for_then_used(holder, tiny_model_dir, data_files, tmp_path):
    train_f, _ = data_files
    args = ["tokenize", "--model", str(tiny_model_dir), "--train", str(train_f), "--cache-dir", str(tmp_path / "c")]
    assert runner.invoke(app, args).exit_code == 0
    (entry,) = (tmp_path / "c" / "tokenized").iterdir()
    import shutil

    shutil.rmtree(entry)
    busy = holder(entry, seconds=2.0)  # another process building the same entry
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    assert f"Waiting for pid {busy.pid} " in res.output
    assert (entry / "meta.json").is_file() and not lock_path(entry).exists()


def test_without_flock_the_pid_in_the_lock_file_decides(tmp_path, monkeypatch):
    import errno
    import fcntl
    import socket

    def no_flock(fd, operation):  # some network filesystems: no flock at all
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_flock)
    target = tmp_path / "out"
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    lock_path(target).write_text(json.dumps({"host": socket.gethostname(), "pid": gone.pid}))
    said = RecordingReporter()
    with exclusive(target, "Output out", reporter=said):
        assert f"from pid {gone.pid} " in said.messages[0]  # a dead pid's file is taken over
        with pytest.raises(OutputInUse, match=f"pid {os.getpid()} "):  # a live one's is not
            with exclusive(target, "Output out"):
                pass
    assert not lock_path(target).exists()
