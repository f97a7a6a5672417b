"""What tests share besides fixtures: data files, run configs, a recording reporter, paths.

Import from here (`from helpers import tiny_config`), never from conftest: conftest.py holds the
fixtures pytest injects, this package the plain functions tests call.
"""

from __future__ import annotations

import contextlib
import json
import random
from pathlib import Path

from tiny_models import WORDS

REPO = Path(__file__).resolve().parents[2]
SHARED_DATA = REPO.parent / "shared" / "data"


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


def tiny_config(model_dir: Path, train: Path, val: Path | None, out: Path, **train_overrides):
    """A RunConfig for fast CPU runs on the tiny model (fp32, tiny LoRA, few steps)."""
    from lora_cli.config import RunConfig

    raw = RunConfig().model_dump()
    raw["model"]["name"] = str(model_dir)
    raw["data"].update(train=str(train), val=str(val) if val else None, max_length=64, cache_dir=str(out.parent / "cache"))
    # eval_generate=0: the stop-rate probe generates at each evaluation; the tests that need it turn it on
    raw["train"].update(epochs=2, precision="fp32", device="cpu", log_every=1, eval_at_start=True, eval_generate=0)
    raw["train"].update(train_overrides)
    raw["output"]["dir"] = str(out)
    return RunConfig.from_dict(raw)


def write_small_adapter(folder: Path, features: int = 64, base_model: str | None = None) -> Path:
    """An adapter folder whose adapter_config.json agrees with its weights (LoRA r=8 on one q_proj of
    `features` inputs and outputs), as readers check; no run_config.yaml."""
    import torch
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    prefix = "base_model.model.model.layers.0.self_attn.q_proj"
    save_file({f"{prefix}.lora_A.weight": torch.randn(8, features), f"{prefix}.lora_B.weight": torch.randn(features, 8)},
              folder / "adapter_model.safetensors")
    config = {"peft_type": "LORA", "r": 8, "lora_alpha": 16, "target_modules": ["q_proj"], "task_type": "CAUSAL_LM"}
    if base_model:
        config["base_model_name_or_path"] = base_model
    (folder / "adapter_config.json").write_text(json.dumps(config))
    return folder
