"""An adapter folder (or zip) as generate, chat, eval and merge need it.

Those commands must prompt and load the base model exactly as training did, and the folder's
run_config.yaml says how: template, eos, max length, quantization. Reading it in one place
gives every command the same checks and the same error messages. An adapter made by plain
peft (no run_config.yaml) still works, with lora-cli's defaults, and says so in `notes`.
"""

from __future__ import annotations

import contextlib
import json
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from lora_cli.config import DataConfig, ModelConfig
from lora_cli.errors import LoraCliError

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
TRAIN_HINT = "Train one with `lora-cli train` (it writes ./adapters), or point --adapter at an adapter folder or zip."


@dataclass
class AdapterInfo:
    path: Path
    base_model: str  # what to load: --model, else the run config's model.name, else adapter_config's
    template: str
    add_eos: bool
    max_length: int
    quantization: str  # nf4 | none: how the base was loaded for training
    trust_remote_code: bool
    lora: dict = field(default_factory=dict)  # r, alpha, target modules: for display
    notes: list[str] = field(default_factory=list)


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise LoraCliError(f"{path} is not valid JSON ({exc}); the adapter folder is damaged.") from None
    if not isinstance(data, dict):
        raise LoraCliError(f"{path} does not hold a JSON object; the adapter folder is damaged.")
    return data


def _check_folder(path: Path) -> None:
    if not path.exists():
        raise LoraCliError(f"Adapter folder {path} does not exist.", TRAIN_HINT)
    if not path.is_dir():
        raise LoraCliError(f"{path} is a file, but neither an adapter folder nor an adapter zip.", TRAIN_HINT)
    if not (path / ADAPTER_CONFIG).is_file():
        unfinished = (path / "checkpoints").is_dir()
        hint = ("A training run started there but never finished: resume it with `lora-cli train ... --resume`."
                if unfinished else TRAIN_HINT)
        raise LoraCliError(f"{path} is not an adapter folder (no {ADAPTER_CONFIG}).", hint)
    if not (path / ADAPTER_WEIGHTS).is_file():
        pickled = (path / "adapter_model.bin").is_file()
        why = "adapter_model.bin (pickle) is refused: lora-cli loads safetensors only" if pickled else "missing"
        raise LoraCliError(f"{path} has no {ADAPTER_WEIGHTS} ({why}).", TRAIN_HINT)


def read_adapter(path: str | Path, model: str | None = None, template: str | None = None) -> AdapterInfo:
    """The adapter's settings; `model` and `template` override what the folder says."""
    from lora_cli.outputs import read_run_config

    path = Path(path)
    _check_folder(path)
    if template is not None:
        from lora_cli.templates import get_template

        get_template(template)  # a bad --template is named as such, before anything loads
    peft_cfg = _read_json(path / ADAPTER_CONFIG)
    run = read_run_config(path)
    notes = []
    if run is None:
        run = {}
        notes.append(f"{path} has no run_config.yaml (not trained by lora-cli): using the alpaca template, "
                     "eos after responses and a 4-bit base; override with --template / --quantization.")
    data, mdl = run.get("data") or {}, run.get("model") or {}
    base = model or mdl.get("name") or peft_cfg.get("base_model_name_or_path")
    if not base:
        raise LoraCliError(f"{path} does not name its base model.", "Pass --model with the base model it was trained on.")
    return AdapterInfo(
        path=path, base_model=str(base),
        template=template or data.get("template") or DataConfig.template,
        add_eos=bool(data.get("add_eos", DataConfig.add_eos)),
        max_length=int(data.get("max_length") or DataConfig.max_length),
        quantization=mdl.get("quantization") or ModelConfig.quantization,
        trust_remote_code=bool(mdl.get("trust_remote_code", False)),
        lora={"r": peft_cfg.get("r"), "alpha": peft_cfg.get("lora_alpha"), "targets": peft_cfg.get("target_modules")},
        notes=notes)


def load_template(info: AdapterInfo):
    """The template the adapter was trained with, or a clear error if its file is not here."""
    from lora_cli.templates import BUILTIN, get_template

    if info.template not in BUILTIN and not Path(info.template).is_file():
        raise LoraCliError(
            f"The adapter was trained with the template file {info.template}, which does not exist here.",
            "Pass --template with that file (or alpaca, alpaca-seed, chat).")
    return get_template(info.template)


@contextlib.contextmanager
def open_adapter(path: str | Path, model: str | None = None, template: str | None = None) -> Iterator[AdapterInfo]:
    """Like `read_adapter`, but also accepts an adapter zip (`lora-cli package`), unpacked for the block."""
    path = Path(path)
    if path.is_file() and zipfile.is_zipfile(path):
        from lora_cli.packaging import extract

        with tempfile.TemporaryDirectory(prefix="lora-cli-adapter-") as tmp:
            folder = extract(path, Path(tmp) / "adapter")
            yield read_adapter(folder, model, template)
        return
    yield read_adapter(path, model, template)
