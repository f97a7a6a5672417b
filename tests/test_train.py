"""Training on a tiny random model: it learns, it writes what it promises, it guards its folder."""

import json

import pytest
import torch
import yaml
from helpers import tiny_config
from safetensors.torch import load_file
from typer.testing import CliRunner

from lora_cli.cli.app import app
from lora_cli.errors import LoraCliError
from lora_cli.train.recipe import train

runner = CliRunner()


def lora_tensors(folder):
    return load_file(str(folder / "adapter_model.safetensors"))


def test_the_first_step_is_logged_so_a_short_runs_first_and_last_loss_differ(tiny_model_dir, data_files, tmp_path):
    train_f, val_f = data_files
    out = tmp_path / "short"
    result = train(tiny_config(tiny_model_dir, train_f, val_f, out, max_steps=5, log_every=10, lr=5e-3,
                               max_tokens=256))
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r["type"] == "train"] == [1, 5]
    last_train, last_eval = [next(r for r in reversed(rows) if r["type"] == t) for t in ("train", "eval")]
    assert last_eval["step"] == last_train["step"] == 5 and last_eval["epoch"] == last_train["epoch"]
    assert last_eval["epoch"] != int(last_eval["epoch"])  # stopped within an epoch: both say how far into it
    assert result.summary.first_loss != result.summary.last_loss


def test_training_learns_and_writes_the_adapter_folder(tiny_model_dir, data_files, tmp_path):
    train_f, val_f = data_files
    out = tmp_path / "adapters"
    cfg = tiny_config(tiny_model_dir, train_f, val_f, out, epochs=3, lr=5e-3, max_tokens=256)
    result = train(cfg)
    assert result.summary.eval_losses[-1] < result.summary.eval_losses[0]  # eval before training, then after each epoch
    assert result.summary.last_loss < result.summary.first_loss
    names = {p.name for p in out.iterdir()}
    assert {"adapter_model.safetensors", "adapter_config.json", "tokenizer.json", "tokenizer_config.json",
            "run_config.yaml", "param_summary.json", "metrics.jsonl", "checkpoints"} <= names
    weights = lora_tensors(out)
    b = [v for k, v in weights.items() if "lora_B" in k]
    assert b and all(t.abs().sum() > 0 for t in b)  # lora_B starts at zero: any change means it trained
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["type"] for r in rows].count("eval") == 4 and rows[0]["step"] == 0
    saved = yaml.safe_load((out / "run_config.yaml").read_text())
    assert saved["run"]["finished"] and saved["lora"]["r"] == 16 and saved["run"]["world_size"] == 1
    summary = json.loads((out / "param_summary.json").read_text())
    assert summary["trainable"] == result.param_summary["trainable"] > 0
    ckpts = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert ckpts == ["epoch-2", "epoch-3"]  # keep_checkpoints=2 pruned epoch-1
    adapter_cfg = json.loads((out / "adapter_config.json").read_text())
    assert adapter_cfg["base_model_name_or_path"] == str(tiny_model_dir)


def test_4bit_lora_still_learns_after_an_evaluation(tiny_model_dir, data_files, tmp_path):
    """The CPU 4-bit trap (PLATFORM.md): eval then train must still move the LoRA weights."""
    train_f, val_f = data_files
    cfg = tiny_config(tiny_model_dir, train_f, val_f, tmp_path / "a", epochs=1, max_steps=2, lr=1e-2, max_tokens=128)
    assert cfg.model.quantization == "nf4" and cfg.train.eval_at_start
    train(cfg)
    import bitsandbytes as bnb

    from lora_cli.model.load import load_model

    model = load_model(tiny_model_dir, "nf4", "fp32", "cpu")
    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert layers and all(m.support_avx512bf16_for_cpu is False for m in layers)
    weights = lora_tensors(tmp_path / "a")
    assert all(v.abs().sum() > 0 for k, v in weights.items() if "lora_B" in k)


def test_padded_seed_batching_and_unquantized_model_also_train(tiny_model_dir, data_files, tmp_path):
    train_f, val_f = data_files
    cfg = tiny_config(tiny_model_dir, train_f, val_f, tmp_path / "b", epochs=2, lr=5e-3, batching="padded")
    cfg = cfg.replace({"model.quantization": "none", "data.train_on_prompt": True, "data.add_eos": False})
    result = train(cfg)
    assert result.decisions.batching == "padded" and result.summary.eval_losses[-1] < result.summary.eval_losses[0]


def test_output_folder_rules(tiny_model_dir, data_files, tmp_path):
    train_f, val_f = data_files
    out = tmp_path / "adapters"
    cfg = tiny_config(tiny_model_dir, train_f, None, out, epochs=1, max_steps=1)
    train(cfg)
    weights = lora_tensors(out)
    with pytest.raises(LoraCliError, match="already holds this run, finished after 1 steps") as again:
        train(cfg)  # the same finished run again: not retrained and replaced behind the user's back
    assert "--overwrite" in again.value.hint and "--resume" in again.value.hint
    assert lora_tensors(out).keys() == weights.keys() and all(torch.equal(lora_tensors(out)[k], weights[k])
                                                              for k in weights)
    train(cfg, overwrite=True)  # asked for
    other = cfg.replace({"train.lr": 1e-3})
    with pytest.raises(LoraCliError, match="different run"):
        train(other)
    assert lora_tensors(out)  # untouched
    train(other, overwrite=True)
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    with pytest.raises(LoraCliError, match="not written by lora-cli"):
        train(cfg.replace({"output.dir": str(mine)}), overwrite=True)
    assert (mine / "notes.txt").read_text() == "keep me"


def test_cli_train_with_config_file_and_flags(tiny_model_dir, data_files, tmp_path):
    train_f, val_f = data_files
    conf = tmp_path / "run.yaml"
    conf.write_text(yaml.safe_dump({
        "model": {"name": str(tiny_model_dir)},
        "data": {"train": str(train_f), "val": str(val_f), "max_length": 64},
        "train": {"epochs": 5, "precision": "fp32", "lr": 0.01, "max_tokens": 256},
    }))
    res = runner.invoke(app, ["train", "--config", str(conf), "--epochs", "1", "-o", str(tmp_path / "o"),
                              "--set", "train.log_every=1"])
    assert res.exit_code == 0, res.output
    assert "Adapter written to" in res.output and "eval loss" in res.output
    saved = yaml.safe_load((tmp_path / "o" / "run_config.yaml").read_text())
    assert saved["train"]["epochs"] == 1 and saved["train"]["lr"] == 0.01 and saved["train"]["log_every"] == 1


def test_cli_train_errors_are_messages(tiny_model_dir, data_files, tmp_path):
    train_f, _ = data_files
    res = runner.invoke(app, ["train", "--model", str(tiny_model_dir)])
    assert res.exit_code == 1 and "--train" in res.output
    res = runner.invoke(app, ["train", "--model", str(tiny_model_dir), "--train", str(train_f), "--precision", "fp16",
                              "--device", "cpu"])
    assert res.exit_code == 1 and "fp16 needs a CUDA GPU" in res.output
    res = runner.invoke(app, ["train", "--model", str(tiny_model_dir), "--train", str(train_f), "--target-modules",
                              "nonexistent_proj", "--precision", "fp32"])
    assert res.exit_code == 1 and "target" in res.output.lower() and "Traceback" not in res.output


def test_training_steps_run_in_train_mode_even_without_an_evaluation(tiny_model_dir, data_files, tmp_path, monkeypatch):
    """from_pretrained leaves eval mode: without model.train() LoRA dropout and checkpointing silently stay off."""
    from lora_cli.model import loss

    seen = []
    original = loss.make_loss_module

    def spy(*args, **kwargs):
        module = original(*args, **kwargs)
        forward = module.forward

        def recording(*a, **k):
            seen.append(all(m.training for m in module.modules()))
            return forward(*a, **k)

        module.forward = recording
        return module

    monkeypatch.setattr(loss, "make_loss_module", spy)
    train_f, _ = data_files
    train(tiny_config(tiny_model_dir, train_f, None, tmp_path / "t", epochs=1, max_steps=2, max_tokens=128))
    assert seen and all(seen)
