"""A step's loss read one step late (lora_cli/train/late_read.py) trains and logs exactly as the immediate read.

The late read runs wherever the optimizer is fused AdamW on one process: on the CPU too, so the
whole suite exercises it. These tests compare it with the immediate read (switched on through
the public `train:begin` fault point) and check the device-side skip it relies on.
"""

import json

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from lora_cli import faults
from lora_cli.cli.app import app
from lora_cli.train.late_read import step_with_skip, supports_late_read

pytestmark = pytest.mark.usefixtures("one_thread")


def _train(model_dir, data_files, out, late: bool):
    train_f, val_f = data_files
    seen = {}

    def choose(loop):
        seen["default"] = loop.late_read
        loop.late_read = late

    args = ["train", "--model", str(model_dir), "--train", str(train_f), "--val", str(val_f), "-o", str(out),
            "--epochs", "2", "--precision", "fp32", "--device", "cpu", "--quantization", "none", "--max-length", "64",
            "--max-tokens", "128", "--lr", "5e-3", "--log-every", "1", "--save-every-steps", "3"]
    with faults.inject("train:begin", choose):
        res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    for row in rows:
        for clock in ("tokens_per_s", "generate_s", "generate_warmup_s"):  # wall-clock
            row.pop(clock, None)
    return rows, load_file(out / "adapter_model.safetensors"), seen["default"]


def test_reading_each_step_one_step_late_logs_the_same_rows_and_trains_the_same_weights(
        tiny_model_dir, data_files, tmp_path):
    late_rows, late_weights, default = _train(tiny_model_dir, data_files, tmp_path / "late", late=True)
    now_rows, now_weights, _ = _train(tiny_model_dir, data_files, tmp_path / "now", late=False)
    assert default is True  # a fused AdamW on one process reads late by default
    train = [r for r in late_rows if r["type"] == "train"]
    assert [r["step"] for r in train] == list(range(1, len(train) + 1)) and len(train) >= 4
    assert train[-1]["loss"] < train[0]["loss"]
    assert late_rows == now_rows
    assert late_weights.keys() == now_weights.keys()
    assert all(torch.equal(late_weights[k], now_weights[k]) for k in late_weights)
    assert any(not torch.equal(v, torch.zeros_like(v)) for k, v in late_weights.items() if "lora_B" in k)


def test_a_step_flagged_on_the_device_leaves_weights_and_optimizer_state_untouched():
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(3, 4))
    opt = torch.optim.AdamW([w], lr=0.1, fused=True)
    w.grad = torch.randn(3, 4)
    before = w.detach().clone()
    step_with_skip(opt, torch.tensor(1.0))
    assert torch.equal(w, before) and float(opt.state[w]["step"]) == 0.0
    assert not hasattr(opt, "found_inf")  # the flag is not left for the next step
    step_with_skip(opt, torch.tensor(0.0))
    assert not torch.equal(w, before) and float(opt.state[w]["step"]) == 1.0


def test_only_a_fused_adamw_on_one_process_outside_fp16_reads_late():
    w = torch.nn.Parameter(torch.zeros(2))
    fused, plain = torch.optim.AdamW([w], fused=True), torch.optim.AdamW([w])
    assert supports_late_read(fused, 1, "bf16") and supports_late_read(fused, 1, "fp32")
    assert not supports_late_read(plain, 1, "bf16")
    assert not supports_late_read(fused, 2, "bf16")
    assert not supports_late_read(fused, 1, "fp16")
