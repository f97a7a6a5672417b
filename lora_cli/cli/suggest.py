"""An unknown flag's suggestion: by meaning for the names users bring from other tools, then by spelling.

Click suggests by spelling alone, so `--learning-rate` met `--early-stopping-patience`. Users come
with the names of Hugging Face's TrainingArguments, peft's LoraConfig and other trainers (often
with underscores, as those tools spell them); each is mapped to the flags that mean the same here.
Only flags the command has are suggested; with no meaning match click's spelling match stays.
"""

from __future__ import annotations

import difflib

import typer.core

# Another tool's name (hyphenated, lower case, without dashes) -> this tool's flags of the same meaning, best first.
MEANING = {
    "learning-rate": ("--lr",), "lr-rate": ("--lr",), "lr-scheduler-type": ("--scheduler",),
    "num-train-epochs": ("--epochs",), "num-epochs": ("--epochs",), "epoch": ("--epochs",), "n-epochs": ("--epochs",),
    "per-device-train-batch-size": ("--batch-size",), "train-batch-size": ("--batch-size",),
    "micro-batch-size": ("--batch-size",), "bs": ("--batch-size",),
    "per-device-eval-batch-size": ("--eval-batch-size",),
    "gradient-accumulation-steps": ("--grad-accum",), "gradient-accumulation": ("--grad-accum",),
    "grad-accumulation-steps": ("--grad-accum",), "accumulation-steps": ("--grad-accum",),
    "lora-r": ("--lora-r",), "lora-rank": ("--lora-r",), "rank": ("--lora-r",), "r": ("--lora-r",),
    "lora-alpha": ("--lora-alpha",), "alpha": ("--lora-alpha",),
    "lora-dropout": ("--lora-dropout",), "lora-target-modules": ("--target-modules",),
    "output-dir": ("--output",), "out-dir": ("--output",), "save-dir": ("--output",),
    "max-seq-length": ("--max-length",), "max-seq-len": ("--max-length",), "seq-len": ("--max-length",),
    "sequence-len": ("--max-length",), "cutoff-len": ("--max-length",), "model-max-length": ("--max-length",),
    "model-name-or-path": ("--model",), "base-model": ("--model",), "model-name": ("--model",),
    "train-file": ("--train",), "dataset": ("--train",), "data-path": ("--train",),
    "validation-file": ("--val",), "eval-file": ("--val",), "val-file": ("--val",),
    "warmup-ratio": ("--warmup-ratio",), "max-grad-norm": ("--max-grad-norm",),
    "gradient-checkpointing": ("--gradient-checkpointing",), "packing": ("--batching",),
    "load-in-4bit": ("--quantization",), "bf16": ("--precision",), "fp16": ("--precision",),
    "logging-steps": ("--log-every",), "save-steps": ("--save-every-steps",),
    "save-total-limit": ("--keep-checkpoints",), "resume-from-checkpoint": ("--resume-from", "--resume"),
    "adapter-path": ("--adapter",), "adapter-dir": ("--adapter",), "lora-path": ("--adapter",),
    "max-tokens": ("--max-new-tokens", "--max-tokens"),
}


def _key(flag: str) -> str:
    return flag.lstrip("-").split("=", 1)[0].replace("_", "-").lower()


def suggestions(typed: str, known: list[str]) -> list[str]:
    """The flags among `known` that `typed` (an unknown flag) most likely meant: by meaning first, then a
    look-alike spelling (underscores read as dashes, case ignored); empty when nothing is close."""
    key, have = _key(typed), set(known)
    meant = [flag for flag in MEANING.get(key, ()) if flag in have]
    if meant:
        return meant[:1]
    by_key = {_key(flag): flag for flag in known if flag.startswith("--")}
    if key in by_key:  # --max_length, --LR: the flag itself, spelt another way
        return [by_key[key]]
    return [by_key[k] for k in difflib.get_close_matches(key, list(by_key), n=3, cutoff=0.75)]


class SuggestingGroup(typer.core.TyperGroup):
    """Typer's group, with an unknown flag's suggestions from `suggestions`."""

    def get_help_option(self, ctx):
        option = super().get_help_option(ctx)
        if option is not None:
            option.metavar = ""  # typer's group help would show the switch as taking a "<bool>"
        return option

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except Exception as exc:
            # click's NoSuchOption, or the same class in the copy of click that newer typer carries
            if type(exc).__name__ != "NoSuchOption" or not hasattr(exc, "possibilities"):
                raise
            command = exc.ctx.command if getattr(exc, "ctx", None) is not None else self
            known = [opt for param in command.params for opt in (*param.opts, *param.secondary_opts)]
            exc.possibilities = suggestions(exc.option_name, known)
            raise
