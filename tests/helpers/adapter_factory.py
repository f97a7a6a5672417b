"""Tiny adapters for the inference tests, trained once per session and shared between modules.

conftest's tiny model cannot learn to stop: its config sets pad_token_id == eos, so the eos
row of the (tied) embedding is a zero padding row, its logit is stuck at 0, and LoRA on
q/v cannot change that. Its small init (0.02) also caps every logit near 1. The model here
has a real eos row and a larger init, so a few steps teach it an answer *and* the eos after it.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from helpers import make_records, tiny_config, write_jsonl

_MEMO: dict[str, Path] = {}


def peaked_model_dir(factory, tiny_model_dir: Path) -> Path:
    """conftest's tokenizer with a 2-layer Qwen2 that can express confident predictions (eos included)."""
    if "model" in _MEMO:
        return _MEMO["model"]
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    folder = factory.mktemp("peaked-model")
    for f in tiny_model_dir.iterdir():
        if f.name.startswith("tokenizer") or f.suffix == ".jinja":
            shutil.copy(f, folder / f.name)
    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=400, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=1024, tie_word_embeddings=True, eos_token_id=2,
                      pad_token_id=None, bos_token_id=None, initializer_range=0.3)
    Qwen2ForCausalLM(cfg).save_pretrained(folder, safe_serialization=True)
    _MEMO["model"] = folder
    return folder


def yes_records(n: int, seed: int) -> list[dict]:
    """Random instructions that all have the answer 'yes': easy to learn, easy to check."""
    return [dict(r, output="yes") for r in make_records(n, seed=seed)]


def data_dir(factory) -> tuple[Path, Path]:
    if "data" not in _MEMO:
        folder = factory.mktemp("yes-data")
        write_jsonl(folder / "train.jsonl", yes_records(24, seed=1))
        write_jsonl(folder / "val.jsonl", yes_records(6, seed=2))
        _MEMO["data"] = folder
    return _MEMO["data"] / "train.jsonl", _MEMO["data"] / "val.jsonl"


def make_adapter(factory, model_dir: Path, name: str, train: Path | None = None, val: Path | None = None,
                 epochs: int = 8, **overrides) -> Path:
    """Train (once per session) an adapter of the tiny model; `overrides` are dotted config keys."""
    if name in _MEMO:
        return _MEMO[name]
    from lora_cli.train.recipe import train as run

    default_train, default_val = data_dir(factory)
    out = factory.mktemp("adapters") / name
    cfg = tiny_config(model_dir, train or default_train, val or default_val, out, epochs=epochs, lr=2e-2,
                      max_tokens=256, eval_at_start=False)
    run(cfg.replace({"model.quantization": "none", **overrides}))
    _MEMO[name] = out
    return out
