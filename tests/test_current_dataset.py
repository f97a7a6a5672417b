"""The current dataset: `tokenize` records it, and the design card's four lines work on it as written."""

import json
import zipfile

import pytest
import yaml
from helpers import make_records, write_jsonl
from safetensors.torch import load_file
from typer.testing import CliRunner

from lora_cli.cli.app import app
from lora_cli.data import current as current_dataset
from lora_cli.data.prepare import prepare_data
from lora_cli.errors import LoraCliError

runner = CliRunner()
CARD = ["validate-data", "train --epochs 3", "param-report", "package adapters"]


def run(line: str, ok: bool = True):
    res = runner.invoke(app, line.split())
    assert (res.exit_code == 0) == ok, res.output
    return res


class Recorder:
    """A reporter that keeps the messages the core sends."""

    def __init__(self):
        self.messages = []

    def stage(self, name, total=None, unit=""):
        import contextlib

        self.messages.append(f"stage {name}")
        return contextlib.nullcontext(type("S", (), {"update": lambda *a, **k: None})())

    def message(self, text):
        self.messages.append(text)


@pytest.fixture
def tokenized(tiny_model_dir, tmp_path):
    """data/train.jsonl and data/val.jsonl in the working folder, tokenized for the tiny model."""
    (tmp_path / "data").mkdir()
    write_jsonl(tmp_path / "data" / "train.jsonl", make_records(12, seed=1))
    write_jsonl(tmp_path / "data" / "val.jsonl", make_records(3, seed=2))
    run(f"tokenize --model {tiny_model_dir} --train data/train.jsonl --val data/val.jsonl --max-length 64")
    return tiny_model_dir


def test_tokenize_records_the_current_dataset_beside_the_cache(tokenized, tmp_path):
    raw = json.loads((tmp_path / ".lora-cache" / "current.json").read_text())
    assert raw["settings"]["model.name"] == str(tokenized) and raw["settings"]["data.max_length"] == 64
    assert raw["settings"]["data.template"] == "alpaca" and raw["settings"]["data.add_eos"] is True
    assert raw["settings"]["data.train_on_prompt"] is False and raw["eos_token"] == "<|im_end|>"
    assert {s: f["path"] for s, f in raw["files"].items()} == {"train": "data/train.jsonl", "val": "data/val.jsonl"}
    for split, f in raw["files"].items():
        meta = json.loads((tmp_path / ".lora-cache" / "tokenized" / f["cache_key"] / "meta.json").read_text())
        assert f["sha256"] == meta["parts"]["data_sha256"] and f["examples"] == meta["counts"]["examples"]
    assert raw["files"]["train"]["examples"] == 12 and raw["files"]["val"]["examples"] == 3


def test_the_four_card_lines_run_verbatim_after_one_tokenize(tokenized, tmp_path, monkeypatch, one_thread):
    monkeypatch.setenv("LORA_CLI_CPU_BF16", "0")  # fp32 on any CPU: the same run everywhere
    validated, trained, reported, packaged = (run(line).output for line in CARD)

    assert "Validating the current dataset: data/train.jsonl (12 examples), data/val.jsonl (3 examples)" in validated
    assert "> 64 tokens" in validated and validated.count("tokens") >= 3  # the model's token statistics, max length

    first = trained.splitlines()[0]
    assert first.startswith("Training on the current dataset: data/train.jsonl (12 examples), data/val.jsonl "
                            f"(3 examples); model {tokenized}; tokenized "), first
    assert "Tokenizing" not in trained  # both cache entries were hits
    saved = yaml.safe_load((tmp_path / "adapters" / "run_config.yaml").read_text())
    assert (saved["data"]["train"], saved["data"]["val"], saved["model"]["name"]) == (
        "data/train.jsonl", "data/val.jsonl", str(tokenized))
    assert saved["data"]["max_length"] == 64 and saved["train"]["epochs"] == 3 and saved["run"]["finished"]
    metrics = [json.loads(x) for x in (tmp_path / "adapters" / "metrics.jsonl").read_text().splitlines()]
    evals = [m["eval_loss"] for m in metrics if m["type"] == "eval"]
    assert len(evals) == 4 and evals[-1] < evals[0]  # evaluated before training and after each epoch: it learned
    weights = load_file(str(tmp_path / "adapters" / "adapter_model.safetensors"))
    assert all(v.abs().sum() > 0 for k, v in weights.items() if "lora_B" in k)

    assert "Reporting: The adapter in ./adapters" in reported
    summary = json.loads((tmp_path / "adapters" / "param_summary.json").read_text())
    assert f"trainable params: {summary['trainable']:,} || all params: {summary['total']:,}" in reported

    assert "Wrote adaptermodel.zip" in packaged
    with zipfile.ZipFile(tmp_path / "adaptermodel.zip") as zf:
        assert json.loads(zf.read("MANIFEST.json"))["base_model"] == str(tokenized)  # as train saw it


def test_a_data_file_changed_since_tokenize_is_tokenized_again_with_its_reason(tokenized, tmp_path):
    with open(tmp_path / "data" / "train.jsonl", "a", encoding="utf-8") as fh:
        fh.write(json.dumps({"instruction": "one more", "input": "", "output": "record"}) + "\n")
    work = current_dataset.resolve("train")
    cfg, current = work.cfg, work.current
    reporter = Recorder()
    data = prepare_data(cfg, reporter, current=current)
    changed = [m for m in reporter.messages if "changed since it was tokenized" in m]
    when = current.files["train"].tokenized.replace("T", " ")[:16]
    assert changed == [f"data/train.jsonl changed since it was tokenized ({when}): tokenizing it again."]
    assert reporter.messages.index(changed[0]) == reporter.messages.index("stage Tokenizing train.jsonl") - 1
    assert not data.train.hit and data.val.hit and data.train.meta.counts.examples == 13

    # the record follows the new content: the next run says nothing and reads the cache
    again = current_dataset.read(".lora-cache")
    assert again.files["train"].cache_key == data.train.key and again.files["train"].examples == 13
    reporter = Recorder()
    assert prepare_data(cfg, reporter, current=again).train.hit
    assert not [m for m in reporter.messages if "cut by --max-length" not in m]  # the data's own notes only


def test_a_run_with_other_settings_leaves_the_current_dataset_as_it_was(tokenized, tmp_path):
    before = (tmp_path / ".lora-cache" / "current.json").read_text()
    work = current_dataset.resolve("train", {"data.max_length": 48})
    cfg, current = work.cfg, work.current
    data = prepare_data(cfg, current=current)
    assert not data.train.hit  # another max length: other cache entries
    assert (tmp_path / ".lora-cache" / "current.json").read_text() == before


def test_flags_config_and_set_override_the_current_dataset(tokenized, tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("data: {max_length: 96, template: chat}\ntrain: {epochs: 1}\n")
    work = current_dataset.resolve("train", {"data.add_eos": False}, str(config), ["data.template=alpaca-seed"])
    cfg, current = work.cfg, work.current
    assert current is not None and cfg.data.train == "data/train.jsonl" and cfg.model.name == str(tokenized)
    assert (cfg.data.max_length, cfg.data.template, cfg.data.add_eos) == (96, "alpaca-seed", False)

    config.write_text("data: {train: other.jsonl}\n")  # data named in the config: the current dataset is not used
    write_jsonl(tmp_path / "other.jsonl", make_records(2))
    work = current_dataset.resolve("train", {}, str(config))
    cfg, current = work.cfg, work.current
    assert current is None and cfg.data.train == "other.jsonl" and cfg.data.max_length == 512


@pytest.mark.parametrize("command,words", [
    ("train --epochs 3", ("No training data: no --train was given", "lora-cli tokenize --train FILE.jsonl",
                          "lora-cli train --train FILE.jsonl")),
    ("validate-data", ("No data file given", "lora-cli validate-data FILE.jsonl", "lora-cli tokenize --train")),
    ("param-report", ("Nothing to report: no adapter folder given and none in ./adapters",
                      "lora-cli param-report FOLDER", "--model MODEL", "lora-cli tokenize --model MODEL")),
    ("tokenize", ("No training data: no --train was given", "lora-cli tokenize --train FILE.jsonl")),
    ("eval", ("No data to evaluate on: no --data was given", "Pass --data FILE.jsonl", "--val FILE.jsonl")),
    ("generate", ("Nothing to answer: no PROMPT and no --input was given", "--input FILE.jsonl", "--val FILE.jsonl")),
])
def test_a_command_with_nothing_to_work_on_names_both_ways_to_give_it(command, words):
    res = run(command, ok=False)
    assert res.exit_code == 1 and "Traceback" not in res.output
    assert "there is no current dataset (.lora-cache/current.json does not exist" in res.output
    for w in words:
        assert w in res.output, (w, res.output)


def test_param_report_without_an_adapter_reports_the_current_datasets_model_with_the_lora_flags(tokenized, tmp_path):
    from lora_cli.config import LoraSettings
    from lora_cli.model.params import summary_for_model

    (tmp_path / "adapters").mkdir()  # a folder without an adapter in it: said, and passed over
    res = run("param-report --json")
    assert f"Reporting: {tokenized}, the current dataset's model (.lora-cache/current.json)" in res.output
    assert "(adapters is not an adapter folder (no adapter_config.json))" in res.output
    assert json.loads(res.stdout)["trainable"] == summary_for_model(str(tokenized), LoraSettings()).trainable
    rank4 = json.loads(run("param-report --lora-r 4 --json").stdout)
    assert rank4["lora"]["r"] == 4 and rank4["trainable"] == summary_for_model(str(tokenized), LoraSettings(r=4)).trainable


def test_validate_data_without_the_model_at_hand_checks_the_files_without_token_statistics(tokenized, tmp_path):
    path = tmp_path / ".lora-cache" / "current.json"
    raw = json.loads(path.read_text())
    raw["settings"]["model.name"] = "nobody/absent-model"  # HF_HUB_OFFLINE: never in the Hub cache here
    path.write_text(json.dumps(raw))
    res = run("validate-data")
    assert "Token statistics left out: Model 'nobody/absent-model'" in res.output
    assert "data/val.jsonl" in res.output and "tokens" not in res.output.split("Token statistics")[1]


def test_a_damaged_record_or_a_vanished_file_is_one_message(tokenized, tmp_path):
    (tmp_path / "data" / "val.jsonl").unlink()
    res = run("train --epochs 3", ok=False)
    assert "data/val.jsonl, the current dataset's val file (tokenized " in res.output and "no longer exists" in res.output
    (tmp_path / ".lora-cache" / "current.json").write_text("{not json")
    res = run("validate-data", ok=False)
    assert "current.json (the current dataset) cannot be read" in res.output and "Traceback" not in res.output
    with pytest.raises(LoraCliError, match="is damaged"):
        current_dataset._parse({"version": 1, "files": {}}, tmp_path / "x.json")


def test_recorded_paths_belong_to_the_folder_or_to_where_tokenize_ran(tokenized, tmp_path, monkeypatch):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(tmp_path / "data", copy / "data")
    shutil.copytree(tmp_path / ".lora-cache", copy / ".lora-cache")
    monkeypatch.chdir(copy)  # a copy of the folder: its own files, not the original's
    assert current_dataset.read(".lora-cache").config_settings()["data.train"] == "data/train.jsonl"
    shared = current_dataset.read(tmp_path / ".lora-cache")  # a cache named by its absolute path: where tokenize ran
    assert shared.config_settings()["data.train"] == str(tmp_path / "data" / "train.jsonl")


def test_eval_and_generate_given_no_data_use_the_current_datasets_validation_file_said_in_one_line(tokenized):
    common = f"--base-only --model {tokenized} --precision fp32 -q none --json"
    res = run(f"eval {common} --loss-only")
    said = "Evaluating on data/val.jsonl, the current dataset's validation file (3 examples; .lora-cache/current.json)"
    assert res.output.count(said) == 1 and said + "\n" in res.output
    result = json.loads(res.stdout)
    assert result["data"] == "data/val.jsonl" and result["examples"] == 3
    res = run(f"generate {common} -n 2")
    said = "Answering data/val.jsonl, the current dataset's validation file (3 examples; .lora-cache/current.json)"
    assert res.output.count(said) == 1
    answers = [json.loads(line) for line in res.stdout.splitlines()]
    assert [a["line"] for a in answers] == [1, 2, 3]


def test_eval_refuses_a_current_dataset_without_a_validation_file(tokenized, tmp_path):
    run(f"tokenize --model {tokenized} --train data/train.jsonl --max-length 64")
    for command, what in (("eval", "No data to evaluate on"), ("generate", "Nothing to answer")):
        res = run(f"{command} --base-only --model {tokenized}", ok=False)
        assert res.exit_code == 1 and "Traceback" not in res.output
        assert f"{what}: the current dataset (.lora-cache/current.json) has no validation file." in res.output


def test_every_command_asks_the_one_resolver_what_it_works_on():
    """flags > --config > the current dataset is decided in data/current.py alone; commands parse, call, render."""
    from pathlib import Path

    import lora_cli.cli.commands as commands

    folder = Path(commands.__file__).parent
    for module in folder.glob("*.py"):
        source = module.read_text()
        for private in ("build_config(", "none_here(", "current.read(", "import none_here", "config_settings("):
            assert private not in source, f"{module.name} decides what it works on itself ({private})"
    for name in ("train", "tokenize", "validate", "param_report", "evaluate", "generate"):
        assert "resolve(" in (folder / f"{name}.py").read_text(), name
