"""Tiny random models and tokenizers (milliseconds to build), for the tests and the GPU smoke runs.

Kept apart from conftest.py so that scripts can use them without pytest (bench/fsdp_smoke.py
runs on GPU machines whose image has no pytest).
"""

from __future__ import annotations

import random
from pathlib import Path

CHATML = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
WORDS = ("the a capital of france paris japan tokyo add two numbers is and translate word into french house "
         "water book cat dog red blue green list three colors answer question yes no write python function "
         "return square number sum one two three four five six seven eight nine ten instruction input response "
         "summarize text sentence hello world good bad happy sad river mountain city country").split()


def _corpus(n: int = 400) -> list[str]:
    rng = random.Random(0)
    lines = []
    for _ in range(n):
        lines.append(" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 12))))
    lines.append("### Instruction:\n### Input:\n### Response:\n")
    return lines


def build_tokenizer(folder: Path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_corpus(), trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|im_end|>",
                                   bos_token=None, unk_token=None)
    fast.chat_template = CHATML
    fast.save_pretrained(folder)
    return fast


def build_model(folder: Path, vocab_size: int, seed: int = 0, layers: int = 2, hidden: int = 64, tied: bool = True):
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    cfg = Qwen2Config(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                      tie_word_embeddings=tied, eos_token_id=2, pad_token_id=2, bos_token_id=None)
    model = Qwen2ForCausalLM(cfg)
    model.save_pretrained(folder, safe_serialization=True)
    return model
