"""generate, eval and merge on the embedded model (SmolLM2-135M-Instruct) after a few QLoRA steps."""

import json

import pytest
import torch
from typer.testing import CliRunner

from lora_cli.cli.app import app

pytestmark = [pytest.mark.e2e, pytest.mark.slow]
runner = CliRunner()


def run(*args):
    res = runner.invoke(app, [str(a) for a in args])
    assert res.exit_code == 0, res.output
    return res


def test_generate_eval_merge_on_the_embedded_model(use_embedded, tmp_path):
    from helpers import REPO
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lora_cli.adapter.folder import read_adapter
    from lora_cli.infer.generation import load_for_inference

    train_f, val_f = REPO / "sample_data" / "train.jsonl", REPO / "sample_data" / "val.jsonl"
    run("train", "--model", "smollm2-135m", "--train", train_f, "--epochs", "1", "--max-steps", "3",
        "--lr", "1e-3", "--precision", "fp32")

    answer = run("generate", "What is the capital of France?", "-n", "16")
    assert "Paris" in answer.stdout, answer.output  # a pretrained model answers; 3 steps do not break it

    result = json.loads(run("eval", "--data", val_f, "-n", "16", "-b", "12", "--json").stdout)
    assert result["examples"] == 12 and 0.5 < result["loss"] < 6 and 0 <= result["stop_rate"] <= 1
    assert result["perplexity"] == pytest.approx(2.718281828 ** result["loss"], rel=1e-6)

    run("merge", "-o", tmp_path / "merged", "--dtype", "bf16")
    merged = AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged"), dtype="auto")
    assert merged.dtype == torch.bfloat16 and not any("lora" in n for n, _ in merged.named_parameters())
    tok = AutoTokenizer.from_pretrained(str(tmp_path / "merged"))
    ids = tok("### Instruction:\nName a primary color.\n\n### Response:\n", return_tensors="pt")["input_ids"]
    # merge's default base is the one the adapter was trained against (4-bit here): compare with that model
    reference = load_for_inference(read_adapter(tmp_path / "adapters"), precision="fp32", device="cpu").model
    with torch.no_grad():
        ref, got = reference(input_ids=ids).logits, merged.float()(input_ids=ids).logits
    assert (got.argmax(-1) == ref.argmax(-1)).float().mean() >= 0.9
    assert (got - ref).abs().max() < 0.05 * ref.abs().max()
