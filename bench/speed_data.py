"""Benchmark data: synthetic Alpaca-like lengths, or a real JSONL tokenized without any hub access.

Synthetic: lengths ~ lognormal (median 140, p90 330) clipped to [16, 512], the method of the
reference measurements (../shared/bench-anchor); ids uniform over the ordinary vocabulary; a
prompt share of 20-60% per example (lora-cli's default puts labels on the response only).
Real JSONL: a byte-level BPE (32k) is trained on the file itself, since the model's own
tokenizer may not be reachable on a GPU machine without internet; token counts of English
text come out close to a real 150k-vocabulary tokenizer's.
"""

from __future__ import annotations

import json
import math

import numpy as np

PAD_ID = 151643
N_REAL_VOCAB = 151643


def synthetic(n: int = 6000, seed: int = 1234, lo: int = 16, hi: int = 512) -> list[dict]:
    rng = np.random.default_rng(seed)
    sigma = math.log(330.0 / 140.0) / 1.2815515655446004
    lens = np.clip(np.round(np.exp(rng.normal(math.log(140.0), sigma, n))), lo, hi).astype(int)
    out = []
    for length in lens:
        ids = rng.integers(0, N_REAL_VOCAB, size=int(length)).tolist()
        cut = int(length * rng.uniform(0.2, 0.6))
        out.append({"input_ids": ids, "prompt_len": cut})
    return out


def from_jsonl(path: str, max_length: int = 512, vocab: int = 32000) -> list[dict]:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    rows = [json.loads(line) for line in open(path, encoding="utf-8") if line.strip()]
    prompts, answers = [], []
    for r in rows:
        inp = f"### Input:\n{r['input']}\n\n" if r.get("input", "").strip() else ""
        prompts.append(f"### Instruction:\n{r['instruction']}\n\n{inp}### Response:\n")
        answers.append(r["output"])
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(prompts + answers, trainers.BpeTrainer(
        vocab_size=vocab, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    out = []
    for p, a in zip(tok.encode_batch(prompts), tok.encode_batch(answers)):
        ids = (p.ids + a.ids + [1])[:max_length]
        out.append({"input_ids": ids, "prompt_len": min(len(p.ids), len(ids) - 1)})
    return out


def from_jsonl_with_tokenizer(path: str, model_dir: str, max_length: int = 512) -> list[dict]:
    """A real JSONL through the model's own tokenizer and lora-cli's template (for local models)."""
    from transformers import AutoTokenizer

    from lora_cli.data.records import iter_examples
    from lora_cli.data.templates import get_template
    from lora_cli.data.tokenization import LabelPolicy, encode_batch

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    encoded = encode_batch(list(iter_examples(path)), tokenizer, get_template("alpaca"), LabelPolicy(max_length))
    return [{"input_ids": e.input_ids, "prompt_len": next((i for i, t in enumerate(e.labels) if t != -100), 0)}
            for e in encoded]


def stats(examples: list[dict]) -> dict:
    lens = np.array([len(e["input_ids"]) for e in examples])
    return {"n": int(lens.size), "mean": float(lens.mean()), "p50": float(np.median(lens)),
            "p90": float(np.percentile(lens, 90)), "max": int(lens.max()), "tokens": int(lens.sum()),
            "sum_sq_per_token": float((lens.astype(np.float64) ** 2).sum() / lens.sum())}
