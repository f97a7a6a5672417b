"""The recipe object and its typed seams: observers see the run, the run record and cache metadata read back."""

import json
from dataclasses import asdict

import pytest
import yaml
from helpers import tiny_config

from lora_cli.adapter.folder import read_saved_run
from lora_cli.adapter.record import RunRecord
from lora_cli.config import DataConfig
from lora_cli.train.observe import Observer
from lora_cli.train.recipe import LoRARecipe


class Seen(Observer):
    def __init__(self):
        self.rows, self.evals, self.ends = [], 0, []

    def on_eval(self, model):
        self.evals += 1
        return {"seen_by": "test"}

    def on_row(self, row):
        self.rows.append(dict(row))

    def on_end(self, finished):
        self.ends.append(finished)


def test_an_added_observer_sees_every_metrics_row_and_adds_to_each_evaluation(tiny_model_dir, data_files, tmp_path):
    out = tmp_path / "adapter"
    seen = Seen()
    with LoRARecipe(tiny_config(tiny_model_dir, *data_files, out, epochs=2, lr=5e-3, max_tokens=256)) as recipe:
        recipe.setup()
        recipe.observers.append(seen)
        recipe.train()
        result = recipe.finish()
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert seen.rows == rows and seen.evals == 3  # at the start and after each epoch
    assert all(r["seen_by"] == "test" for r in rows if r["type"] == "eval")
    assert seen.ends == [True]  # told once, by finish()
    assert result.summary.last_loss < result.summary.first_loss


def test_the_run_record_is_what_run_config_yaml_holds_and_reads_back(tiny_model_dir, data_files, tmp_path):
    out = tmp_path / "adapter"
    with LoRARecipe(tiny_config(tiny_model_dir, data_files[0], None, out, epochs=1, max_tokens=256)) as recipe:
        recipe.setup()
        recipe.train()
        result = recipe.finish()
    raw = yaml.safe_load((out / "run_config.yaml").read_text())["run"]
    record = read_saved_run(out).run
    assert record.finished and record.summary == result.summary and record.decisions == result.decisions
    assert record.to_dict() == raw and list(record.to_dict()) == list(raw)  # the same keys, in the same order


def test_a_run_record_of_an_older_version_takes_defaults_for_what_it_lacks_and_keeps_no_other_decisions():
    record = RunRecord.from_dict({"fingerprint": "abc", "finished": True, "device": "cpu", "base_model": None})
    assert (record.fingerprint, record.finished, record.decisions) == ("abc", True, None)
    assert record.tokenize_cache == {} and record.base_model == {} and record.summary is None
    with pytest.raises(TypeError, match="not a mapping"):
        RunRecord.from_dict(["fingerprint"])


def test_an_older_run_config_reads_with_todays_defaults_for_new_settings_and_without_removed_ones(tmp_path):
    (tmp_path / "run_config.yaml").write_text(yaml.safe_dump({
        "data": {"template": "chat", "max_length": 256, "retired_setting": 1}, "model": {"name": "tiny"},
        "lora": {"r": 4}, "train": {"epochs": 2}, "run": {"fingerprint": "abc", "finished": True}}))
    saved = read_saved_run(tmp_path)
    assert (saved.data.template, saved.data.max_length, saved.data.add_eos) == ("chat", 256, DataConfig().add_eos)
    assert "retired_setting" not in saved.settings()["data"] and saved.train.epochs == 2 and saved.run.finished
    assert list(saved.settings()) == ["data", "model", "lora", "train"]
    (tmp_path / "run_config.yaml").write_text("data: [not, a, section]\n")
    assert read_saved_run(tmp_path) is None  # damaged: read as no run config (check_loadable: not finished)


def test_the_out_of_memory_message_names_each_lever_at_its_current_value_and_a_smaller_one():
    from lora_cli.train.oom import StepMemory, oom_message

    class OutOfMemoryError(Exception):
        pass

    exc = OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of 79.2 GiB")
    text = oom_message(exc, StepMemory(3, True, 4096, 4, 2048, 2, -1))
    assert text.startswith("Out of GPU memory at step 3. The run tried to allocate 2.00 GiB more, on a GPU of 79.2 GiB.")
    assert "--max-tokens 2048 (packing budget per micro-batch, now 4096)" in text and "--batch-size 2 (now 4)" in text
    assert "gradient_checkpointing" not in text  # every layer is checkpointed already
    assert "raise --grad-accum (now 2)" in text and "\n" not in text
    assert " at step" not in oom_message(exc)  # outside a step: the levers without values


def test_a_checkpoint_state_of_the_unnamed_layout_resumes_with_its_losses_and_sharding():
    from lora_cli.train.checkpoint import LoopState

    old = {"step": 4, "epoch": 1, "window_steps": 2, "fingerprint": "abc", "total_steps": 8,
           "extra": {"summary": {"first_loss": 3.0, "last_loss": 2.0, "eval_losses": [2.5]}, "fsdp": True}}
    state = LoopState.from_dict(old)
    assert (state.step, state.first_loss, state.last_loss, state.eval_losses, state.fsdp) == (4, 3.0, 2.0, [2.5], True)
    assert state.stop_rates == [] and LoopState.from_dict({"step": 1, "extra": {}}).fsdp is False
    today = LoopState(step=3, eval_losses=[1.0], stop_rates=[[1, 2]])
    assert LoopState.from_dict(asdict(today)) == today


def test_a_loop_summary_reads_back_as_written_and_as_older_versions_wrote_it():
    from lora_cli.adapter.record import BestEvaluation, LoopSummary

    today = LoopSummary(3.0, 2.0, [2.5], [[1, 2]], 4, 100, 1.5, {"train": "k"}, BestEvaluation(2, 2.5, "step-2", True, 4),
                        0.5)
    assert LoopSummary.from_dict(today.to_dict()) == today
    old = LoopSummary.from_dict({"first_loss": 3.0, "last_loss": 2.0, "eval_losses": [], "steps": 4, "tokens": 100,
                                 "seconds": 1.5, "probe_s": 0.25})
    assert (old.stop_rates, old.probe_seconds, old.best, old.tokenize_cache) == ([], 0.25, None, {})
    record = RunRecord.from_dict({"fingerprint": "abc", "finished": True, "summary": today.to_dict()})
    assert record.summary == today


def test_metrics_rows_read_back_typed_and_a_damaged_row_is_named_by_its_line(tmp_path):
    from lora_cli.errors import LoraCliError
    from lora_cli.train.curves import MetricsRow, read_metrics

    path = tmp_path / "metrics.jsonl"
    path.write_text('{"type": "train", "step": 1, "epoch": 0.5, "loss": 2.0}\n\n'
                    '{"type": "eval", "step": 2, "epoch": 1, "eval_loss": 1.5, "stop_rate": null}\n')
    assert read_metrics(tmp_path) == [MetricsRow("train", 1, 0.5, {"loss": 2.0}),
                                      MetricsRow("eval", 2, 1, {"eval_loss": 1.5, "stop_rate": None})]
    path.write_text(path.read_text() + '{"type": "eval", "eval_loss": 1.4}\n')
    with pytest.raises(LoraCliError, match=r"metrics.jsonl:4: not a metrics row"):
        read_metrics(path)
