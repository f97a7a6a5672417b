"""A --template file's text travels with the adapter: saved in its folder, packaged in the zip, and
used by generate, chat, eval and merge even after the file was edited or deleted."""

import shutil
import zipfile

import pytest
import yaml
from helpers import make_records, tiny_config, write_jsonl
from typer.testing import CliRunner

from lora_cli.adapter.folder import RUN_CONFIG, TEMPLATE_FILE, load_template, read_adapter
from lora_cli.adapter.packaging import open_adapter, package
from lora_cli.cli.app import app

runner = CliRunner()
pytestmark = pytest.mark.usefixtures("one_thread")
QA = "Q: {instruction} {input}\nA: {output}\n"
OTHER = "### Task\n{instruction}\n### Answer\n{output}"


@pytest.fixture(scope="module")
def trained(tiny_model_dir, tmp_path_factory):
    from lora_cli.train.recipe import train

    folder = tmp_path_factory.mktemp("template-run")
    data = write_jsonl(folder / "train.jsonl", make_records(12, seed=3))
    template = folder / "qa.txt"
    template.write_text(QA)
    cfg = tiny_config(tiny_model_dir, data, None, folder / "adapter", epochs=1, max_steps=2, lr=1e-2,
                      max_tokens=128, eval_at_start=False)
    train(cfg.replace({"model.quantization": "none", "data.template": str(template)}))
    return folder / "adapter", template, data


def response_loss(adapter, data) -> float:
    from lora_cli.infer.evaluation import read_examples, response_loss
    from lora_cli.infer.generation import load_for_inference

    with open_adapter(adapter) as info:
        loaded = load_for_inference(info, precision="fp32", device="cpu")
        sums = response_loss(loaded, read_examples(data))
    return sums.total / sums.n


def test_the_template_text_is_saved_packaged_and_used_after_its_file_changes(trained, tmp_path):
    from lora_cli.adapter.merging import merge

    adapter, template, data = trained
    assert (adapter / TEMPLATE_FILE).read_text() == QA
    assert yaml.safe_load((adapter / RUN_CONFIG).read_text())["data"]["template"] == str(template)  # as asked
    before = response_loss(adapter, data)
    template.write_text(OTHER)  # edited after training: the adapter keeps prompting as trained
    assert load_template(read_adapter(adapter)).source == QA
    assert response_loss(adapter, data) == before
    template.unlink()  # and deleted
    assert response_loss(adapter, data) == before
    package(adapter, tmp_path / "a.zip")
    assert TEMPLATE_FILE in zipfile.ZipFile(tmp_path / "a.zip").namelist()
    with open_adapter(tmp_path / "a.zip") as info:
        assert load_template(info).source == QA and info.template == str(template)
    assert response_loss(tmp_path / "a.zip", data) == before
    merge(read_adapter(adapter), tmp_path / "merged", dtype="fp32")
    assert (tmp_path / "merged" / TEMPLATE_FILE).read_text() == QA


def test_a_template_override_that_differs_from_the_saved_one_is_warned_about_by_name(trained, tmp_path):
    adapter = trained[0]
    other, same = tmp_path / "other.txt", tmp_path / "same.txt"
    other.write_text(OTHER)
    same.write_text(QA)
    info = read_adapter(adapter, template=str(other))
    assert info.warnings == [f"--template {other} differs from the template this adapter was trained with (saved as "
                             f"{adapter / TEMPLATE_FILE}); the prompts follow {other}, not training."]
    assert load_template(info).source == OTHER
    assert read_adapter(adapter, template=str(same)).warnings == []
    assert read_adapter(adapter, template="alpaca").warnings and read_adapter(adapter).warnings == []
    res = runner.invoke(app, ["generate", "--adapter", str(adapter), "--template", str(other), "name two", "-n", "2",
                              "--precision", "fp32"])
    assert res.exit_code == 0 and f"warning: --template {other} differs" in " ".join(res.output.split())


def test_an_adapter_from_before_the_text_was_saved_still_reads_the_file_its_run_config_names(trained, tmp_path):
    old = tmp_path / "old"
    shutil.copytree(trained[0], old, ignore=shutil.ignore_patterns(TEMPLATE_FILE, "checkpoints"))
    named = tmp_path / "named.txt"
    named.write_text(OTHER)
    run = yaml.safe_load((old / RUN_CONFIG).read_text())
    run["data"]["template"] = str(named)
    (old / RUN_CONFIG).write_text(yaml.safe_dump(run))
    info = read_adapter(old)
    assert info.template_text is None and load_template(info).source == OTHER
