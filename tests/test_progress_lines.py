"""What a run prints outside a terminal (CI logs, pipes): periodic progress lines, and a final line that
agrees with the metrics."""

import io
import json
import re

from rich.console import Console
from typer.testing import CliRunner

from lora_cli.cli import render
from lora_cli.cli.app import app


def test_a_long_stage_outside_a_terminal_says_how_far_it_is_between_its_start_and_end_lines(monkeypatch):
    monkeypatch.setattr(render, "LINE_EVERY_S", 0.0)
    buf = io.StringIO()
    reporter = render.RichReporter(Console(file=buf, force_terminal=False, width=200))
    with reporter.stage("Training", total=3, unit="steps") as bar:
        for loss in (2.5, 2.0, 1.5):
            bar.update(1, loss=loss)
    lines = buf.getvalue().splitlines()
    assert lines[0] == "Training ..."
    assert lines[1].startswith("Training: 1/3 steps, 0 s  loss 2.5000")
    assert lines[3].startswith("Training: 3/3 steps, 0 s  loss 1.5000")
    assert re.fullmatch(r"Training: done in \d+\.\d s, 3 steps  loss 1\.5000", lines[4])


def test_a_stage_shorter_than_the_interval_prints_only_its_start_and_end(monkeypatch):
    monkeypatch.setattr(render, "LINE_EVERY_S", 3600.0)
    buf = io.StringIO()
    with render.RichReporter(Console(file=buf, force_terminal=False, width=200)).stage("Training", 3, "steps") as bar:
        bar.update(1, loss=1.0)
    assert len(buf.getvalue().splitlines()) == 2


def test_the_training_lines_final_loss_is_the_last_logged_one_though_it_is_read_a_step_late(
        tiny_model_dir, data_files, tmp_path):
    train_f, val_f = data_files
    out = tmp_path / "run"
    res = CliRunner().invoke(app, ["train", "--model", str(tiny_model_dir), "--train", str(train_f), "--val", str(val_f),
                                   "-o", str(out), "--max-steps", "4", "--precision", "fp32", "--device", "cpu",
                                   "--quantization", "none", "--max-length", "64", "--max-tokens", "128",
                                   "--lr", "5e-3", "--eval-generate", "0"])
    assert res.exit_code == 0, res.output
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    last = [r for r in rows if r["type"] == "train"][-1]
    assert last["step"] == 4
    done = re.search(r"Training: done in [\d.]+ s, 4 steps\s+loss (\d+\.\d+)", res.output)
    assert done and done.group(1) == f"{last['loss']:.4f}", res.output


def test_a_run_whose_loss_ends_far_above_its_start_is_warned_about_with_the_lr_to_lower(tiny_model_dir, data_files,
                                                                                        tmp_path):
    from lora_cli import faults

    train_f, val_f = data_files
    evals = iter([2.5, 7.5])  # what a diverging run's evaluations measure (the tiny model's loss is flat)
    with faults.inject("train:eval-loss", lambda loss: next(evals, 11.9)):
        res = CliRunner().invoke(app, ["train", "--model", str(tiny_model_dir), "--train", str(train_f), "--val",
                                       str(val_f), "-o", str(tmp_path / "run"), "--epochs", "2", "--precision",
                                       "fp32", "--device", "cpu", "--quantization", "none", "--max-length", "64",
                                       "--max-tokens", "128", "--lr", "3", "--eval-generate", "0"])
    assert res.exit_code == 0, res.output
    text = " ".join(res.output.split())
    assert ("Warning: the eval loss rose from 2.5000 to 11.9000: training diverged, and the adapter written is worse "
            "than none. Try a lower --lr (now 3).") in text, res.output


def test_an_ordinary_run_gets_no_divergence_warning():
    from lora_cli.adapter.record import LoopSummary
    from lora_cli.cli.commands.train import loss_rose

    def summary(first, last, evals):
        return LoopSummary(first, last, evals, [], 10, 100, 1.0)

    assert loss_rose(summary(2.5, 1.4, [2.1, 1.5]), 2e-4) is None
    assert loss_rose(summary(2.25, 2.58, []), 2e-4) is None  # a short run's noise, under 1.5x
    assert "the train loss rose from 2.5000 to 11.9000" in loss_rose(summary(2.5, 11.9, []), 3.0)
    assert "the eval loss rose" in loss_rose(summary(2.5, 11.9, [2.6, 17.9, 11.9]), 3.0)
