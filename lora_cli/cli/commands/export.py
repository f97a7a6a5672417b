"""`lora-cli export`: the merged model as GGUF (or the adapter as a GGUF LoRA, or GGUF + Ollama Modelfile)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from lora_cli.cli.commands.inference_options import AdapterOpt, BaseModelOpt, TemplateOverrideOpt, print_notes


def export(
    adapter: AdapterOpt = Path("adapters"),
    fmt: Annotated[str, typer.Option("--format", "-f", help="gguf: the merged model; gguf-lora: the adapter alone; "
                                                           "ollama: a folder with the GGUF and a Modelfile.")] = "gguf",
    output: Annotated[Optional[Path], typer.Option(
        "--output", "-o", help="The .gguf file to write (a folder for --format ollama).", show_default=False)] = None,
    outtype: Annotated[str, typer.Option(
        "--outtype", help="f16, bf16, q8_0, q4_0 or f32 (gguf-lora: not q4_0).")] = "f16",
    base_weights: Annotated[str, typer.Option(
        "--base-weights", help="auto: the NF4 weights a QLoRA adapter was trained against (de-quantized; for q4_0 "
                               "the original ones), else the original ones; original; nf4.")] = "auto",
    force: Annotated[bool, typer.Option("--force", help="Replace an existing GGUF file (or exported folder).")] = False,
    model: BaseModelOpt = None,
    template: TemplateOverrideOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the result as JSON.")] = False,
) -> None:
    """Export for llama.cpp / Ollama: GGUF with the tokenizer and the training prompt's chat template."""
    from lora_cli.adapter.packaging import open_adapter
    from lora_cli.cli.render import RichReporter, out
    from lora_cli.errors import LoraCliError
    from lora_cli.export.runner import export as run

    if output is None:
        example = "-o ollama-model" if fmt == "ollama" else "-o model.gguf"
        raise LoraCliError("No output given.", f"Pass {example} (--force replaces an earlier export).")
    with open_adapter(adapter, model, template) as info:
        print_notes(info)
        result = run(info, output, fmt, outtype, base_weights, force, RichReporter())
    if as_json:
        typer.echo(json.dumps(result.__dict__, indent=2))
        return
    types = ", ".join(f"{n} {t}" for t, n in sorted(result.tensors.items()))
    weights = f", {result.base_weights} base weights" if result.base_weights else ""
    out.print(f"Exported {adapter} ({result.base_model}, {result.architecture}{weights}, template {result.template}) "
              f"as {result.format} {result.outtype} in {result.seconds:.1f} s.", markup=False)
    listing = f": {', '.join(result.files)}" if result.format == "ollama" else ""
    out.print(f"Wrote {result.output}{listing} ({result.size_bytes / 1e6:.1f} MB; tensors: {types})", markup=False)
    if result.format == "gguf-lora":
        out.print(f"The adapter carries no chat template: prompt the base GGUF with the {result.template} template "
                  f"(the user message: {result.prompt}).", markup=False)
    else:
        out.print(f"Prompt (the user message): {result.prompt}", markup=False)
    if result.stops:
        out.print(f"Stops: {', '.join(json.dumps(s) for s in result.stops)}; greedy (temperature 0)", markup=False)
    if result.ollama_create:
        out.print(f"Import into Ollama: {result.ollama_create}", markup=False)


def register(app: typer.Typer, handle_errors) -> None:
    app.command("export")(handle_errors(export))
