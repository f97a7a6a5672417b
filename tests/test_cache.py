"""The tokenize cache: a hit does no tokenizing; any input that changes the tokens misses."""

import json

import pytest
from helpers import make_records, write_jsonl
from typer.testing import CliRunner

from lora_cli.cli.app import app
from lora_cli.data import cache as dataset_cache

runner = CliRunner()


def tokenize(model, train, val=None, *extra):
    args = ["tokenize", "--model", str(model), "--train", str(train), "--json", *extra]
    if val:
        args += ["--val", str(val)]
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    return {e["split"]: e for e in json.loads(res.stdout)}


def test_second_run_is_a_hit_without_tokenizing(tiny_model_dir, data_files, monkeypatch):
    train, val = data_files
    first = tokenize(tiny_model_dir, train, val)
    assert not first["train"]["cache_hit"] and first["train"]["counts"]["examples"] == 24

    def boom(*a, **k):
        raise AssertionError("tokenized again")

    monkeypatch.setattr(dataset_cache, "encode_batch", boom)
    second = tokenize(tiny_model_dir, train, val)
    assert second["train"]["cache_hit"] and second["val"]["cache_hit"]
    assert second["train"]["key"] == first["train"]["key"]
    res = runner.invoke(app, ["tokenize", "--model", str(tiny_model_dir), "--train", str(train)])
    assert "cache hit" in res.output


@pytest.mark.parametrize("change", [
    ["--max-length", "32"], ["--train-on-prompt"], ["--no-eos"], ["--template", "alpaca-seed"], ["--template", "chat"],
])
def test_each_token_changing_option_makes_a_new_entry(tiny_model_dir, data_files, change):
    train, _ = data_files
    base = tokenize(tiny_model_dir, train)["train"]["key"]
    assert tokenize(tiny_model_dir, train, None, *change)["train"]["key"] != base


def test_data_and_tokenizer_changes_make_new_entries(tiny_model_dir, data_files, tmp_path):
    import shutil

    train, _ = data_files
    base = tokenize(tiny_model_dir, train)["train"]["key"]
    write_jsonl(train, make_records(24, seed=9))
    changed = tokenize(tiny_model_dir, train)["train"]
    assert changed["key"] != base and not changed["cache_hit"]
    other = tmp_path / "other-model"
    shutil.copytree(tiny_model_dir, other)
    cfg = json.loads((other / "tokenizer_config.json").read_text())
    cfg["model_max_length"] = 77
    (other / "tokenizer_config.json").write_text(json.dumps(cfg))
    assert tokenize(other, train)["train"]["key"] != changed["key"]


def test_force_rebuilds(tiny_model_dir, data_files):
    train, _ = data_files
    tokenize(tiny_model_dir, train)
    assert not tokenize(tiny_model_dir, train, None, "--force")["train"]["cache_hit"]


def test_invalid_records_stop_with_line_numbers_unless_skipped(tiny_model_dir, tmp_path):
    rows = make_records(5)
    rows.insert(2, {"instruction": "x"})
    rows.insert(4, "{broken")
    path = write_jsonl(tmp_path / "t.jsonl", rows)
    res = runner.invoke(app, ["tokenize", "--model", str(tiny_model_dir), "--train", str(path)])
    assert res.exit_code == 1 and "Traceback" not in res.output
    assert f"{path}:3 [output]" in res.output and f"{path}:5" in res.output and "--skip-invalid" in res.output
    assert not list((tmp_path / ".lora-cache" / "tokenized").glob("*/meta.json"))  # nothing cached
    entries = tokenize(tiny_model_dir, path, None, "--skip-invalid")
    assert entries["train"]["counts"]["examples"] == 5 and entries["train"]["counts"]["invalid"] == 2


def test_missing_model_is_one_clear_sentence(data_files):
    train, _ = data_files
    res = runner.invoke(app, ["tokenize", "--model", "nobody/no-such-model", "--train", str(train)])
    assert res.exit_code == 1 and "Traceback" not in res.output
    assert "could not be fetched" in res.output and "smollm2-135m" in res.output and "--model" in res.output
    res = runner.invoke(app, ["tokenize", "--model", "./not/here", "--train", str(train)])
    assert res.exit_code == 1 and "does not exist" in res.output


def test_an_empty_training_file_says_so_without_a_truncation_hint(tiny_model_dir, tmp_path):
    for name, text in (("empty.jsonl", ""), ("blank.jsonl", "\n\n")):
        (tmp_path / name).write_text(text)
        res = runner.invoke(app, ["tokenize", "--model", str(tiny_model_dir), "--train", str(tmp_path / name)])
        assert res.exit_code == 1 and f"{tmp_path / name} holds no records" in " ".join(res.output.split())
        assert "truncat" not in res.output and "max-length" not in res.output


def test_a_record_with_two_defects_is_one_invalid_line_listed_once(tiny_model_dir, tmp_path):
    rows = make_records(5)
    rows.insert(1, {"prompt": "x", "response": "y"})  # no instruction and no output: two errors on line 2
    rows.insert(4, {"instruction": 3})  # two errors on line 5 as well
    path = write_jsonl(tmp_path / "t.jsonl", rows)
    res = runner.invoke(app, ["tokenize", "--model", str(tiny_model_dir), "--train", str(path)])
    assert res.exit_code == 1 and f"{path} has 2 invalid line(s)" in " ".join(res.output.split())
    res = runner.invoke(app, ["tokenize", "--model", str(tiny_model_dir), "--train", str(path), "--skip-invalid"])
    assert res.exit_code == 0, res.output
    assert "2 invalid train record(s) skipped (lines 2, 5)." in " ".join(res.output.split()), res.output
