"""`lora-cli merge`: base model + adapter as one plain transformers model folder (no peft needed)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from lora_cli.cli.commands.inference_options import AdapterOpt, BaseModelOpt, print_notes


def merge(
    adapter: AdapterOpt = Path("adapters"),
    output: Annotated[Optional[Path], typer.Option("--output", "-o", help="Folder to write the merged model to.",
                                                   show_default=False)] = None,
    dtype: Annotated[str, typer.Option("--dtype", help="bf16, fp16 or fp32.")] = "bf16",
    base_weights: Annotated[str, typer.Option(
        "--base-weights", help="auto: the weights the adapter was trained against (for a QLoRA adapter its NF4 "
                               "weights, de-quantized: the model generate and eval ran), as export does; original: "
                               "the base model's own weights; nf4.")] = "auto",
    force: Annotated[bool, typer.Option("--force", help="Replace an existing merged model folder.")] = False,
    model: BaseModelOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the result as JSON.")] = False,
) -> None:
    """Merge the LoRA into its base model, saved as safetensors with the tokenizer (loads without peft)."""
    from lora_cli.adapter.merging import merge as run
    from lora_cli.adapter.packaging import open_adapter
    from lora_cli.cli.render import RichReporter, out
    from lora_cli.errors import LoraCliError

    if output is None:
        raise LoraCliError("No output folder given.", "Pass -o merged (a new folder; --force replaces a merged model).")
    with open_adapter(adapter, model) as info:
        print_notes(info)
        result = run(info, output, dtype, base_weights, force, RichReporter())
    if as_json:
        typer.echo(json.dumps(result.__dict__, indent=2))
        return
    out.print(f"Merged {adapter} into {result.base_model} ({result.base_weights} weights, {result.dtype}) "
              f"in {result.seconds:.1f} s.", markup=False)
    out.print(f"Wrote {result.output}: {', '.join(result.files)} ({result.size_bytes / 1e6:.1f} MB)", markup=False)
    out.print(f"Load it without peft: AutoModelForCausalLM.from_pretrained({str(result.output)!r})", markup=False)
