"""A training run's output folder: writable with room for its checkpoints, its own (locked), its
fingerprint, its run_config.yaml, and how the final adapter lands there.

`check_output` runs before any data is tokenized or weight loaded; `output_lock` holds the folder's
lock (lock.py) from before the data is prepared to the run's end, so two runs given one -o never
write into each other's folder: the second is refused in one line naming the first. The final
files are written to a staging folder first and renamed into place only once all of them are
complete, so a crash or a full disk leaves the previous adapter intact. File names and run-config
reading belong to adapter/folder.py; which existing folder a run may write into, and resuming, to resume.py.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from lora_cli import __version__, faults
from lora_cli.adapter.folder import (
    ADAPTER_WEIGHTS,
    CHECKPOINTS,
    METRICS,
    RUN_CONFIG,
    TEMPLATE_FILE,
    run_fingerprint,
    write_param_summary,
)
from lora_cli.adapter.record import LoopSummary, RunDecisions, RunRecord
from lora_cli.atomic import fsync_dir, tmp_prefix, umask, write_failure, write_text
from lora_cli.config import RunConfig
from lora_cli.lock import exclusive, refuse_if_held
from lora_cli.writable import check_writable

if TYPE_CHECKING:
    from contextlib import AbstractContextManager

    import torch
    from peft import PeftModel
    from transformers import PreTrainedTokenizerBase

    from lora_cli.model.params import ParamSummary
    from lora_cli.progress import Reporter
    from lora_cli.train.runtime import Placement


def check_output(cfg: RunConfig, lora_parameters: int, is_main: bool = True) -> None:
    """The output folder can be written and has room for one checkpoint; LoraCliError (one line
    naming --output) otherwise. (The tokenize cache is checked where an entry is built.)"""
    if not is_main:
        return
    # one checkpoint: the LoRA weights and AdamW's two moments, fp32 each (the tensors alone, a lower bound);
    # the previous checkpoint stays until the next is complete, so this is needed beside what the folder holds
    check_writable(cfg.output.dir, "folder", "--output", 12 * lora_parameters, f"one checkpoint of "
                   f"{lora_parameters:,} LoRA parameters with their optimizer state", inside=True)


IN_USE_HINT = "Wait for that run to finish, or choose another --output folder."


def refuse_if_in_use(cfg: RunConfig) -> None:
    """OutputInUse when a live run holds the output folder: said before its contents are judged."""
    refuse_if_held(cfg.output.dir, f"Output folder {cfg.output.dir}", IN_USE_HINT)


def output_lock(cfg: RunConfig, placement: Placement, reporter: Reporter) -> AbstractContextManager[Path | None]:
    """The output folder's lock, held by the main process (the others write nothing there)."""
    return exclusive(cfg.output.dir, f"Output folder {cfg.output.dir}", IN_USE_HINT, reporter,
                     enabled=placement.is_main)


def write_adapter(peft_model: PeftModel, tensors: dict[str, torch.Tensor], folder: Path, **changes: Any) -> None:
    """What peft's save_pretrained writes (adapter_config.json, adapter_model.safetensors), for adapter
    tensors not read from the model (gathered from shards, or the initial ones); `changes`: config
    fields saved with another value."""
    import copy

    from safetensors.torch import save_file

    config = copy.deepcopy(peft_model.peft_config["default"])
    for key, value in changes.items():
        setattr(config, key, value)
    config.save_pretrained(str(folder))
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(folder / ADAPTER_WEIGHTS),
              metadata={"format": "pt"})


def save_converted(peft_model: PeftModel, initial: dict, folder: Path) -> None:
    """A pissa/olora adapter as peft saves it for the original base: a plain LoRA of twice the rank.

    Those initialisations move part of the base weights into the adapter (W_res = W - B0 A0); peft
    turns the trained adapter into the update of the original W (B A - B0 A0, as [B | -B0] [A ; A0])
    given the initial adapter, written here for it in a folder of its own and removed after.
    """
    initial_dir = folder / "initial_adapter"
    # init_lora_weights True: loading it does not decompose the base a second time
    write_adapter(peft_model, initial, initial_dir, init_lora_weights=True)
    try:
        peft_model.save_pretrained(str(folder), safe_serialization=True,
                                   path_initial_model_for_weight_conversion=str(initial_dir))
    finally:
        shutil.rmtree(initial_dir, ignore_errors=True)


class OutputFolder:
    """cache_keys / data_sha256: split -> tokenize cache key / sha256 of the data file (what the run
    trains on, beyond its settings); template_text: a template file's text, saved with the adapter;
    base_identity: the base model's identity (model/identity.py), part of the fingerprint as well."""

    def __init__(self, path: str | Path, cfg: RunConfig, is_main: bool = True, cache_keys: dict | None = None,
                 data_sha256: dict | None = None, template_text: str | None = None,
                 base_identity: dict | None = None):
        self.path = Path(path)
        self.cfg = cfg
        self.is_main = is_main
        self.cache_keys = {k: v for k, v in (cache_keys or {}).items() if v}
        self.data_sha256 = {k: v for k, v in (data_sha256 or {}).items() if v}
        self.template_text = template_text
        self.base_identity = dict(base_identity or {})
        self.fingerprint = run_fingerprint(cfg, {**self.cache_keys, "base": self.base_identity}
                                           if self.base_identity else self.cache_keys)
        # runs of versions whose fingerprint did not hold the base: resumed as before (their base unknown)
        self.fingerprint_without_base = run_fingerprint(cfg, self.cache_keys)
        self.saved_run = RunRecord()  # the `run` section of the folder's run config, as resume.admit found it

    @property
    def metrics_path(self) -> Path:
        return self.path / METRICS

    def clear(self) -> None:
        """Empty the folder for --overwrite; run_config.yaml goes last, so a clear cut short by a
        kill leaves a folder still recognised as lora-cli's (and --overwrite works again)."""
        for entry in sorted(self.path.iterdir(), key=lambda p: p.name == RUN_CONFIG):
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()

    def start(self, decisions: RunDecisions, resuming: bool) -> None:
        """Record the run's settings before any work, so a crashed run is recognised later."""
        if not self.is_main:
            return
        self.path.mkdir(parents=True, exist_ok=True)
        write_text(self.path / RUN_CONFIG, self.run_config_text(decisions, finished=False))
        if not resuming:
            write_text(self.metrics_path, "")

    def run_config_text(self, decisions: RunDecisions, finished: bool, summary: LoopSummary | None = None) -> str:
        data = self.cfg.model_dump()
        data["run"] = RunRecord(self.fingerprint, __version__, finished, self.cache_keys, self.data_sha256,
                                self.base_identity, decisions, summary).to_dict()
        return yaml.safe_dump(data, sort_keys=False)

    def finish(self, peft_model: PeftModel, tokenizer: PreTrainedTokenizerBase, decisions: RunDecisions,
               summary: LoopSummary, param_summary: ParamSummary, adapter_state: dict[str, torch.Tensor] | None = None,
               initial_adapter: dict[str, torch.Tensor] | None = None) -> None:
        """Stage every final file, then rename them into the folder (the old adapter stays until then).

        run_config.yaml, which says `finished: true`, is renamed last: a run killed while the
        files are renamed leaves the folder marked unfinished, so nothing trusts a mix of old
        and new files; `--resume` then writes them again from the last checkpoint.
        """
        if not self.is_main:
            return
        peft_model.peft_config["default"].base_model_name_or_path = self.cfg.model.name
        staging = Path(tempfile.mkdtemp(prefix=tmp_prefix("final"), dir=self.path))
        hint = (f"The previous files in {self.path} are intact and training is saved in {self.path / CHECKPOINTS}: "
                "free some disk space and run the same command with --resume to write the adapter.")
        try:
            if initial_adapter is not None:
                save_converted(peft_model, initial_adapter, staging)
            elif adapter_state is None:
                peft_model.save_pretrained(str(staging), safe_serialization=True)
            else:  # gathered from FSDP shards, already under the adapter file's names
                write_adapter(peft_model, adapter_state, staging, inference_mode=True)
            faults.point("adapter:staged")
            tokenizer.save_pretrained(str(staging))
            (staging / "README.md").unlink(missing_ok=True)
            write_param_summary(staging, param_summary)
            if self.template_text is not None:  # generate/eval/merge prompt as trained, even if the file changes
                (staging / TEMPLATE_FILE).write_text(self.template_text, encoding="utf-8")
            text = self.run_config_text(decisions, finished=True, summary=summary)
            (staging / RUN_CONFIG).write_text(text, encoding="utf-8")
            self._commit(staging)
        except Exception as exc:
            failure = write_failure(exc, self.path, hint)
            if failure is None or failure is exc:
                raise
            raise failure from exc
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    def _commit(self, staging: Path) -> None:
        mode = 0o666 & ~umask()
        for n, item in enumerate(sorted(staging.iterdir(), key=lambda p: (p.name == RUN_CONFIG, p.name))):
            if item.is_file():
                os.chmod(item, mode)  # safetensors and mkstemp write 0600
                with open(item, "rb") as fh:  # on disk before its name is: a power cut leaves no empty file
                    os.fsync(fh.fileno())
            os.replace(item, self.path / item.name)
            if n == 0:
                faults.point("adapter:renaming")
        fsync_dir(self.path)
