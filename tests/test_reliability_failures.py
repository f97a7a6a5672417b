"""Failures mid-run end with a message and lose nothing: NaN loss, GPU out of memory, full disk.

Everything runs through the CLI (CliRunner) on the tiny fp32 model; the failure is injected
in-process (a poisoned loss, a raised torch.OutOfMemoryError, a writer that fills the disk
half-way and raises ENOSPC the way each library really does).
"""

import contextlib
import errno
import hashlib
import json
import zipfile
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from lora_cli import faults
from lora_cli.cli.app import app
from lora_cli.train.checkpoint import list_checkpoints, load_checkpoint

runner = CliRunner()
NO_SPACE = "No space left on the device"


pytestmark = pytest.mark.usefixtures("one_thread")


def train_args(model_dir, data_files, out, *extra):
    train_f, val_f = data_files
    return ["train", "--model", str(model_dir), "--train", str(train_f), "--val", str(val_f), "-o", str(out),
            "--epochs", "3", "--precision", "fp32", "--device", "cpu", "--quantization", "none", "--max-length", "64",
            "--max-tokens", "128", "--lr", "5e-3", "--log-every", "1", *extra]


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def assert_message_not_traceback(res, exit_code=1):
    assert res.exit_code == exit_code, res.output
    assert "Traceback" not in res.output and "internal error" not in res.output


def digests(folder, names):
    return {n: hashlib.sha256((folder / n).read_bytes()).hexdigest() for n in names}


# ---- non-finite loss ----------------------------------------------------------------------------
class NaNGradient(torch.autograd.Function):
    """Identity forward (the loss stays finite), NaN backward: fp overflow in the gradients."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * float("nan")


@contextlib.contextmanager
def poison_after_first_checkpoint(out, how):
    """Apply `how` to the micro-batch losses of the first step taken once a checkpoint exists in `out`;
    yields what it records: that step's number."""
    seen, steps = {}, [0]

    def count(_):
        steps[0] += 1

    def poison(loss):
        if "step" not in seen and not list_checkpoints(out):
            return loss
        seen.setdefault("step", steps[0] + 1)
        return how(loss) if seen["step"] == steps[0] + 1 else loss

    with faults.inject("train:step", count), faults.inject("train:loss", poison):
        yield seen


@pytest.mark.parametrize("what, how", [("loss", lambda loss: loss * float("nan")),
                                       ("gradient norm", NaNGradient.apply)])
def test_non_finite_loss_stops_with_the_step_and_keeps_the_last_good_checkpoint(
        tiny_model_dir, data_files, tmp_path, what, how):
    out = tmp_path / "adapters"
    with poison_after_first_checkpoint(out, how) as seen:
        res = invoke(*train_args(tiny_model_dir, data_files, out))
    assert_message_not_traceback(res)
    assert f"The {what} became NaN or infinite at step {seen['step']}" in res.output
    assert [p.name for p in list_checkpoints(out)] == ["epoch-1"] and "epoch-1" in res.output
    ckpt = load_checkpoint(out / "checkpoints" / "epoch-1")
    state, adapter, optim = ckpt.state, ckpt.adapter, ckpt.optimizer
    assert state.step == seen["step"] - 1
    assert all(torch.isfinite(t).all() for t in adapter.values())
    assert all(torch.isfinite(v).all() for s in optim["state"].values() for v in s.values() if torch.is_tensor(v))
    assert not (out / "adapter_model.safetensors").exists()


# ---- out of memory ------------------------------------------------------------------------------
TORCH_OOM = ("CUDA out of memory. Tried to allocate 3.50 GiB. GPU 0 has a total capacity of 79.19 GiB of which "
             "1.02 GiB is free. Including non-PyTorch memory, this process has 78.15 GiB memory in use.")


def test_out_of_memory_in_a_step_names_the_memory_and_the_flags_that_lower_it(tiny_model_dir, data_files, tmp_path):
    steps = [0]

    def count(_):
        steps[0] += 1

    def second_step_runs_out(loss):
        if steps[0] == 1:
            raise torch.OutOfMemoryError(TORCH_OOM)
        return loss

    with faults.inject("train:step", count), faults.inject("train:loss", second_step_runs_out):
        res = invoke(*train_args(tiny_model_dir, data_files, tmp_path / "a", "--batch-size", "4", "--grad-accum", "2"))
    assert_message_not_traceback(res)
    text = " ".join(res.output.split())
    assert "Out of GPU memory at step 2" in text
    assert "The run tried to allocate 3.50 GiB more, with 78.15 GiB already in use, on a GPU of 79.19 GiB." in text
    for lever in ("--max-tokens 64 (packing budget per micro-batch, now 128)", "--batch-size 2 (now 4)",
                  "--max-length 32 (now 64)", "--set train.gradient_checkpointing=on (gradient checkpointing, now off)",
                  "raise --grad-accum (now 2)"):
        assert lever in text, lever


def test_out_of_memory_while_loading_the_model_is_a_message_too(tiny_model_dir, data_files, tmp_path, monkeypatch):
    from lora_cli.model import load as model_load

    def load_model(*args, **kwargs):
        raise torch.OutOfMemoryError(TORCH_OOM)

    monkeypatch.setattr(model_load, "load_model", load_model)
    res = invoke(*train_args(tiny_model_dir, data_files, tmp_path / "a"))
    assert_message_not_traceback(res)
    text = " ".join(res.output.split())
    assert "tried to allocate 3.50 GiB" in text and "--max-length" in text and "--batch-size" in text


# ---- full disk ----------------------------------------------------------------------------------
def no_space():
    return OSError(errno.ENOSPC, "No space left on device")


def safetensors_no_space():
    from safetensors import SafetensorError

    return SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")


ADAPTER_FILES = ("adapter_model.safetensors", "adapter_config.json", "tokenizer.json", "tokenizer_config.json",
                 "param_summary.json")


@pytest.mark.parametrize("error", [no_space, safetensors_no_space])
def test_full_disk_while_saving_the_adapter_keeps_the_previous_one(tiny_model_dir, data_files, tmp_path,
                                                                    monkeypatch, error):
    import peft.peft_model
    from safetensors.torch import save

    out = tmp_path / "adapters"
    args = train_args(tiny_model_dir, data_files, out)
    assert invoke(*args).exit_code == 0
    before = digests(out, ADAPTER_FILES)
    longer = [*args, "--epochs", "4", "--resume"]

    def half_then_full(tensors, filename, metadata=None):
        data = save(tensors, metadata)
        with open(filename, "wb") as fh:
            fh.write(data[: len(data) // 2])
        raise error()

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(peft.peft_model, "safe_save_file", half_then_full)
        res = invoke(*longer, "--save-every-steps", "2")  # the run continued by an epoch, into the same folder
    assert_message_not_traceback(res)
    assert f"{NO_SPACE} while writing {out}" in res.output and "--resume" in " ".join(res.output.split())
    assert digests(out, ADAPTER_FILES) == before  # byte for byte
    assert not [p for p in out.iterdir() if p.name.startswith(".tmp-")]
    assert invoke(*longer).exit_code == 0  # space freed: the adapter is written from the last checkpoint
    assert digests(out, ADAPTER_FILES) != before


def test_full_disk_while_checkpointing_keeps_the_previous_checkpoint(tiny_model_dir, data_files, tmp_path):
    out = tmp_path / "adapters"
    calls = {"n": 0}

    def torch_save(path):
        calls["n"] += 1
        if calls["n"] <= 3:  # the first checkpoint's optimizer, scheduler and rng
            return path
        with open(path, "wb") as fh:  # what torch.save does on a full disk, to the letter
            fh.write(b"PK\x03\x04 half an archive")
        try:
            raise no_space()
        except OSError:
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")

    args = train_args(tiny_model_dir, data_files, out)
    with faults.inject("checkpoint:file", torch_save):
        res = invoke(*args)
    assert_message_not_traceback(res)
    text = " ".join(res.output.split())
    assert f"{NO_SPACE} while writing {out / 'checkpoints' / 'epoch-2'}" in text and "--resume" in text
    assert [p.name for p in list_checkpoints(out)] == ["epoch-1"]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["epoch-1"]
    load_checkpoint(out / "checkpoints" / "epoch-1")
    assert invoke(*args, "--resume").exit_code == 0


@pytest.fixture
def adapter(tmp_path):
    """A small adapter whose config agrees with its weights (package checks that), ~50 kB of weights."""
    from helpers import write_small_adapter

    folder = write_small_adapter(tmp_path / "adapters", features=784)
    (folder / "tokenizer.json").write_bytes(bytes(range(256)))
    return folder


def test_full_disk_while_zipping_keeps_the_previous_zip(adapter, tmp_path):
    dest = tmp_path / "adaptermodel.zip"
    assert invoke("package", adapter, "-o", dest).exit_code == 0
    before = dest.read_bytes()
    real_write = zipfile.ZipFile.write
    calls = {"n": 0}

    def write(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise no_space()
        return real_write(self, *args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(zipfile.ZipFile, "write", write)
        res = invoke("package", adapter, "-o", dest, "--force")
    assert_message_not_traceback(res)
    assert f"{NO_SPACE} while writing {dest}" in res.output and "previous adaptermodel.zip is intact" in res.output
    assert dest.read_bytes() == before and not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]
    assert invoke("package", "--verify", dest).exit_code == 0


def tokenize_args(model_dir, train_f):
    return ["tokenize", "--model", str(model_dir), "--train", str(train_f), "--cache-dir", "cache", "--json"]


def entry_files(tmp_path):
    return {str(p.relative_to(tmp_path)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted((tmp_path / "cache").rglob("*")) if p.is_file()}


def test_full_disk_while_saving_the_tokenize_cache_keeps_the_previous_entry(tiny_model_dir, data_files, tmp_path,
                                                                          monkeypatch):
    from datasets import Dataset

    args = tokenize_args(tiny_model_dir, data_files[0])
    assert invoke(*args).exit_code == 0
    before = entry_files(tmp_path)

    def save_to_disk(self, path, *a, **k):
        Path(path).mkdir(parents=True)
        (Path(path) / "data-00000-of-00001.arrow").write_bytes(b"half an arrow file")
        raise no_space()

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(Dataset, "save_to_disk", save_to_disk)
        res = invoke(*args, "--force")
    assert_message_not_traceback(res)
    assert NO_SPACE in res.output
    assert entry_files(tmp_path) == before
    res = invoke(*args)
    assert res.exit_code == 0 and json.loads(res.stdout)[0]["cache_hit"]


def test_full_disk_inside_datasets_arrow_writer_is_a_message(tiny_model_dir, data_files, tmp_path, monkeypatch):
    """datasets wraps the writer's OSError in DatasetGenerationError; the user still reads 'no space'."""
    import datasets.arrow_writer

    def finalize(self, *args, **kwargs):
        raise no_space()

    monkeypatch.setattr(datasets.arrow_writer.ArrowWriter, "finalize", finalize)
    res = invoke(*tokenize_args(tiny_model_dir, data_files[0]))
    assert_message_not_traceback(res)
    assert NO_SPACE in res.output and not [p for p in (tmp_path / "cache" / "tokenized").iterdir()]


@pytest.mark.parametrize("precision, hint", [
    ("fp16", "Try a lower --lr, or --precision bf16 (or fp32) instead of fp16."),
    ("bf16", "Try a lower --lr, or --precision fp32."),
    ("fp32", "Try a lower --lr."),
])
def test_the_non_finite_hint_fits_the_runs_precision(precision, hint):
    from types import SimpleNamespace

    from lora_cli.train import loop

    run = SimpleNamespace(placement=SimpleNamespace(precision=precision), last_checkpoint=None)
    message = loop.TrainingLoop._nonfinite_message(run, 7)
    assert message.startswith("The loss became NaN or infinite at step 7") and message.endswith(hint)
