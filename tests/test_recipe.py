"""The recipe object and its typed seams: observers see the run, the run record and cache metadata read back."""

import json

import yaml
from helpers import tiny_config

from lora_cli.adapter.folder import RunRecord, read_run_record
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
    record = read_run_record(out)
    assert record.finished and record.summary["steps"] == result.summary.steps and record.decisions == result.decisions
    assert record.to_dict() == raw and list(record.to_dict()) == list(raw)  # the same keys, in the same order


def test_a_run_record_of_an_older_version_takes_defaults_for_what_it_lacks():
    record = RunRecord.from_dict({"fingerprint": "abc", "finished": True, "device": "cpu", "base_model": None})
    assert (record.fingerprint, record.finished, record.decisions) == ("abc", True, {"device": "cpu"})
    assert record.tokenize_cache == {} and record.base_model == {} and record.summary is None


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
