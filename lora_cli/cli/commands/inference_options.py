"""Options and loading shared by generate, chat, eval and merge (not a command itself).

Flags default to the adapter's own settings (template, 4-bit or not), so `--adapter DIR`
alone reproduces how it was trained; each can be overridden.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Annotated, Iterator, Optional

import typer
from pydantic import BaseModel, ConfigDict

from lora_cli.cli.options import model_flags
from lora_cli.config import setting

LOAD = "Loading"
SAMPLE = "Sampling"

AdapterOpt = Annotated[Path, typer.Option(
    "--adapter", "-a", help="Adapter folder written by `lora-cli train` (or its zip from `lora-cli package`).")]
BatchOpt = Annotated[int, typer.Option("--batch-size", "-b", help="Prompts generated together (left-padded).")]

MaxNewOpt = Annotated[int, typer.Option("--max-new-tokens", "-n", rich_help_panel=SAMPLE,
                                        help="Stop after this many new tokens if no eos came.")]
TemperatureOpt = Annotated[float, typer.Option("--temperature", rich_help_panel=SAMPLE,
                                               help="0 = greedy (the default); > 0 samples.")]
TopPOpt = Annotated[float, typer.Option("--top-p", rich_help_panel=SAMPLE, help="Nucleus sampling (with --temperature).")]
TopKOpt = Annotated[int, typer.Option("--top-k", rich_help_panel=SAMPLE, help="Top-k sampling; 0 = off.")]
SeedOpt = Annotated[Optional[int], typer.Option("--seed", rich_help_panel=SAMPLE, help="Seed for sampling.")]


class LoadChoice(BaseModel):
    """How generate, chat and eval load base + adapter, and the repetition options of their decoding:
    the flags every one of them takes (added by `with_load_options`, from these fields)."""

    model_config = ConfigDict(frozen=True, defer_build=True)

    repetition_penalty: float = setting(1.0, "> 1 makes tokens already in the prompt or answer less likely "
                                             "(transformers' generate); 1 = off.", panel=SAMPLE)
    no_repeat_ngram_size: int = setting(0, "Never repeat a sequence of this many tokens (transformers' generate); "
                                           "0 = off.", panel=SAMPLE)
    model: Optional[str] = setting(None, "Base model to load instead of the one the adapter names (hub id, folder, "
                                         "smollm2-135m).", short="-m", panel=LOAD)
    template: Optional[str] = setting(None, "Prompt template instead of the adapter's own (alpaca, alpaca-seed, "
                                            "chat, or a file).", short="-t", panel=LOAD)
    quantization: Optional[str] = setting(None, "nf4 or none (default: as the adapter was trained).", short="-q",
                                          panel=LOAD)
    precision: str = setting("auto", "auto, bf16, fp16 or fp32 (auto: fp32 on CPUs without fast bf16).", panel=LOAD)
    device: str = setting("auto", "auto, cpu or cuda.", panel=LOAD)


with_load_options = model_flags(LoadChoice, "load")
# merge and export take these two alone
BaseModelOpt = Annotated[Optional[str], typer.Option(
    "--model", "-m", rich_help_panel=LOAD, help=LoadChoice.model_fields["model"].description)]
TemplateOverrideOpt = Annotated[Optional[str], typer.Option(
    "--template", "-t", rich_help_panel=LOAD, help=LoadChoice.model_fields["template"].description)]


def print_notes(info) -> None:
    from lora_cli.cli.render import err

    for note in info.notes:
        err.print(f"note: {note}", markup=False, soft_wrap=True)
    for warning in info.warnings:
        err.print(f"warning: {warning}", markup=False, soft_wrap=True)


@contextlib.contextmanager
def loaded_model(adapter: Path, load: LoadChoice, with_adapter: bool = True, check=None) -> Iterator:
    """The adapter (a folder, or a zip unpacked for the block) and its model, ready to generate;
    `check(tokenizer, template)` runs before the model loads (load_for_inference)."""
    from lora_cli.adapter.packaging import open_adapter
    from lora_cli.cli.render import RichReporter
    from lora_cli.infer.generation import load_for_inference

    with open_adapter(adapter, load.model, load.template, base_only=not with_adapter) as info:
        print_notes(info)
        yield load_for_inference(info, load.quantization, load.precision, load.device, with_adapter, RichReporter(),
                                 check)


def plain_table(title: str, columns: list[str], rows: list[list]):
    """A rich table whose cells are shown as written: model output like "[INST]" is not markup."""
    from rich.markup import escape

    from lora_cli.cli.render import table

    return table(escape(title), columns, [[escape(str(c)) for c in row] for row in rows])
