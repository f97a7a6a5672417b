"""All five commands on the embedded model (SmolLM2-135M-Instruct), a few steps, on the CPU."""

import json
import zipfile

import pytest
import yaml
from safetensors.torch import load_file
from typer.testing import CliRunner

from lora_cli.cli.app import app

pytestmark = [pytest.mark.e2e, pytest.mark.slow]
runner = CliRunner()


def run(*args):
    res = runner.invoke(app, list(args))
    assert res.exit_code == 0, res.output
    return res


def test_pipeline_on_the_embedded_model(use_embedded, tmp_path):
    from helpers import REPO

    train_f, val_f = REPO / "sample_data" / "train.jsonl", REPO / "sample_data" / "val.jsonl"
    run("validate-data", str(train_f), str(val_f), "--model", "smollm2-135m")
    first = json.loads(run("tokenize", "--model", "smollm2-135m", "--train", str(train_f), "--val", str(val_f),
                           "--json").stdout)
    second = json.loads(run("tokenize", "--model", "smollm2-135m", "--train", str(train_f), "--val", str(val_f),
                            "--json").stdout)
    assert [e["cache_hit"] for e in second] == [True, True]
    assert [e["key"] for e in first] == [e["key"] for e in second]

    res = run("train", "--model", "smollm2-135m", "--train", str(train_f), "--val", str(val_f), "--epochs", "1",
              "--max-steps", "4", "--log-every", "1", "--lr", "1e-3", "--precision", "fp32", "--eval-generate", "1")
    metrics = [json.loads(x) for x in (tmp_path / "adapters" / "metrics.jsonl").read_text().splitlines()]
    evals = [m["eval_loss"] for m in metrics if m["type"] == "eval"]
    assert evals[-1] < evals[0], metrics  # evaluated first, trained, evaluated again: the loss fell
    # the stop-rate probe generated from the 4-bit model being trained, and training still learned after it
    assert all(m["generated"] == 1 and 0 <= m["stop_rate"] <= 1 for m in metrics if m["type"] == "eval")
    assert "stop rate" in res.output and (tmp_path / "adapters" / "loss_curve.png").is_file()
    weights = load_file(str(tmp_path / "adapters" / "adapter_model.safetensors"))
    assert all(v.abs().sum() > 0 for k, v in weights.items() if "lora_B" in k)  # moved after an evaluation
    assert "Adapter written to adapters" in res.output

    report = json.loads(run("param-report", "adapters", "--json").stdout)
    saved = json.loads((tmp_path / "adapters" / "param_summary.json").read_text())
    assert (report["total"], report["trainable"]) == (saved["total"], saved["trainable"]) == (135_436_608, 921_600)

    run("package", "adapters")
    with zipfile.ZipFile(tmp_path / "adaptermodel.zip") as zf:
        manifest = json.loads(zf.read("MANIFEST.json"))
        assert set(zf.namelist()) == set(manifest["files"]) | {"MANIFEST.json"}
        assert "adapter_model.safetensors" in manifest["files"] and not any("checkpoints" in n for n in zf.namelist())
        assert manifest["base_model"] == "smollm2-135m"
    assert yaml.safe_load((tmp_path / "adapters" / "run_config.yaml").read_text())["model"]["name"] == "smollm2-135m"
