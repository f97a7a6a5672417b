"""A run's fingerprint holds its base model's identity: a checkpoint is not resumed on another base
(a folder replaced in place, a hub id at another revision), and a copy of the same base is the same."""

import json
import shutil
import time

import pytest
from helpers import tiny_config
from tiny_models import build_model

from lora_cli.errors import LoraCliError
from lora_cli.model.identity import base_identity, describe_change
from lora_cli.model.resolve import ResolvedModel
from lora_cli.train.recipe import train


def _config(base, data_files, out, steps):
    train_f, val_f = data_files
    cfg = tiny_config(base, train_f, val_f, out, epochs=2, max_steps=steps, save_every_steps=1, max_tokens=128,
                      eval_at_start=False)
    return cfg.replace({"model.quantization": "none"})


def test_resuming_on_a_base_folder_replaced_by_other_weights_is_refused_naming_the_change(
        tiny_model_dir, data_files, tmp_path):
    base = tmp_path / "base"
    shutil.copytree(tiny_model_dir, base)
    out = tmp_path / "run"
    train(_config(base, data_files, out, 2))
    kept = tmp_path / "run.orig"
    shutil.copytree(out, kept)
    vocab = json.loads((base / "config.json").read_text())["vocab_size"]
    for f in base.glob("*.safetensors"):
        f.unlink()
    build_model(base, vocab, seed=1)  # other weights of the same shape, under the same name (a re-download)
    with pytest.raises(LoraCliError) as refused:
        train(_config(base, data_files, out, 4), resume=True)
    message = str(refused.value)
    assert f"model.name {base}: the base model changed: its weights (digest " in message
    assert "same base model" in refused.value.hint
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-1", "step-2"]  # nothing trained on

    # the same base copied back (new file times, same bytes): the same base, resumed
    shutil.rmtree(base)
    time.sleep(0.01)
    shutil.copytree(tiny_model_dir, base)
    shutil.rmtree(out)
    shutil.copytree(kept, out)
    result = train(_config(base, data_files, out, 4), resume=True)
    assert result.summary.steps == 4 and result.resumed_from.endswith("step-2")


def test_a_changed_config_or_hub_revision_is_another_base(tiny_model_dir, tmp_path):
    base = tmp_path / "base"
    shutil.copytree(tiny_model_dir, base)
    before = base_identity(ResolvedModel(str(base), base, "local"))
    assert len(before["weights"]) == 16 and len(before["config_sha256"]) == 16
    text = (base / "config.json").read_text()
    (base / "config.json").write_text(text.replace('"rms_norm_eps"', '"rms_norm_eps_unused": 1, "rms_norm_eps"'))
    after = base_identity(ResolvedModel(str(base), base, "local"))
    assert after["weights"] == before["weights"] and describe_change(before, after) == "its config.json"

    snapshots = tmp_path / "hub" / "snapshots"
    old, new = snapshots / "a1b2c3", snapshots / "d4e5f6"
    for folder in (old, new):
        shutil.copytree(tiny_model_dir, folder)
    then = base_identity(ResolvedModel("org/model", old, "hub"))
    now = base_identity(ResolvedModel("org/model", new, "hub"))
    assert then == {"revision": "a1b2c3"} and describe_change(then, now) == "its revision (a1b2c3 there, d4e5f6 now)"
