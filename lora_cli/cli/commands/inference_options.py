"""Options and loading shared by generate, chat, eval and merge (not a command itself).

Flags default to the adapter's own settings (template, 4-bit or not), so `--adapter DIR`
alone reproduces how it was trained; each can be overridden.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Iterator, Optional

import typer

LOAD = "Loading"
SAMPLE = "Sampling"

AdapterOpt = Annotated[Path, typer.Option(
    "--adapter", "-a", help="Adapter folder written by `lora-cli train` (or its zip from `lora-cli package`).")]
BaseModelOpt = Annotated[Optional[str], typer.Option(
    "--model", "-m", rich_help_panel=LOAD,
    help="Base model to load instead of the one the adapter names (hub id, folder, smollm2-135m).")]
TemplateOverrideOpt = Annotated[Optional[str], typer.Option(
    "--template", "-t", rich_help_panel=LOAD,
    help="Prompt template instead of the adapter's own (alpaca, alpaca-seed, chat, or a file).")]
QuantOverrideOpt = Annotated[Optional[str], typer.Option(
    "--quantization", "-q", rich_help_panel=LOAD, help="nf4 or none (default: as the adapter was trained).")]
PrecisionOpt = Annotated[str, typer.Option(
    "--precision", rich_help_panel=LOAD, help="auto, bf16, fp16 or fp32 (auto: fp32 on CPUs without fast bf16).")]
DeviceOpt = Annotated[str, typer.Option("--device", rich_help_panel=LOAD, help="auto, cpu or cuda.")]
BatchOpt = Annotated[int, typer.Option("--batch-size", "-b", help="Prompts generated together (left-padded).")]

MaxNewOpt = Annotated[int, typer.Option("--max-new-tokens", "-n", rich_help_panel=SAMPLE,
                                        help="Stop after this many new tokens if no eos came.")]
TemperatureOpt = Annotated[float, typer.Option("--temperature", rich_help_panel=SAMPLE,
                                               help="0 = greedy (the default); > 0 samples.")]
TopPOpt = Annotated[float, typer.Option("--top-p", rich_help_panel=SAMPLE, help="Nucleus sampling (with --temperature).")]
TopKOpt = Annotated[int, typer.Option("--top-k", rich_help_panel=SAMPLE, help="Top-k sampling; 0 = off.")]
SeedOpt = Annotated[Optional[int], typer.Option("--seed", rich_help_panel=SAMPLE, help="Seed for sampling.")]
RepetitionPenaltyOpt = Annotated[float, typer.Option(
    "--repetition-penalty", rich_help_panel=SAMPLE,
    help="> 1 makes tokens already in the prompt or answer less likely (transformers' generate); 1 = off.")]
NoRepeatNgramOpt = Annotated[int, typer.Option(
    "--no-repeat-ngram-size", rich_help_panel=SAMPLE,
    help="Never repeat a sequence of this many tokens (transformers' generate); 0 = off.")]


@dataclass(frozen=True)
class LoadChoice:
    """How generate, chat and eval load base + adapter, and the repetition options of their decoding:
    the flags every one of them takes (added by `with_load_options`)."""

    model: str | None = None
    template: str | None = None
    quantization: str | None = None
    precision: str = "auto"
    device: str = "auto"
    repetition_penalty: float = 1.0
    no_repeat_ngram_size: int = 0


_LOAD_PARAMS = [("repetition_penalty", RepetitionPenaltyOpt, 1.0), ("no_repeat_ngram_size", NoRepeatNgramOpt, 0),
                ("model", BaseModelOpt, None), ("template", TemplateOverrideOpt, None),
                ("quantization", QuantOverrideOpt, None), ("precision", PrecisionOpt, "auto"),
                ("device", DeviceOpt, "auto")]


def with_load_options(fn):
    """Add the LoadChoice flags after a command's own parameters; the command receives them as `load`."""
    own = [p for p in inspect.signature(fn, eval_str=True).parameters.values() if p.name != "load"]
    added = [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=annotation)
             for name, annotation, default in _LOAD_PARAMS]

    @functools.wraps(fn)
    def command(**kwargs):
        load = LoadChoice(**{name: kwargs.pop(name) for name, _, _ in _LOAD_PARAMS})
        return fn(load=load, **kwargs)

    params = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in own] + added
    command.__signature__ = inspect.Signature(params)
    command.__annotations__ = {p.name: p.annotation for p in params}
    return command


def sampling(max_new_tokens: int, temperature: float, top_p: float, top_k: int, seed: int | None,
             repetition_penalty: float = 1.0, no_repeat_ngram_size: int = 0):
    from lora_cli.infer.generation import Sampling

    return Sampling(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k, seed=seed,
                    repetition_penalty=repetition_penalty, no_repeat_ngram_size=no_repeat_ngram_size)


def print_notes(info) -> None:
    from lora_cli.cli.render import err

    for note in info.notes:
        err.print(f"note: {note}", markup=False, soft_wrap=True)
    for warning in info.warnings:
        err.print(f"warning: {warning}", markup=False, soft_wrap=True)


@contextlib.contextmanager
def loaded_model(adapter: Path, load: LoadChoice, with_adapter: bool = True) -> Iterator:
    """The adapter (a folder, or a zip unpacked for the block) and its model, ready to generate."""
    from lora_cli.adapter.packaging import open_adapter
    from lora_cli.cli.render import RichReporter
    from lora_cli.infer.generation import load_for_inference

    with open_adapter(adapter, load.model, load.template, base_only=not with_adapter) as info:
        print_notes(info)
        yield load_for_inference(info, load.quantization, load.precision, load.device, with_adapter, RichReporter())


def plain_table(title: str, columns: list[str], rows: list[list]):
    """A rich table whose cells are shown as written: model output like "[INST]" is not markup."""
    from rich.markup import escape

    from lora_cli.cli.render import table

    return table(escape(title), columns, [[escape(str(c)) for c in row] for row in rows])
