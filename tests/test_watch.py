"""Seeing what training does: the stop rate at each evaluation, the loss-curve picture, plot, trackers, tokenize --show."""

import json
import sys

import pytest
import torch
from helpers import make_records, tiny_config, write_jsonl
from helpers.adapter_factory import data_dir, peaked_model_dir
from safetensors.torch import load_file
from typer.testing import CliRunner

from lora_cli.cli.app import app
from lora_cli.train.recipe import train

pytestmark = pytest.mark.usefixtures("one_thread")
runner = CliRunner()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tiny_model_dir):
    return peaked_model_dir(tmp_path_factory, tiny_model_dir)


def yes_config(model_dir, factory, out, **train):
    train_f, val_f = data_dir(factory)
    settings = dict(epochs=5, lr=2e-2, max_tokens=256) | train
    return tiny_config(model_dir, train_f, val_f, out, **settings).replace({"model.quantization": "none"})


def rows(folder):
    return [json.loads(x) for x in (folder / "metrics.jsonl").read_text().splitlines()]


def test_the_stop_rate_is_measured_at_each_evaluation_and_changes_nothing_else(model_dir, tmp_path_factory, tmp_path):
    probed = train(yes_config(model_dir, tmp_path_factory, tmp_path / "probed", eval_generate=4))
    evals = [r for r in rows(tmp_path / "probed") if r["type"] == "eval"]
    assert len(evals) == 6 and all(r["generated"] == 4 for r in evals)
    assert all(r["max_new_tokens"] == 16 for r in evals)  # 2 x ("yes" + eos), at least 16
    assert evals[0]["stop_rate"] < evals[-1]["stop_rate"] == 1.0  # the records all answer "yes", then eos
    assert evals[-1]["sample"] == "yes" and evals[-1]["sample_stopped"] and evals[-1]["generate_s"] >= 0
    assert probed.decisions.eval_generate_max_new_tokens == 16
    # generating in eval mode and restoring train mode and the RNG leaves training exactly as without it
    plain = train(yes_config(model_dir, tmp_path_factory, tmp_path / "plain", eval_generate=0))
    assert plain.summary.eval_losses == probed.summary.eval_losses
    a, b = load_file(str(tmp_path / "probed" / "adapter_model.safetensors")), \
        load_file(str(tmp_path / "plain" / "adapter_model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert "stop_rate" not in [r for r in rows(tmp_path / "plain") if r["type"] == "eval"][0]


def _colour_share(png, colour) -> float:
    """Share of the image's pixels within a small distance of a colour (the curves are drawn in known colours)."""
    import matplotlib.colors
    import matplotlib.image as mpimg
    import numpy as np

    image = mpimg.imread(str(png))[..., :3]
    target = np.array(matplotlib.colors.to_rgb(colour))
    return float((np.abs(image - target).max(axis=-1) < 0.06).mean())


def test_the_loss_curve_is_a_png_with_both_curves_and_plot_overlays_runs(model_dir, tmp_path_factory, tmp_path):
    import matplotlib

    out = tmp_path / "a"
    train(yes_config(model_dir, tmp_path_factory, out, epochs=2, log_every=1))
    png = out / "loss_curve.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    train_colour, eval_colour = matplotlib.rcParams["axes.prop_cycle"].by_key()["color"][:2]
    assert _colour_share(png, train_colour) > 0.001 and _colour_share(png, eval_colour) > 0.001
    empty = tmp_path / "empty.png"
    from lora_cli.train.curves import MetricsRow, draw

    with pytest.raises(Exception, match="Nothing to draw"):
        draw([("x", [MetricsRow("eval", 0, 0, {})])], empty)
    assert not empty.exists()

    res = runner.invoke(app, ["plot", str(out), str(out / "metrics.jsonl"), "-o", str(tmp_path / "both.png")])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "both.png").read_bytes()[:4] == b"\x89PNG"
    res = runner.invoke(app, ["plot", str(out), "-o", str(tmp_path / "both.png")])
    assert res.exit_code == 1 and "already exists" in res.output and "--force" in res.output
    res = runner.invoke(app, ["plot", str(tmp_path), "-o", str(tmp_path / "c.png")])
    assert res.exit_code == 1 and "has no metrics.jsonl" in res.output


def test_tensorboard_and_mlflow_read_back_what_metrics_jsonl_holds(model_dir, tmp_path_factory, tmp_path):
    pytest.importorskip("tensorboard")
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "a"
    train(yes_config(model_dir, tmp_path_factory, out, epochs=2, eval_generate=2, report_to="tensorboard,mlflow"))
    metrics = rows(out)
    expected = {"train/loss": [(r["step"], r["loss"]) for r in metrics if r["type"] == "train"],
                "eval/loss": [(r["step"], r["eval_loss"]) for r in metrics if r["type"] == "eval"],
                "eval/stop_rate": [(r["step"], r["stop_rate"]) for r in metrics if r["type"] == "eval"]}
    events = EventAccumulator(str(out / "logs" / "tensorboard" / "lora-cli"))
    events.Reload()
    for tag, points in expected.items():
        got = [(e.step, e.value) for e in events.Scalars(tag)]
        assert [s for s, _ in got] == [s for s, _ in points]
        assert [v for _, v in got] == pytest.approx([v for _, v in points], rel=1e-6)  # TensorBoard keeps float32
    client = MlflowClient((out / "logs" / "mlruns").resolve().as_uri())
    (experiment,) = [e for e in client.search_experiments() if e.name == "lora-cli"]
    (run,) = client.search_runs([experiment.experiment_id])
    for tag, points in expected.items():
        history = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, tag))
        assert history == points
    assert run.data.params["lora.r"] == "16" and run.data.params["run.device"] == "cpu"


def test_a_missing_tracker_package_is_one_message_with_the_pip_command(tiny_model_dir, data_files, tmp_path,
                                                                       monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # how Python marks a package that cannot be imported
    train_f, _ = data_files
    res = runner.invoke(app, ["train", "--model", str(tiny_model_dir), "--train", str(train_f), "--device", "cpu",
                              "--report-to", "tensorboard,wandb", "-o", str(tmp_path / "o")])
    assert res.exit_code == 1 and "Traceback" not in res.output
    assert "--report-to wandb needs the wandb package" in res.output
    assert "pip install 'lora-cli[wandb]'" in res.output.replace("\n", "")
    assert "Loading" not in res.output and not (tmp_path / "o").exists()


def test_without_matplotlib_training_keeps_its_adapter_and_plot_says_what_to_install(tiny_model_dir, data_files,
                                                                                    tmp_path, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    train_f, val_f = data_files
    res = runner.invoke(app, ["train", "--model", str(tiny_model_dir), "--train", str(train_f), "--val", str(val_f),
                              "--device", "cpu", "--epochs", "1", "--eval-generate", "0", "-o", str(tmp_path / "o")])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "o" / "adapter_model.safetensors").exists() and not (tmp_path / "o" / "loss_curve.png").exists()
    res = runner.invoke(app, ["plot", str(tmp_path / "o"), "-o", str(tmp_path / "c.png")])
    assert res.exit_code == 1 and "Traceback" not in res.output
    assert "matplotlib is not installed" in res.output and "pip install matplotlib" in res.output


def test_tokenize_show_marks_the_response_and_eos_as_trained_and_the_prompt_as_not(tiny_model_dir, tmp_path):
    record = {"instruction": "translate house into french", "input": "", "output": "the house is red"}
    data = write_jsonl(tmp_path / "train.jsonl", [record] + make_records(3, seed=5))
    res = runner.invoke(app, ["tokenize", "--model", str(tiny_model_dir), "--train", str(data), "--show", "1"])
    assert res.exit_code == 0, res.output
    shown = res.output[res.output.index("example from line 1"):]
    assert "[prompt]### Instruction:\ntranslate house into french\n\n### Response:\n[/prompt]" in shown
    assert "[trained]the house is red<eos>[/trained]" in shown
    assert shown.count("[trained]") == 1 and "example from line 2" not in shown
    res = runner.invoke(app, ["tokenize", "--model", str(tiny_model_dir), "--train", str(data), "--show", "1",
                              "--train-on-prompt", "--no-eos"])
    shown = res.output[res.output.index("example from line 1"):]
    assert "<eos>" not in shown and shown.count("[prompt]") == 1  # only the very first token: nothing predicts it
