"""Typer options shared by several commands, and their mapping onto config keys.

Every option defaults to None, meaning "not given": the value then comes from --config,
--set, or the recipe default, in that order (see config.build_config).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from lora_cli.config import DEFAULT_MODEL

DATA = "Data"
MODEL = "Model"
LORA = "LoRA"
TRAIN = "Training"
OUT = "Output"

ConfigOpt = Annotated[Optional[Path], typer.Option("--config", "-c", help="Run config (YAML); flags override it.")]
SetOpt = Annotated[Optional[list[str]], typer.Option("--set", "-s", help="Override any setting: section.key=value (repeatable).")]

ModelOpt = Annotated[Optional[str], typer.Option(
    "--model", "-m", rich_help_panel=MODEL,
    help=f"Hub id, local folder, or 'smollm2-135m' (embedded, offline). [default: {DEFAULT_MODEL}]")]
QuantOpt = Annotated[Optional[str], typer.Option("--quantization", "-q", rich_help_panel=MODEL,
                                                 help="nf4 (4-bit QLoRA) or none. [default: nf4]")]
TrustOpt = Annotated[Optional[bool], typer.Option("--trust-remote-code", rich_help_panel=MODEL,
                                                  help="Allow model code from the hub (off by default).")]
UpcastOpt = Annotated[Optional[str], typer.Option(
    "--upcast", rich_help_panel=MODEL,
    help="Non-quantized weights: fp32 (as peft's prepare_model_for_kbit_training) or none. [default: auto]")]

TrainFileOpt = Annotated[Optional[Path], typer.Option("--train", rich_help_panel=DATA, help="Training data (JSONL).")]
ValFileOpt = Annotated[Optional[Path], typer.Option("--val", rich_help_panel=DATA, help="Validation data (JSONL).")]
TemplateOpt = Annotated[Optional[str], typer.Option(
    "--template", "-t", rich_help_panel=DATA,
    help="alpaca, alpaca-seed, chat, or a template file. [default: alpaca]")]
MaxLenOpt = Annotated[Optional[int], typer.Option("--max-length", rich_help_panel=DATA,
                                                  help="Truncate examples to this many tokens. [default: 512]")]
PromptOpt = Annotated[Optional[bool], typer.Option(
    "--train-on-prompt/--train-on-response", rich_help_panel=DATA,
    help="Put labels on the prompt too (the seed recipe's behaviour). [default: response only]")]
EosOpt = Annotated[Optional[bool], typer.Option("--add-eos/--no-eos", rich_help_panel=DATA,
                                                help="Append eos after every response. [default: add]")]
SkipOpt = Annotated[Optional[bool], typer.Option("--skip-invalid", rich_help_panel=DATA,
                                                 help="Leave out invalid records instead of stopping.")]
CacheOpt = Annotated[Optional[Path], typer.Option("--cache-dir", rich_help_panel=DATA,
                                                  help="Tokenized-data cache. [default: .lora-cache]")]


def data_flags(model=None, quantization=None, trust_remote_code=None, train=None, val=None, template=None,
               max_length=None, train_on_prompt=None, add_eos=None, skip_invalid=None, cache_dir=None) -> dict:
    return {
        "model.name": model, "model.quantization": quantization, "model.trust_remote_code": trust_remote_code,
        "data.train": str(train) if train else None, "data.val": str(val) if val else None,
        "data.template": template, "data.max_length": max_length, "data.train_on_prompt": train_on_prompt,
        "data.add_eos": add_eos, "data.skip_invalid": skip_invalid,
        "data.cache_dir": str(cache_dir) if cache_dir else None,
    }


RankOpt = Annotated[Optional[int], typer.Option("--lora-r", "-r", rich_help_panel=LORA, help="LoRA rank. [default: 16]")]
AlphaOpt = Annotated[Optional[int], typer.Option("--lora-alpha", rich_help_panel=LORA, help="LoRA alpha. [default: 32]")]
DropOpt = Annotated[Optional[float], typer.Option("--lora-dropout", rich_help_panel=LORA, help="LoRA dropout. [default: 0.05]")]
TargetsOpt = Annotated[Optional[str], typer.Option(
    "--target-modules", rich_help_panel=LORA, help="Comma-separated module names, or all-linear. [default: q_proj,v_proj]")]


def lora_flags(r=None, alpha=None, dropout=None, targets=None) -> dict:
    return {"lora.r": r, "lora.alpha": alpha, "lora.dropout": dropout, "lora.target_modules": targets}
