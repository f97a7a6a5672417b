"""Gradient accumulation: an optimizer step of grad_accum micro-batches is the step of one micro-batch
holding the same examples, for padded and packed batching (the loss is normalised per target token
over the whole step, so a short answer weighs what it would in one larger batch)."""

import pytest
import yaml
from helpers import make_records, tiny_config, write_jsonl
from safetensors.torch import load_file

from lora_cli.data.prepare import prepare_data
from lora_cli.train.recipe import train

SHORT = {"instruction": "name a fruit", "input": "", "output": "apple"}
LONG = {"instruction": "list the words", "input": "",
        "output": "alpha beta gamma delta river stone lamp chair window garden apple pear plum seven eight nine"}
TOLERANCE = 1e-5


def _run(tiny_model_dir, train_f, out, **overrides):
    """3 Adam steps (the first sees only each gradient entry's sign, later ones its size), no dropout."""
    cfg = tiny_config(tiny_model_dir, train_f, None, out, lr=1e-2, warmup_steps=0, scheduler="constant",
                      eval_at_start=False, **overrides)
    cfg = cfg.replace({"model.quantization": "none", "lora.dropout": 0.0, "lora.target_modules": "all-linear"})
    result = train(cfg)
    return load_file(str(out / "adapter_model.safetensors")), result, cfg


def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


def _moved(weights: dict) -> float:
    return max(v.abs().max().item() for k, v in weights.items() if "lora_B" in k)


def test_padded_batching_takes_grad_accum_micro_batches_per_step(tiny_model_dir, tmp_path, one_thread):
    train_f = write_jsonl(tmp_path / "train.jsonl", [SHORT, LONG])
    common = dict(epochs=3, max_steps=3, batching="padded")
    b2a1, r_b2a1, _ = _run(tiny_model_dir, train_f, tmp_path / "b2a1", batch_size=2, grad_accum=1, **common)
    b1a2, r_b1a2, _ = _run(tiny_model_dir, train_f, tmp_path / "b1a2", batch_size=1, grad_accum=2, **common)
    assert r_b1a2.decisions.micro_batches_per_step == 2 and r_b2a1.decisions.micro_batches_per_step == 1
    saved = yaml.safe_load((tmp_path / "b1a2" / "run_config.yaml").read_text())
    assert saved["train"]["grad_accum"] == 2 and saved["run"]["micro_batches_per_step"] == 2
    assert r_b1a2.summary.steps == r_b2a1.summary.steps == 3 and _moved(b2a1) > 1e-3
    assert _max_diff(b2a1, b1a2) < TOLERANCE


def test_packed_batching_gives_the_same_step_in_one_or_in_two_micro_batches(tiny_model_dir, tmp_path, one_thread):
    train_f = write_jsonl(tmp_path / "train.jsonl", [SHORT, LONG])
    common = dict(epochs=3, max_steps=3, batching="packed")
    one, r_one, cfg = _run(tiny_model_dir, train_f, tmp_path / "one", max_tokens=256, grad_accum=1, **common)
    lengths = list(prepare_data(cfg).train.load()["length"])
    budget = max(lengths)  # holds either example alone, never both: each step is two micro-batches of one
    assert sum(lengths) > budget and sum(lengths) <= 256
    two, r_two, _ = _run(tiny_model_dir, train_f, tmp_path / "two", max_tokens=budget, grad_accum=2, **common)
    assert r_two.decisions.micro_batches_per_step == 2 and r_two.summary.steps == r_one.summary.steps == 3
    assert _moved(one) > 1e-3 and _max_diff(one, two) < TOLERANCE
    # and the same as padded batching of the same two examples per step
    padded, _, _ = _run(tiny_model_dir, train_f, tmp_path / "padded", batch_size=2, grad_accum=1, epochs=3,
                        max_steps=3, batching="padded")
    assert _max_diff(one, padded) < TOLERANCE


@pytest.mark.parametrize("batching", ["padded", "packed"])
def test_more_grad_accum_takes_more_examples_per_step(tiny_model_dir, tmp_path, one_thread, batching):
    # 8 different examples: 2 steps of accumulation 2 hold 4 of them, of accumulation 4 all 8
    train_f = write_jsonl(tmp_path / "train.jsonl", make_records(8, seed=3))
    common = dict(epochs=2, max_steps=2, batch_size=1, batching=batching, max_tokens=0 if batching == "padded" else 64)
    a2, r2, _ = _run(tiny_model_dir, train_f, tmp_path / "a2", grad_accum=2, **common)
    a4, r4, _ = _run(tiny_model_dir, train_f, tmp_path / "a4", grad_accum=4, **common)
    assert r2.decisions.micro_batches_per_step == 2 and r4.decisions.micro_batches_per_step == 4
    assert r2.summary.tokens < r4.summary.tokens  # tokens trained on: the larger step saw more examples
    assert _max_diff(a2, a4) > 1e-3
