"""param-report: true counts from config alone (meta device) and for loaded 4-bit models."""

import json

import pytest
from typer.testing import CliRunner

from lora_cli.cli.app import app
from lora_cli.config import LoraSettings
from lora_cli.model.params import count_parameters, summary_for_model

runner = CliRunner()


@pytest.fixture
def qwen15_config_dir(tmp_path):
    from transformers import Qwen2Config

    cfg = Qwen2Config(vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                      num_attention_heads=12, num_key_value_heads=2, max_position_embeddings=32768,
                      rope_theta=1000000.0, rms_norm_eps=1e-6, tie_word_embeddings=True, hidden_act="silu")
    folder = tmp_path / "qwen2.5-1.5b-config"
    cfg.save_pretrained(folder)
    return folder


def test_reference_model_numbers_from_its_config_alone(qwen15_config_dir):
    res = runner.invoke(app, ["param-report", "--model", str(qwen15_config_dir), "--json"])
    assert res.exit_code == 0, res.output
    d = json.loads(res.stdout)
    assert (d["trainable"], d["total"]) == (2_179_072, 1_545_893_376)
    assert f"{d['percent']:.4f}" == "0.1410"
    rows = {m["module"]: m for m in d["modules"]}
    assert rows["model.layers.*.self_attn.q_proj.lora_A.default.weight"]["count"] == 28
    table = runner.invoke(app, ["param-report", "--model", str(qwen15_config_dir)])
    assert "2,179,072" in table.output and "1,545,893,376" in table.output and "0.1410%" in table.output


def test_lora_flags_change_the_count(qwen15_config_dir):
    res = runner.invoke(app, ["param-report", "--model", str(qwen15_config_dir), "--lora-r", "8", "--json"])
    assert json.loads(res.stdout)["trainable"] == 2_179_072 // 2


def test_4bit_counts_are_not_halved(tiny_model_dir):
    from lora_cli.model.load import attach_lora, load_model, prepare_for_training

    lora = LoraSettings()
    meta = summary_for_model(str(tiny_model_dir), lora)
    model = load_model(tiny_model_dir, "nf4", "fp32", "cpu")
    prepare_for_training(model, True, False, 0)
    model = attach_lora(model, lora)
    loaded = count_parameters(model)
    assert (loaded.total, loaded.trainable) == (meta.total, meta.trainable)
    assert any(type(p).__name__ == "Params4bit" for p in model.parameters())


def test_bad_inputs(tmp_path):
    res = runner.invoke(app, ["param-report", str(tmp_path)])
    assert res.exit_code == 1 and "not an adapter folder" in res.output
    res = runner.invoke(app, ["param-report", "--model", "nobody/nothing-here"])
    assert res.exit_code == 1 and "Traceback" not in res.output and "--model" in res.output


def test_a_missing_adapter_folder_is_worded_as_every_other_command_words_it(tmp_path):
    missing = tmp_path / "adaptrs"
    for args in (["param-report", str(missing)], ["package", str(missing), "-o", str(tmp_path / "a.zip")]):
        res = runner.invoke(app, args)
        assert res.exit_code == 1 and f"Adapter folder {missing} does not exist." in res.output, (args, res.output)
