"""The adapter folder: its file names and every question asked of it, in one place.

`lora-cli train` writes the folder; package, param-report, generate, chat, eval and merge read
it. They all ask the same few things, answered only here:
- which files it holds (the names below);
- is it finished (`run_config.yaml` says `finished: true` once the last file is in place);
- is it loadable (adapter config + safetensors weights, from a finished run): `check_loadable`;
- how it was trained: the run config (`read_saved_run`; its records in adapter/record.py), its LoRA
  settings as the config's own `LoraSettings`, its parameter summary, the prompt template file's
  text (TEMPLATE_FILE: the template is used as trained even after its file was edited or deleted),
  and the run fingerprint that tells two runs apart.
An adapter made by plain peft (no run_config.yaml) is loadable too, with lora-cli's defaults.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import yaml

from lora_cli.adapter import consistency
from lora_cli.adapter.record import SavedRun
from lora_cli.config import DataConfig, LoraSettings, ModelConfig, RunConfig
from lora_cli.errors import LoraCliError

if TYPE_CHECKING:
    from peft import PeftModel
    from transformers import PreTrainedModel

    from lora_cli.model.params import ParamSummary

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PICKLED_WEIGHTS = "adapter_model.bin"  # what older peft writes: a pickle, never loaded
RUN_CONFIG = "run_config.yaml"
METRICS = "metrics.jsonl"
PARAM_SUMMARY = "param_summary.json"
TEMPLATE_FILE = "prompt_template.txt"  # the text of a --template file, as training read it
MERGE_INFO = "merge_info.json"  # in a merged model folder: the adapter, template and eos it was trained with
CHECKPOINTS = "checkpoints"  # resumable state; left out of the zip
TRAIN_HINT = "Train one with `lora-cli train` (it writes ./adapters), or give the path of an adapter folder or zip."
RESUME_HINT = "Finish it with the same lora-cli train command plus --resume."
TOKENIZER_CONFIG = "tokenizer_config.json"  # the tokenizer saved beside the adapter (tokenizer.json and others too)
LOSS_CURVE = "loss_curve.png"  # metrics.jsonl drawn: train and eval loss, stop rate, epochs
LOGS = "logs"  # experiment trackers' files (TensorBoard, W&B offline, MLflow); left out of the zip
# Settings that may change between a run and its resume without changing its result (the trained weights).
RESUME_FREE = ("log_every", "save_every_steps", "keep_checkpoints", "device", "report_to", "eval_generate")
# The run's length: --resume with a larger value continues a run (finished or not) to the new end.
EXTENDABLE = ("epochs", "max_steps")


def _settings_blob(cfg: RunConfig, leave_out: tuple[str, ...]) -> dict:
    return cfg.model_dump(include={"data", "model", "lora", "train"}, exclude={"train": set(leave_out)})


def run_fingerprint(cfg: RunConfig, content: dict | None = None) -> str:
    """Hash (16 hex digits) of what decides a run's result but its length: the data, model, LoRA and
    training settings (without the output folder, RESUME_FREE and EXTENDABLE), and `content`, the
    cache keys of the tokenized splits ({"train": key, "val": key}), which hash the data files'
    bytes, the tokenizer and the template text: a file edited in place changes the fingerprint."""
    blob = json.dumps({"settings": _settings_blob(cfg, RESUME_FREE + EXTENDABLE), "content": content or {}},
                      sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def legacy_fingerprint(cfg: RunConfig) -> str:
    """The fingerprint of lora-cli before it held the content (settings only, length included):
    what the checkpoints and run configs of runs started before then carry."""
    blob = json.dumps(_settings_blob(cfg, RESUME_FREE), sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def read_saved_run(folder: str | Path) -> SavedRun | None:
    """The folder's run_config.yaml, read once (adapter/record.py); None when there is none or it
    cannot be read (not YAML, or not in the layout of any lora-cli: a damaged file)."""
    path = Path(folder) / RUN_CONFIG
    if not path.is_file():
        return None
    try:
        return SavedRun.from_dict(yaml.safe_load(path.read_text(encoding="utf-8")))
    except (OSError, UnicodeDecodeError, yaml.YAMLError, AttributeError, KeyError, TypeError, ValueError):
        return None


def is_finished(folder: str | Path) -> bool | None:
    """True/False for a lora-cli run folder; None for a folder without a run config (peft's own)."""
    saved = read_saved_run(folder)
    if saved is None:
        return None if not (Path(folder) / RUN_CONFIG).exists() else False
    return saved.run.finished is True


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise LoraCliError(f"{path} is not valid JSON ({exc}); the adapter folder is damaged.") from None
    if not isinstance(data, dict):
        raise LoraCliError(f"{path} does not hold a JSON object; the adapter folder is damaged.")
    return data


def check_loadable(path: str | Path) -> Path:
    """Refuse, with one message, a folder that is not a finished adapter with safetensors weights.

    The one definition used by package, generate, chat, eval and merge. Errors: LoraCliError for a
    missing folder, a file, no adapter config, weights missing or pickled (adapter_model.bin is
    never loaded: unpickling can run code), or a lora-cli run that has not finished (its files may
    be missing, partly written, or from an earlier run).
    """
    path = Path(path)
    _check_adapter_folder(path)
    if not path.is_dir():
        raise LoraCliError(f"{path} is a file, but neither an adapter folder nor an adapter zip.", TRAIN_HINT)
    if not (path / ADAPTER_WEIGHTS).is_file():
        why = (f"{PICKLED_WEIGHTS} (a pickle) is refused: lora-cli loads safetensors only"
               if (path / PICKLED_WEIGHTS).is_file() else "missing")
        raise LoraCliError(f"{path} has no {ADAPTER_WEIGHTS} ({why}).", TRAIN_HINT)
    check_config_matches_weights(path)
    return path


def _check_adapter_folder(path: Path) -> None:
    """The one check every reader of an adapter folder makes first: it exists, it is not a run that has
    not finished, it has an adapter config. Errors: LoraCliError (a run with checkpoints: finish it)."""
    if not path.exists():
        raise LoraCliError(f"Adapter folder {path} does not exist.", TRAIN_HINT)
    if path.is_dir() and is_finished(path) is False:
        raise LoraCliError(f"{path} holds a training run that has not finished: its adapter files may be missing, "
                           "partly written by this run, or from an earlier one.", RESUME_HINT)
    if path.is_dir() and not (path / ADAPTER_CONFIG).is_file():
        hint = RESUME_HINT if (path / CHECKPOINTS).is_dir() else TRAIN_HINT
        raise LoraCliError(f"{path} is not an adapter folder (no {ADAPTER_CONFIG}).", hint)


def check_config_matches_weights(path: str | Path) -> None:
    """LoraCliError when the folder's adapter_config.json does not describe its adapter_model.safetensors
    (rank, target modules, DoRA; see adapter.consistency). A folder without weights passes."""
    path = Path(path)
    weights, config = path / ADAPTER_WEIGHTS, read_adapter_config(path)
    if not weights.is_file() or not consistency.is_lora(config):
        return
    try:
        with open(weights, "rb") as fh:
            header = consistency.read_header(fh, str(weights))
    except OSError as exc:
        raise LoraCliError(f"Cannot read {weights}: {exc.strerror or exc}.") from None
    problem = consistency.mismatch(config, header)
    if problem:
        raise LoraCliError(f"{path / ADAPTER_CONFIG} does not describe {weights}: {problem}. The files come from "
                           "different runs (or the config was edited).",
                           "Put back the config saved with these weights, or train the adapter again.")


def read_adapter_config(path: str | Path) -> dict:
    """peft's adapter_config.json of a folder, as a dict (LoraCliError if absent or damaged)."""
    file = Path(path) / ADAPTER_CONFIG
    _check_adapter_folder(Path(path))  # worded as every command that takes an adapter words it
    if not file.is_file():
        raise LoraCliError(f"{path} is not an adapter folder (no {ADAPTER_CONFIG}).", TRAIN_HINT)
    return _read_json(file)


def lora_settings(path: str | Path) -> LoraSettings:
    """The folder's LoRA settings (rank, alpha, dropout, target modules, bias) from adapter_config.json."""
    raw = read_adapter_config(path)
    check_config_matches_weights(path)
    try:
        targets = raw["target_modules"]
        return LoraSettings(r=raw["r"], alpha=raw["lora_alpha"], dropout=raw.get("lora_dropout", 0.0),
                            target_modules=sorted(targets) if isinstance(targets, list) else [targets],
                            bias=raw.get("bias", "none"), use_dora=bool(raw.get("use_dora", False)),
                            use_rslora=bool(raw.get("use_rslora", False)))
    except (KeyError, TypeError, LoraCliError) as exc:
        raise LoraCliError(f"{Path(path) / ADAPTER_CONFIG} is not a valid adapter config ({exc}).") from None


def base_model_of(path: str | Path) -> str:
    """The base model the folder names: its run config's model.name, else peft's base_model_name_or_path."""
    saved = read_saved_run(path)
    if saved is not None and saved.model.name:
        return str(saved.model.name)
    try:
        return str(read_adapter_config(path).get("base_model_name_or_path") or "")
    except LoraCliError:
        return ""


def read_param_summary(path: str | Path):
    """The ParamSummary saved by training, or None when the folder has none."""
    from lora_cli.model.params import ParamSummary

    file = Path(path) / PARAM_SUMMARY
    return ParamSummary.from_dict(_read_json(file)) if file.is_file() else None


def summary_for_adapter(path: str | Path, model: str | None = None, trust_remote_code: bool = False):
    """Parameter counts of a folder's base model (or `model`) with the folder's LoRA settings,
    built on the meta device from the base's config.json (works for peft adapters from elsewhere)."""
    from lora_cli.model.params import summary_for_model

    lora = lora_settings(path)
    base = model or base_model_of(path)
    if not base:
        raise LoraCliError(f"{path} does not name its base model.", "Pass --model with the base model it was trained on.")
    return summary_for_model(base, lora, trust_remote_code)


def write_param_summary(folder: str | Path, summary: ParamSummary) -> None:
    (Path(folder) / PARAM_SUMMARY).write_text(json.dumps(summary.to_dict(), indent=2), encoding="utf-8")


@dataclass
class AdapterInfo:
    """How an adapter was trained, as generate, chat, eval, merge and export need it."""

    path: Path | None  # None: the base model alone (--base-only without an adapter folder)
    base_model: str  # what to load: --model, else the run config's model.name, else adapter_config's
    template: str
    add_eos: bool
    max_length: int
    quantization: str  # nf4 | none: how the base was loaded for training
    trust_remote_code: bool
    lora: LoraSettings
    notes: list[str] = field(default_factory=list)
    template_text: str | None = None  # the template file's text saved at training (TEMPLATE_FILE)
    warnings: list[str] = field(default_factory=list)

    @property
    def tokenizer_dir(self) -> Path | None:
        """The adapter's own copy of the tokenizer, if it has one (else the base model's is used)."""
        return self.path if self.path is not None and (self.path / TOKENIZER_CONFIG).is_file() else None


def _saved_template(path: Path, override: str | None, warnings: list[str]) -> str | None:
    """The template text saved with the adapter (None if none, or if `override` replaces it);
    a warning when the override differs from it."""
    saved_file = path / TEMPLATE_FILE
    saved = saved_file.read_text(encoding="utf-8") if saved_file.is_file() else None
    if saved is None or override is None:
        return saved
    from lora_cli.data.templates import BUILTIN

    if override in BUILTIN or Path(override).read_text(encoding="utf-8") != saved:
        warnings.append(f"--template {override} differs from the template this adapter was trained with (saved as "
                        f"{saved_file}); the prompts follow {override}, not training.")
    return None


def read_adapter(path: str | Path, model: str | None = None, template: str | None = None) -> AdapterInfo:
    """A loadable adapter's settings (see check_loadable); `model` and `template` override the folder's."""
    path = check_loadable(path)
    if template is not None:
        from lora_cli.data.templates import get_template

        get_template(template)  # a bad --template is named as such, before anything loads
    lora = lora_settings(path)
    saved = read_saved_run(path)
    notes: list[str] = []
    warnings: list[str] = []
    if saved is None:  # check_loadable let it through: peft's own folder, trained elsewhere
        notes.append(f"{path} has no {RUN_CONFIG} (not trained by lora-cli): using the alpaca template, "
                     "eos after responses and a 4-bit base; override with --template / --quantization.")
    data, mdl = (saved.data, saved.model) if saved is not None else (DataConfig(), ModelConfig())
    base = model or base_model_of(path)
    if not base:
        raise LoraCliError(f"{path} does not name its base model.", "Pass --model with the base model it was trained on.")
    return AdapterInfo(
        path=path, base_model=str(base), template=template or data.template, add_eos=data.add_eos,
        max_length=data.max_length, quantization=mdl.quantization, trust_remote_code=mdl.trust_remote_code,
        lora=lora, notes=notes, template_text=_saved_template(path, template, warnings), warnings=warnings)


def base_model_info(model: str | None, template: str | None = None, adapter: str | Path = "") -> AdapterInfo:
    """How to prompt the base model alone (--base-only where there is no adapter folder): lora-cli's
    defaults (alpaca, eos, 4-bit), `template` overriding the template. LoraCliError without `model`."""
    if not model:
        raise LoraCliError(f"--base-only: there is no adapter folder {adapter} to name the base model.",
                           "Pass --model with the base model to answer with (hub id, folder, smollm2-135m).")
    if template is not None:
        from lora_cli.data.templates import get_template

        get_template(template)
    info = AdapterInfo(path=None, base_model=model, template=template or DataConfig().template, add_eos=DataConfig().add_eos,
                       max_length=DataConfig().max_length, quantization=ModelConfig().quantization, trust_remote_code=False,
                       lora=LoraSettings())
    return _as_merged(info, Path(model)) if template is None else info


def _as_merged(info: AdapterInfo, folder: Path) -> AdapterInfo:
    """A model folder written by `lora-cli merge` is prompted as its adapter was trained (the template
    and eos of merge_info.json, a template file's text from the folder), not with the defaults."""
    if not (folder / MERGE_INFO).is_file():
        return info
    merged = _read_json(folder / MERGE_INFO)
    if not isinstance(merged.get("template"), str):
        raise LoraCliError(f"{folder / MERGE_INFO} names no template; the merged model folder is damaged.")
    text_file = folder / TEMPLATE_FILE
    info.template = merged["template"]
    # lora-cli's first merges did not record add_eos: read as they were then, with the default (eos after responses)
    info.add_eos = bool(merged["add_eos"]) if "add_eos" in merged else DataConfig().add_eos
    info.template_text = text_file.read_text(encoding="utf-8") if text_file.is_file() else None
    info.notes.append(f"{folder} is a merged model: prompted with its training template {info.template} "
                      f"(from {MERGE_INFO}); override with --template.")
    return info


def load_template(info: AdapterInfo):
    """The template the adapter was trained with (the text saved with it, for a template file), or
    a clear error if an older adapter's template file is not here."""
    from lora_cli.data.templates import BUILTIN, get_template, template_from_text

    if info.template_text is not None:
        return template_from_text(info.template_text, info.template)
    if info.template not in BUILTIN and not Path(info.template).is_file():
        raise LoraCliError(
            f"The adapter was trained with the template file {info.template}, which does not exist here.",
            "Pass --template with that file (or alpaca, alpaca-seed, chat).")
    return get_template(info.template)


def attach_adapter(model: PreTrainedModel, info: AdapterInfo) -> PeftModel:
    """The adapter of `info` on top of `model` (a transformers model), for inference (peft PeftModel)."""
    from peft import PeftModel

    try:
        return PeftModel.from_pretrained(model, str(info.path), is_trainable=False)
    except (ValueError, KeyError, RuntimeError) as exc:
        raise LoraCliError(f"The adapter in {info.path} does not fit the base model {info.base_model}: {exc}",
                           "Pass --model with the base model the adapter was trained on.") from None
