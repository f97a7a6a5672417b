"""Validation records that are also training records: named by validate-data, counted by tokenize and train."""

import json

from helpers import RecordingReporter, make_records, tiny_config, write_jsonl
from typer.testing import CliRunner

from lora_cli.cli.app import app
from lora_cli.data.prepare import prepare_data

runner = CliRunner()


def _files(tmp_path):
    train_rows = make_records(12, seed=1)
    val_rows = [train_rows[4], make_records(1, seed=9)[0], train_rows[0], dict(train_rows[7])]
    return write_jsonl(tmp_path / "train.jsonl", train_rows), write_jsonl(tmp_path / "val.jsonl", val_rows)


def test_validate_data_names_each_validation_record_that_the_training_file_holds(tmp_path):
    train, val = _files(tmp_path)
    res = runner.invoke(app, ["validate-data", str(train), str(val)])
    assert res.exit_code == 0, res.output  # a warning: --strict makes it fail
    shared = [line for line in res.output.splitlines() if "also in" in line]
    assert shared == [f"warning {val}:1: also in {train} (line 5)", f"warning {val}:3: also in {train} (line 1)",
                      f"warning {val}:4: also in {train} (line 8)"]
    assert runner.invoke(app, ["validate-data", str(train), str(val), "--strict"]).exit_code == 1
    report = json.loads(runner.invoke(app, ["validate-data", str(train), str(val), "--json"]).stdout)
    assert [f["warnings"] for f in report["files"]] == [0, 3]


def test_tokenize_and_train_say_how_many_val_records_are_in_train_on_a_build_and_on_a_cache_hit(tiny_model_dir, tmp_path):
    train, val = _files(tmp_path)
    cfg = tiny_config(tiny_model_dir, train, val, tmp_path / "out")
    for _ in ("built", "cache hit"):
        reporter = RecordingReporter()
        prepare_data(cfg, reporter)
        said = [m for m in reporter.messages if "also in train" in m]
        assert said == ["warning 3 of 4 val records also in train (val.jsonl lines 1, 3, 4 are records of train.jsonl): "
                        "the eval loss on them measures memory, not generalisation. Remove them from one of the files."]
    res = runner.invoke(app, ["tokenize", "--model", str(tiny_model_dir), "--train", str(train), "--val", str(val),
                              "--cache-dir", str(tmp_path / "cache2")])
    assert res.exit_code == 0 and "3 of 4 val records also in train" in " ".join(res.output.split())
    clean = write_jsonl(tmp_path / "clean.jsonl", make_records(3, seed=9))
    reporter = RecordingReporter()
    prepare_data(tiny_config(tiny_model_dir, train, clean, tmp_path / "out"), reporter)
    assert not [m for m in reporter.messages if "also in train" in m]


def test_answers_cut_before_their_eos_and_skipped_records_are_counted_on_a_build_and_on_a_cache_hit(tiny_model_dir,
                                                                                                     tmp_path):
    rows = [{"instruction": "hi", "output": "yes"}, {"instruction": "list", "output": " ".join(["word"] * 80)},
            "{not json", {"instruction": "x"}, {"instruction": "count", "output": " ".join(["one"] * 80)}]
    train = write_jsonl(tmp_path / "train.jsonl", rows)
    cfg = tiny_config(tiny_model_dir, train, None, tmp_path / "out").replace(
        {"data.max_length": 32, "data.skip_invalid": True})
    for _ in ("built", "cache hit"):
        reporter = RecordingReporter()
        prepare_data(cfg, reporter)
        said = " | ".join(reporter.messages)
        assert ("warning 2 train example(s) cut by --max-length (32 tokens) before the end of the answer (lines 2, 5): "
                "they train without their eos") in said
        assert "--skip-invalid: 2 invalid train record(s) skipped (lines 3, 4)." in said
    reporter = RecordingReporter()
    prepare_data(cfg.replace({"data.add_eos": False}), reporter)  # no eos to lose
    assert "cut by --max-length" not in " ".join(reporter.messages)
