"""The working directory's current dataset, and the one answer to "what does this command work on".

`tokenize` records what it tokenized in one small JSON file beside the tokenize cache
(`<cache_dir>/current.json`, written atomically). `resolve` is the single place every command asks
what it works on: typed flags > --set > --config > the current dataset > the defaults. So train,
tokenize, validate-data, param-report, eval and generate can work on it without being told the
files again; a command that takes it says so in one line. It records the data files (paths as given, sha256 of their bytes,
examples, cache key, when tokenized), the model, template, max length, label mode, eos and the
working directory. A `train` that re-tokenized the same data after a file changed records it
again; a run with other data or settings leaves it as it is.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lora_cli.atomic import write_text
from lora_cli.config import RunConfig
from lora_cli.config_files import build_config
from lora_cli.data.cache import file_digest
from lora_cli.data.records import open_data_file
from lora_cli.data.templates import get_template
from lora_cli.errors import LoraCliError

CURRENT_FILE = "current.json"
VERSION = 1
SPLITS = ("train", "val")
# What a command on the current dataset takes over from it: tokenize's data and model settings
# (dotted config keys; the data files come from `files`).
SETTINGS = ("data.template", "data.max_length", "data.train_on_prompt", "data.add_eos", "data.skip_invalid",
            "model.name", "model.trust_remote_code")
_REMEDY = {
    "tokenize": "Name the data: lora-cli tokenize --train FILE.jsonl [--val FILE.jsonl] [--model MODEL].",
    "eval": "Pass --data FILE.jsonl (held-out records in the training format), or tokenize with a validation file "
            "first (lora-cli tokenize --train FILE.jsonl --val FILE.jsonl).",
    "generate": 'Give a prompt (lora-cli generate "Name three colors.") or --input FILE.jsonl, or tokenize with a '
                "validation file first (lora-cli tokenize --train FILE.jsonl --val FILE.jsonl).",
    "train": "Tokenize first (lora-cli tokenize --train FILE.jsonl [--val FILE.jsonl] [--model MODEL]), then run "
             "lora-cli train; or give the data: lora-cli train --train FILE.jsonl.",
    "validate-data": "Name the files (lora-cli validate-data FILE.jsonl ...), or tokenize them first "
                     "(lora-cli tokenize --train FILE.jsonl [--val FILE.jsonl]).",
    "param-report": "Name an adapter folder (lora-cli param-report FOLDER) or a model (--model MODEL, with the LoRA "
                    "flags), or tokenize first (lora-cli tokenize --model MODEL --train FILE.jsonl).",
}
_WHAT = {"train": "No training data: no --train was given",
         "tokenize": "No training data: no --train was given",
         "eval": "No data to evaluate on: no --data was given",
         "generate": "Nothing to answer: no PROMPT and no --input was given",
         "validate-data": "No data file given",
         "param-report": "Nothing to report: no adapter folder given and none in ./adapters"}


def current_path(cache_dir: str | Path) -> Path:
    return Path(cache_dir) / CURRENT_FILE


def _flat(cfg: RunConfig) -> dict:
    return {f"{s}.{k}": v for s, values in cfg.model_dump().items() for k, v in values.items()}


def _when(stamp: str) -> str:
    return stamp.replace("T", " ")[:16]  # 2026-11-30 14:02


@dataclass(frozen=True)
class DataFile:
    split: str  # train | val
    path: str  # as given to tokenize (relative to `cwd` when relative)
    sha256: str  # of the file's bytes, as in the cache key
    examples: int
    cache_key: str
    tokenized: str  # when its cache entry was built, local time (ISO 8601)


@dataclass(frozen=True)
class CurrentDataset:
    file: Path  # the current.json it was read from
    settings: dict[str, Any]  # the SETTINGS keys -> value
    files: dict[str, DataFile]  # split -> DataFile
    eos_token: str | None
    cwd: str  # where tokenize ran

    def located(self, path: str) -> str:
        """A recorded path as this process must open it. A cache folder named relative to the working
        directory (the default .lora-cache) is that folder's own: its paths are as given, also in a
        copy of the folder. A cache at an absolute path may be shared by several folders: a relative
        path is taken from the folder tokenize ran in (as given when that folder is gone)."""
        if Path(path).is_absolute() or not self.file.is_absolute() or not Path(self.cwd).is_dir():
            return path
        return str(Path(self.cwd) / path)

    def config_settings(self) -> dict:
        """The run config layer of a command that works on it (config_files.build_config's `base`)."""
        files = {f"data.{s}": self.located(self.files[s].path) if s in self.files else None for s in SPLITS}
        return self.settings | files

    def describe(self, cfg: RunConfig | None = None) -> str:
        """'the current dataset: data/train.jsonl (48 examples), data/val.jsonl (12 examples); model
        smollm2-135m; tokenized 2026-11-30 14:02' (with `cfg`: its files and model where they differ)."""
        parts = []
        for split in SPLITS:
            f = self.files.get(split)
            recorded = self.located(f.path) if f else None
            path = getattr(cfg.data, split) if cfg is not None else recorded
            if path:
                parts.append(str(path) + (f" ({f.examples:,} examples)" if path == recorded else ""))
        model = cfg.model.name if cfg is not None else self.settings["model.name"]
        when = _when(self.files["train"].tokenized)
        return f"the current dataset: {', '.join(parts)}; model {model}; tokenized {when} ({self.file})"

    def change_note(self, split: str, path: str) -> str | None:
        """Why `path` (the split's file in this run) must be tokenized again, or None: it changed since it
        was tokenized. Only for the split's own recorded file. LoraCliError when that file is gone."""
        f = self.files.get(split)
        if f is None or path != self.located(f.path):
            return None
        if not Path(path).is_file():
            raise LoraCliError(f"{path}, the current dataset's {split} file (tokenized {_when(f.tokenized)}), no "
                               "longer exists.",
                               "Tokenize the data again (lora-cli tokenize --train FILE.jsonl ...), or pass --train "
                               "FILE.jsonl.")
        if file_digest(Path(path))[0] != f.sha256:
            return f"{path} changed since it was tokenized ({_when(f.tokenized)}): tokenizing it again."
        return None

    def same_settings(self, cfg: RunConfig) -> bool:
        """True when `cfg` runs on this dataset's files with its settings (the files' content may differ)."""
        flat, mine = _flat(cfg), self.config_settings()
        return mine == {k: flat[k] for k in mine}


def record(cfg: RunConfig, entries: dict, eos_token: str | None) -> CurrentDataset:
    """Write `<cache_dir>/current.json` for what was just tokenized (entries: split -> cache.CacheEntry)."""
    flat = _flat(cfg)
    files = {split: {"path": str(getattr(cfg.data, split)), "sha256": entry.meta.parts.data_sha256,
                     "examples": entry.meta.counts.examples, "cache_key": entry.key,
                     "tokenized": entry.meta.created or time.strftime("%Y-%m-%dT%H:%M:%S")}
             for split, entry in entries.items()}
    raw = {"version": VERSION, "recorded": time.strftime("%Y-%m-%dT%H:%M:%S"), "cwd": os.getcwd(),
           "settings": {k: flat[k] for k in SETTINGS}, "eos_token": eos_token, "files": files}
    path = current_path(cfg.data.cache_dir)
    write_text(path, json.dumps(raw, indent=2) + "\n")  # its folder made if need be
    return _parse(raw, path)


def _parse(raw: dict[str, Any], path: Path) -> CurrentDataset:
    try:
        if raw["version"] != VERSION or "train" not in raw["files"] or set(raw["settings"]) != set(SETTINGS):
            raise ValueError("not a current-dataset record of this lora-cli")
        files = {split: DataFile(split=split, **raw["files"][split]) for split in SPLITS if split in raw["files"]}
        return CurrentDataset(path, dict(raw["settings"]), files, raw["eos_token"], str(raw["cwd"]))
    except (AttributeError, KeyError, TypeError, ValueError) as exc:
        raise LoraCliError(f"{path} (the current dataset) is damaged: {exc}.",
                           "Run lora-cli tokenize again (it rewrites the file), or delete it.") from None


def read(cache_dir: str | Path) -> CurrentDataset | None:
    """The current dataset recorded in `cache_dir`, None when there is none (LoraCliError when damaged)."""
    path = current_path(cache_dir)
    if not path.is_file():
        return None
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise LoraCliError(f"{path} (the current dataset) cannot be read: {exc}.",
                           "Run lora-cli tokenize again (it rewrites the file), or delete it.") from None
    return _parse(raw, path)


def none_here(cache_dir: str | Path, command: str, detail: str | None = None) -> LoraCliError:
    """The one message of a command that was given nothing to work on and finds no current dataset."""
    what = _WHAT[command] + (f" ({detail.rstrip('.')})" if detail else "")
    return LoraCliError(f"{what}, and there is no current dataset ({current_path(cache_dir)} does not exist; "
                        "lora-cli tokenize records one).", _REMEDY[command])


@dataclass(frozen=True)
class Resolved:
    """What a command works on: its run config, and the current dataset when that supplied something."""

    cfg: RunConfig
    current: CurrentDataset | None  # None when the user named everything the command needs
    said: str | None  # the one line that tells the user what was taken from the current dataset


# What each command takes over from the current dataset, said in words.
_SAID = {"tokenize": "Tokenizing {what}", "validate-data": "Validating {what}", "train": "Training on {what}",
         "param-report": "Reporting: {model}, the current dataset's model ({file}), with the LoRA flags",
         "eval": "Evaluating on {val}, the current dataset's validation file ({n} examples; {file})",
         "generate": "Answering {val}, the current dataset's validation file ({n} examples; {file})"}
_WHEN_NO_TRAIN = ("train", "tokenize")  # these use the current dataset only when no training file was named


def resolve(command: str, flags: dict | None = None, config_file: str | None = None, sets: list[str] | None = None,
            detail: str | None = None) -> Resolved:
    """What `command` works on: defaults < the current dataset's data and model settings < --config <
    --set < typed flags (`flags`: dotted key -> value, only what the user typed).

    train and tokenize take the current dataset only when neither flags nor --config name a training
    file; validate-data, param-report, eval and generate call this when the user named no file,
    adapter or model, so they always take it (eval and generate: its validation file). `detail`: why
    the command's own default did not apply (said in the message when there is no current dataset).
    The data files are checked here, before anything heavy loads. Errors: LoraCliError (no current
    dataset, a damaged record, a missing data file, no validation file for eval and generate).
    """
    cfg = build_config(config_file, sets, flags or {})
    if command in _WHEN_NO_TRAIN and cfg.data.train:
        check_data_files(cfg, None)
        get_template(cfg.data.template)  # a misspelt name or a missing file: refused before anything loads
        return Resolved(cfg, None, None)
    current = read(cfg.data.cache_dir)
    if current is None:
        raise none_here(cfg.data.cache_dir, command, detail)
    cfg = build_config(config_file, sets, flags or {}, base=current.config_settings())
    if command in ("eval", "generate") and not cfg.data.val:
        raise LoraCliError(f"{_WHAT[command].split(':')[0]}: the current dataset ({current.file}) has no validation "
                           "file.", _REMEDY[command])
    if command != "param-report":
        check_data_files(cfg, current, ("val",) if command in ("eval", "generate") else SPLITS)
    if command in ("train", "tokenize", "validate-data"):
        get_template(cfg.data.template)
    val = current.files.get("val")
    said = _SAID[command].format(what=current.describe(cfg), model=cfg.model.name, file=current.file,
                                 val=cfg.data.val, n=f"{val.examples:,}" if val else "?")
    return Resolved(cfg, current, said)


def check_data_files(cfg: RunConfig, current: CurrentDataset | None, splits: tuple[str, ...] = SPLITS) -> None:
    """Each data file of `cfg` can be opened; LoraCliError naming the first that cannot (a current
    dataset's file that vanished says when it was tokenized). Cheap: nothing heavy is imported."""
    for split in splits:
        path = getattr(cfg.data, split)
        if not path:
            continue
        if current is not None and not Path(path).exists():
            current.change_note(split, str(path))  # its own recorded file: raises, saying when it was tokenized
        open_data_file(path).close()

