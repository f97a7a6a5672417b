"""Examples whose prompt fills --max-length keep no response token and are left out of training:
every command that tokenizes says how many and on which lines (a cache hit too), and
validate-data --model says the same before anything is tokenized."""

import json
import random

import pytest
from helpers import RecordingReporter, make_records, tiny_config, write_jsonl
from typer.testing import CliRunner

from lora_cli.cli.app import app
from lora_cli.data.prepare import prepare_data
from lora_cli.data.records import Example
from lora_cli.data.templates import get_template
from lora_cli.data.tokenization import LabelPolicy, encode_batch, token_counts
from lora_cli.errors import DataError

runner = CliRunner()
LONG = {"instruction": "read the text about the river and the stone garden " * 12, "input": "", "output": "blue"}
MAX = 48


@pytest.fixture
def train_file(tmp_path):
    rows = make_records(6)
    rows[2], rows[4] = LONG, {**LONG, "input": "short text"}  # lines 3 and 5
    return write_jsonl(tmp_path / "train.jsonl", rows)


def test_validate_data_with_a_model_names_the_examples_max_length_would_leave_out(train_file, tiny_model_dir):
    args = ["validate-data", str(train_file), "--model", str(tiny_model_dir), "--max-length", str(MAX)]
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    assert (f"warning {train_file}: 2 example(s) left out: the prompt fills --max-length ({MAX} tokens)" in res.output
            and "(lines 3, 5)" in res.output)
    assert runner.invoke(app, args + ["--strict"]).exit_code == 1
    report = json.loads(runner.invoke(app, args + ["--json"]).stdout)["files"][0]
    assert report["would_leave_out"] == 2 and report["left_out_lines"] == [3, 5]
    assert report["lost_eos_lines"] == [1, 2, 4] and report["warnings"] == 2  # the others, longer than MAX: cut
    report = json.loads(runner.invoke(app, args[:-2] + ["--max-length", "512", "--json"]).stdout)["files"][0]
    assert report["would_leave_out"] == 0 and report["warnings"] == 0


def test_tokenize_says_which_examples_it_left_out_when_built_and_on_a_cache_hit(train_file, tiny_model_dir, tmp_path):
    args = ["tokenize", "--model", str(tiny_model_dir), "--train", str(train_file), "--max-length", str(MAX)]
    for status in ("built", "cache hit"):
        res = runner.invoke(app, args)
        assert res.exit_code == 0 and status in res.output, res.output
        assert (f"2 train example(s) left out: the prompt fills --max-length ({MAX} tokens)" in res.output
                and "(lines 3, 5)" in res.output)
    entry = json.loads(runner.invoke(app, args + ["--json"]).stdout)[0]
    assert entry["counts"]["no_target"] == 2 and entry["left_out_lines"] == [3, 5] and entry["counts"]["examples"] == 4
    [meta] = (tmp_path / ".lora-cache" / "tokenized").glob("*/meta.json")
    assert json.loads(meta.read_text())["left_out_lines"] == [3, 5]


def test_train_reports_left_out_examples_through_its_reporter_on_a_cache_hit_too(train_file, tiny_model_dir, tmp_path):
    """What `train` runs before the model loads (prepare_data), with the reporter the CLI renders."""
    cfg = tiny_config(tiny_model_dir, train_file, None, tmp_path / "adapters")
    cfg.data.max_length = MAX
    for hit in (False, True):
        reporter = RecordingReporter()
        data = prepare_data(cfg, reporter)
        assert data.train.hit is hit
        [note] = [m for m in reporter.messages if "left out" in m]
        assert note.startswith("2 train example(s) left out") and "(lines 3, 5)" in note


def test_train_prints_the_left_out_examples(train_file, tiny_model_dir, tmp_path):
    res = runner.invoke(app, ["train", "--model", str(tiny_model_dir), "--quantization", "none", "--precision", "fp32",
                              "--device", "cpu", "--train", str(train_file), "--max-length", str(MAX), "--max-steps",
                              "1", "-o", str(tmp_path / "a")])
    assert res.exit_code == 0, res.output
    assert "2 train example(s) left out" in res.output and "(lines 3, 5)" in res.output


def test_a_split_whose_every_example_is_left_out_stops_with_their_lines(tiny_model_dir, train_file, tmp_path):
    val = write_jsonl(tmp_path / "val.jsonl", [LONG, {**LONG, "output": "blue sky"}])
    cfg = tiny_config(tiny_model_dir, train_file, val, tmp_path / "adapters")
    cfg.data.max_length = MAX
    with pytest.raises(DataError, match=r"val.jsonl has no usable examples. 2 example\(s\) left out.*\(lines 1, 2\)"):
        prepare_data(cfg)


def test_the_left_out_note_lists_ten_lines_and_counts_the_rest():
    from lora_cli.data.tokenization import left_out_note

    note = left_out_note(1234, list(range(1, 101)), 512, "train")
    assert note.startswith("1,234 train example(s) left out") and "(lines 1, 2, 3, 4, 5, 6, 7, 8, 9, 10 and 1,224 more)" in note


@pytest.mark.parametrize("name", ["alpaca", "chat"])
@pytest.mark.parametrize("train_on_prompt", [False, True])
def test_validate_data_and_tokenize_agree_on_which_examples_are_left_out_and_which_lose_their_eos(tiny_model_dir, name, train_on_prompt):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    rng = random.Random(3)
    examples = [Example(i + 1, " ".join(["word"] * rng.randint(1, 60)), "", "answer " * rng.randint(1, 3))
                for i in range(30)]
    examples.append(Example(31, messages=[{"role": "user", "content": "long " * 40}, {"role": "assistant", "content": "a"},
                                          {"role": "user", "content": "b"}, {"role": "assistant", "content": "c"}]))
    template = get_template(name)
    counts = token_counts(examples, tok, template, LabelPolicy(train_on_prompt=train_on_prompt))
    for max_length in (8, 16, 32, 48, 64):
        policy = LabelPolicy(max_length=max_length, train_on_prompt=train_on_prompt)
        encoded = encode_batch(examples, tok, template, policy)
        assert [c.left_out(max_length) for c in counts] == [e.n_targets == 0 for e in encoded]
        assert [c.loses_eos(max_length) for c in counts] == [bool(e.truncated and e.n_targets) for e in encoded]
    assert any(c.left_out(32) for c in counts) != train_on_prompt


def test_eval_says_which_examples_it_could_not_score(tmp_path_factory, tiny_model_dir, tmp_path):
    from helpers.adapter_factory import make_adapter, peaked_model_dir

    from lora_cli.adapter.folder import read_adapter
    from lora_cli.infer.evaluation import evaluate, read_examples
    from lora_cli.infer.generation import load_for_inference

    adapter = make_adapter(tmp_path_factory, peaked_model_dir(tmp_path_factory, tiny_model_dir), "stopper")
    loaded = load_for_inference(read_adapter(adapter), precision="fp32", device="cpu")
    rows = make_records(3)
    rows[1] = {**LONG, "instruction": LONG["instruction"] * 20}  # past the adapter's max length
    examples = read_examples(write_jsonl(tmp_path / "val.jsonl", rows))
    reporter = RecordingReporter()
    result = evaluate(loaded, examples, "val", stop_rate=False, reporter=reporter)
    assert result.left_out == 1 and result.left_out_lines == [2] and result.examples == 3
    [note] = [m for m in reporter.messages if "left out" in m]
    assert note.startswith("1 example(s) left out") and "left to score (line 2)" in note
