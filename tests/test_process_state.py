"""Runs in one Python process do not leak into each other (a notebook, a sweep, the bench harness).

accelerate keeps its precision state process-wide; a second run with another precision used to
fail with "AcceleratorState has already been initialized". The automatic precision depends on
the CPU (bf16 where it computes bf16 natively), so both answers are forced here through
LORA_CLI_CPU_BF16 and the tests mean the same on every machine.
"""

import pytest
from helpers import tiny_config
from typer.testing import CliRunner

from lora_cli.cli.app import app
from lora_cli.model.device import CPU_BF16_ENV, cpu_has_fast_bf16, resolve_precision
from lora_cli.train.recipe import train

runner = CliRunner()


@pytest.mark.parametrize("native_bf16", ["1", "0"])
def test_the_automatic_cpu_precision_follows_the_detection_override(monkeypatch, native_bf16):
    monkeypatch.setenv(CPU_BF16_ENV, native_bf16)
    assert cpu_has_fast_bf16() is (native_bf16 == "1")
    assert resolve_precision("auto", "cpu") == ("bf16" if native_bf16 == "1" else "fp32")


@pytest.mark.parametrize("first", ["auto", "bf16"])
@pytest.mark.parametrize("native_bf16", ["1", "0"])
def test_a_second_run_in_the_same_process_may_use_another_precision(tiny_model_dir, data_files, tmp_path,
                                                                     monkeypatch, first, native_bf16):
    monkeypatch.setenv(CPU_BF16_ENV, native_bf16)
    train_f, val_f = data_files
    runs = []
    for i, precision in enumerate((first, "fp32", first)):
        cfg = tiny_config(tiny_model_dir, train_f, val_f, tmp_path / f"run{i}", epochs=1, max_steps=2,
                          precision=precision, max_tokens=128).replace({"model.quantization": "none"})
        runs.append(train(cfg))
    expected_first = "bf16" if (first == "bf16" or native_bf16 == "1") else "fp32"
    assert [r.decisions.precision for r in runs] == [expected_first, "fp32", expected_first]
    assert all(r.summary.steps == 2 and r.summary.last_loss is not None for r in runs)


def test_the_cli_trains_twice_in_one_process_with_different_precisions(tiny_model_dir, data_files, tmp_path,
                                                                       monkeypatch):
    """The failing sequence of the report: an automatic-precision run (bf16 on this CPU), then --precision fp32."""
    monkeypatch.setenv(CPU_BF16_ENV, "1")
    train_f, val_f = data_files
    common = ["train", "--model", str(tiny_model_dir), "--train", str(train_f), "--val", str(val_f),
              "--max-steps", "1", "--max-length", "64", "--quantization", "none", "--max-tokens", "128"]
    first = runner.invoke(app, [*common, "-o", str(tmp_path / "a")])
    assert first.exit_code == 0, first.output
    assert "(bf16," in first.output
    second = runner.invoke(app, [*common, "-o", str(tmp_path / "b"), "--precision", "fp32"])
    assert second.exit_code == 0, second.output
    assert "(fp32," in second.output
