"""A training run's output folder: who may write into it, and how the final adapter lands there.

File names and run-config reading belong to adapter_folder; this module applies the write rules.

Rules (nothing a user had is lost):
- a missing or empty folder: a fresh run;
- `--resume`: continue the run whose checkpoints are there: the same settings and the same data
  (the fingerprint holds the tokenized content), except its length: a larger --epochs or
  --max-steps continues it, finished or not, to the new end;
- a folder holding another lora-cli run (different settings or data), an unfinished run, or this
  very run finished: refused without `--overwrite` (or `--resume`), with the way forward;
- a folder lora-cli did not write: refused, even with `--overwrite`.
The final files are written to a staging folder first and renamed into place only once all
of them are complete, so a crash or a full disk leaves the previous adapter intact.
"""

from __future__ import annotations

import json
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
    EXTENDABLE,
    METRICS,
    RESUME_FREE,
    RUN_CONFIG,
    TEMPLATE_FILE,
    legacy_fingerprint,
    read_run_config,
    run_fingerprint,
    write_param_summary,
)
from lora_cli.atomic import (
    TMP_PREFIX,
    fsync_dir,
    remove_stale_temporaries,
    tmp_prefix,
    umask,
    write_failure,
    write_text,
)
from lora_cli.config import RunConfig
from lora_cli.errors import LoraCliError
from lora_cli.model.identity import describe_change
from lora_cli.train.checkpoint import STATE, list_checkpoints, read_state

if TYPE_CHECKING:
    import torch
    from peft import PeftModel
    from transformers import PreTrainedTokenizerBase

    from lora_cli.train.checkpoint import Checkpoint


def write_adapter(peft_model: PeftModel, tensors: dict, folder: Path) -> None:
    """What peft's save_pretrained writes (adapter_config.json, adapter_model.safetensors), for
    adapter tensors that were gathered rather than read from the model."""
    import copy

    from safetensors.torch import save_file

    config = copy.copy(peft_model.peft_config["default"])
    config.inference_mode = True
    config.save_pretrained(str(folder))
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(folder / ADAPTER_WEIGHTS),
              metadata={"format": "pt"})


def save_converted(peft_model: PeftModel, initial: dict, folder: Path) -> None:
    """A pissa/olora adapter as peft saves it for the original base: a plain LoRA of twice the rank.

    Those initialisations move part of the base weights into the adapter (W_res = W - B0 A0); peft
    turns the trained adapter into the update of the original W (B A - B0 A0, as [B | -B0] [A ; A0])
    given the initial adapter, written here for it in a folder of its own and removed after.
    """
    import copy

    from safetensors.torch import save_file

    initial_dir = folder / "initial_adapter"
    config = copy.deepcopy(peft_model.peft_config["default"])
    config.init_lora_weights = True  # so that loading it does not decompose the base a second time
    config.save_pretrained(str(initial_dir))
    save_file({k: v.contiguous() for k, v in initial.items()}, str(initial_dir / ADAPTER_WEIGHTS))
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
        self.saved_run: dict = {}  # the `run` section of the folder's run config, as prepare() found it

    @property
    def metrics_path(self) -> Path:
        return self.path / METRICS

    def _same_run(self, fingerprint: str | None) -> bool:
        return fingerprint in (self.fingerprint, self.fingerprint_without_base, legacy_fingerprint(self.cfg))

    def _describe_difference(self, saved: dict, skip: tuple[str, ...] = RESUME_FREE) -> str:
        mine = self.cfg.to_dict()
        diffs = []
        for section in ("data", "model", "lora", "train"):
            for key, value in (saved.get(section) or {}).items():
                if key in skip:
                    continue
                if mine.get(section, {}).get(key) != value:
                    diffs.append(f"{section}.{key}: {value!r} there, {mine.get(section, {}).get(key)!r} now")
        diffs += self._content_difference(saved.get("run") or {})
        return "; ".join(diffs[:4]) or "settings differ"

    def _content_difference(self, run: dict) -> list[str]:
        """What changed in the data since the run of `run` (a saved run section) started."""
        out = []
        for split in ("train", "val"):
            then_sha, now_sha = (run.get("data_sha256") or {}).get(split), self.data_sha256.get(split)
            then_key, now_key = (run.get("tokenize_cache") or {}).get(split), self.cache_keys.get(split)
            if then_sha and now_sha and then_sha != now_sha:
                out.append(f"data.{split} {getattr(self.cfg.data, split)}: its content changed (sha256 "
                           f"{then_sha[:12]}... there, {now_sha[:12]}... now)")
            elif then_key and now_key and then_key != now_key:
                out.append(f"data.{split}: its tokens changed (the tokenizer or the template file is not the same)")
        base = describe_change(run.get("base_model") or {}, self.base_identity) if run.get("base_model") else ""
        if base and self.base_identity:
            out.insert(0, f"model.name {self.cfg.model.name}: the base model changed: {base}")
        return out

    def _length_change(self, saved: dict) -> str:
        then, now = saved.get("train") or {}, self.cfg.to_dict()["train"]
        return "; ".join(f"train.{k}: {then.get(k)!r} there, {now[k]!r} now" for k in EXTENDABLE
                         if k in then and then[k] != now[k])

    def prepare(self, resume: bool | str, overwrite: bool) -> Path | None:
        """Apply the folder rules; return the checkpoint to resume from, if any."""
        path = self.path
        if path.exists() and not path.is_dir():
            raise LoraCliError(f"Output {path} exists and is a file, not a folder.")
        if self.is_main and read_run_config(path) is not None:  # leftovers of a killed run of ours
            remove_stale_temporaries(path)
            remove_stale_temporaries(path / CHECKPOINTS)
        entries = [p for p in path.iterdir() if not p.name.startswith(TMP_PREFIX)] if path.is_dir() else []
        saved = read_run_config(path)
        self.saved_run = dict((saved or {}).get("run") or {})
        if resume:
            return self._resume_point(resume, saved)
        if not entries:
            return None
        if saved is None:
            raise LoraCliError(
                f"Output folder {path} is not empty and was not written by lora-cli; refusing to write into it.",
                "Choose another --output folder.")
        if overwrite:
            if self.is_main:
                self._clear()
            return None
        self._refuse_unless_new(saved)
        return None  # this run, started but killed before its first checkpoint: start it again

    def _refuse_unless_new(self, saved: dict) -> None:
        """Without --overwrite or --resume: refuse another run, this run unfinished, and this run finished."""
        run, path = self.saved_run, self.path
        if not self._same_run(run.get("fingerprint")):
            raise LoraCliError(f"Output folder {path} holds a different run ({self._describe_difference(saved)}).",
                               "Pass --overwrite to replace it, or choose another --output folder.")
        length = self._length_change(saved)
        to_length = f" ({length})" if length else ""
        if list_checkpoints(path) and not run.get("finished"):
            raise LoraCliError(f"Output folder {path} holds an unfinished run of these settings{to_length}.",
                               "Pass --resume to continue it" + (" to the new length" if length else "") +
                               ", or --overwrite to start over.")
        if run.get("finished"):
            steps = (run.get("summary") or {}).get("steps")
            done = f", finished after {steps} steps" if steps is not None else ", finished"
            more = ("Add --resume to continue it from its last checkpoint to the new length" if length else
                    "To train it further, raise --epochs or --max-steps and add --resume")
            raise LoraCliError(f"Output folder {path} already holds this run{done}{to_length}; training it again "
                               "would replace its adapter.", f"{more}; --overwrite trains it again from scratch.")

    def _resume_point(self, resume: bool | str, saved: dict | None) -> Path:
        explicit = isinstance(resume, str) and resume not in ("", "latest")
        if explicit:
            ckpt = Path(resume)
            if not (ckpt / STATE).is_file():
                raise LoraCliError(f"--resume-from {resume}: not a checkpoint folder (no {STATE}).",
                                   f"Checkpoints are the folders under {self.path / CHECKPOINTS}; --resume takes "
                                   "the latest.")
        else:
            found = list_checkpoints(self.path)
            if not found:
                raise LoraCliError(f"--resume: no checkpoint in {self.path / CHECKPOINTS}.",
                                   "Start the run without --resume.")
            ckpt = found[-1]
        if not self._same_run(read_state(ckpt).fingerprint):
            origin = read_run_config(ckpt.parent.parent) or saved
            detail = self._describe_difference(origin, RESUME_FREE + EXTENDABLE) if origin else "settings differ"
            raise LoraCliError(f"Checkpoint {ckpt} belongs to a run with other settings or data ({detail}).",
                               "Resume with the same base model, settings and data (only --epochs and --max-steps "
                               "may grow), or start a new run with --overwrite.")
        if self.saved_run.get("finished") is True and not explicit and not self._length_change(saved or {}):
            self._nothing_to_continue(read_state(ckpt).step)  # said before the model loads
        return ckpt

    def _nothing_to_continue(self, step: int):
        raise LoraCliError(f"Output folder {self.path} holds a finished run: its last checkpoint is at step {step}, "
                           "the end of this run; there is nothing to continue.",
                           "To train it further, raise --epochs or --max-steps (with --resume); --overwrite instead "
                           "of --resume trains it again from scratch.")

    def continuation(self, checkpoint: Checkpoint, total_steps: int) -> str:
        """On resume: a note when the run's length changed (its schedule is stretched to the new
        end), or LoraCliError when nothing is left to do (a finished run, or a checkpoint past the end)."""
        step, planned = checkpoint.state.step, checkpoint.state.total_steps
        if total_steps == step and self.saved_run.get("finished") is True:
            self._nothing_to_continue(step)
        if total_steps < step:
            raise LoraCliError(f"Checkpoint {checkpoint.path} is at step {step}, past the end of this run "
                               f"({total_steps} steps).", "Raise --epochs or --max-steps, or start over with --overwrite.")
        if planned and total_steps != planned:
            return (f"Continuing to step {total_steps} (the run was planned for {planned}): the learning-rate "
                    f"schedule is recomputed for {total_steps} steps and goes on from step {step}.")
        return ""

    def _clear(self) -> None:
        """Empty the folder for --overwrite; run_config.yaml goes last, so a clear cut short by a
        kill leaves a folder still recognised as lora-cli's (and --overwrite works again)."""
        for entry in sorted(self.path.iterdir(), key=lambda p: p.name == RUN_CONFIG):
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()

    def start(self, decisions: dict, resuming: bool) -> None:
        """Record the run's settings before any work, so a crashed run is recognised later."""
        if not self.is_main:
            return
        self.path.mkdir(parents=True, exist_ok=True)
        self.write_run_config(decisions, finished=False)
        if not resuming:
            write_text(self.metrics_path, "")

    def write_run_config(self, decisions: dict, finished: bool, extra: dict | None = None, folder: Path | None = None):
        write_text((folder or self.path) / RUN_CONFIG, self.run_config_text(decisions, finished, extra))

    def run_config_text(self, decisions: dict, finished: bool, extra: dict | None = None) -> str:
        data = self.cfg.to_dict()
        data["run"] = {"fingerprint": self.fingerprint, "lora_cli_version": __version__, "finished": finished,
                       "tokenize_cache": self.cache_keys, "data_sha256": self.data_sha256,
                       "base_model": self.base_identity, **decisions, **(extra or {})}
        return yaml.safe_dump(data, sort_keys=False)

    def truncate_metrics(self, lines: int) -> None:
        if not self.is_main:
            return
        kept = []
        if self.metrics_path.is_file():
            kept = self.metrics_path.read_text(encoding="utf-8").splitlines(keepends=True)[:lines]
        write_text(self.metrics_path, "".join(kept))

    def append_metrics(self, row: dict) -> None:
        if not self.is_main:
            return
        with open(self.metrics_path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(row) + "\n")
            fh.flush()

    def finish(self, peft_model: PeftModel, tokenizer: PreTrainedTokenizerBase, decisions: dict, summary: dict,
               param_summary: dict, adapter_state: dict | None = None, initial_adapter: dict | None = None) -> None:
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
            self._stage(staging, peft_model, tokenizer, decisions, summary, param_summary, adapter_state,
                        initial_adapter)
            self._commit(staging)
        except Exception as exc:
            failure = write_failure(exc, self.path, hint)
            if failure is None or failure is exc:
                raise
            raise failure from exc
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    def _stage(self, staging: Path, peft_model: PeftModel, tokenizer: PreTrainedTokenizerBase,
               decisions: dict[str, Any], summary: dict[str, Any], param_summary: dict[str, Any],
               adapter_state: dict[str, torch.Tensor] | None, initial_adapter: dict[str, torch.Tensor] | None = None
               ) -> None:
        if initial_adapter is not None:
            save_converted(peft_model, initial_adapter, staging)
        elif adapter_state is None:
            peft_model.save_pretrained(str(staging), safe_serialization=True)
        else:  # gathered from FSDP shards, already under the adapter file's names
            write_adapter(peft_model, adapter_state, staging)
        faults.point("adapter:staged")
        tokenizer.save_pretrained(str(staging))
        (staging / "README.md").unlink(missing_ok=True)
        write_param_summary(staging, param_summary)
        if self.template_text is not None:  # generate/eval/merge prompt as trained, even if the file changes
            (staging / TEMPLATE_FILE).write_text(self.template_text, encoding="utf-8")
        text = self.run_config_text(decisions, finished=True, extra={"summary": summary})
        (staging / RUN_CONFIG).write_text(text, encoding="utf-8")

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


def refuse_early(cfg: RunConfig, resume: bool | str, overwrite: bool) -> None:
    """The output folder's refusals (another run, this run unfinished or finished, --resume with nothing
    to continue) before torch loads, so they cost well under a second instead of a model load.

    The same rules as OutputFolder.prepare, with the tokenize cache keys the folder recorded, when the
    data files are the bytes it recorded; when they are not (or a template file is in play, whose text
    is in the keys), the check after tokenizing decides. Changes nothing on disk. A folder a live run
    holds is refused as in use, whatever it holds now.
    """
    from lora_cli.train.output_check import refuse_if_in_use

    refuse_if_in_use(cfg)
    if overwrite:
        return
    from lora_cli.data.cache import file_digest

    run = ((read_run_config(cfg.output.dir) or {}).get("run") or {})
    keys, recorded = run.get("tokenize_cache") or {}, run.get("data_sha256") or {}
    if run:
        if Path(cfg.data.template).is_file():
            return
        paths = {split: getattr(cfg.data, split) for split in ("train", "val") if getattr(cfg.data, split)}
        if set(paths) != set(recorded) or any(file_digest(Path(p))[0] != recorded[s] for s, p in paths.items()):
            return
    base = None
    if run.get("base_model"):  # the fingerprint holds the base's identity: read it as the full check will
        from lora_cli.model.identity import base_identity
        from lora_cli.model.resolve import resolve_model

        try:
            base = base_identity(resolve_model(cfg.model.name, local_only=True))
        except LoraCliError:
            return  # not at hand without a download: the check after loading decides
    OutputFolder(cfg.output.dir, cfg, is_main=False, cache_keys=keys, data_sha256=recorded,
                 base_identity=base).prepare(resume, False)
