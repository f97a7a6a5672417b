"""Merge the LoRA into its base: one plain transformers model folder that loads without peft.

Two sources for the base weights:
- `nf4`: the 4-bit NF4 weights a QLoRA adapter was trained against, de-quantized. The merged
  model then reproduces base+adapter exactly as `generate` and `eval` run it (up to the dtype).
- `original`: the base model's own weights, loaded unquantized in the target dtype. For a QLoRA
  adapter this is a model nobody evaluated: its corrections were learned against NF4's rounding.
`auto` (the default of merge and export alike, `trained_base_weights`) takes the weights the
adapter was trained against: NF4 for a QLoRA adapter, the original ones otherwise.
The folder is written beside its destination under a temporary name and renamed into place
when complete, so an interrupted merge never leaves a half-written model that looks whole.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from lora_cli import __version__
from lora_cli.adapter.folder import MERGE_INFO, TEMPLATE_FILE, AdapterInfo, attach_adapter, load_template
from lora_cli.atomic import atomic_dir, umask
from lora_cli.data.chat_template import training_chat_template
from lora_cli.errors import LoraCliError
from lora_cli.lock import exclusive
from lora_cli.model.device import torch_dtype
from lora_cli.model.load import load_model, load_tokenizer, meta_model, quiet_libraries
from lora_cli.model.resolve import resolve_model
from lora_cli.progress import NULL_REPORTER, Reporter
from lora_cli.writable import check_writable

if TYPE_CHECKING:
    from peft import PeftModel
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

DTYPES = ("bf16", "fp16", "fp32")
BASE_WEIGHTS = ("auto", "original", "nf4")


@dataclass
class MergeResult:
    output: str
    base_model: str
    dtype: str
    base_weights: str
    files: list[str]
    size_bytes: int
    seconds: float


def check_output(output: Path, adapter: Path, force: bool, what: str = "merged model", marker: str = "config.json",
                 example: str = "merged") -> bool:
    """Whether an existing folder `output` will be replaced by the `what` (a folder always holding `marker`);
    refuse anything that would lose a user's files. Export's ollama folder is checked here too."""
    if output.resolve().is_relative_to(adapter.resolve()):
        raise LoraCliError(f"The {what} cannot be written into the adapter folder {adapter}.",
                           f"Choose another -o folder, e.g. -o {example}.")
    if not output.exists():
        return False
    if not output.is_dir():
        raise LoraCliError(f"{output} exists and is a file; the {what} is a folder.")
    if not any(output.iterdir()):
        return True
    if not force:
        raise LoraCliError(f"{output} already exists.", "Pass --force to replace it, or choose another -o folder.")
    if not (output / marker).is_file():
        raise LoraCliError(f"{output} is not empty and holds no {marker}; refusing to replace it, even with --force.",
                           "Choose another -o folder.")
    return True


def trained_base_weights(quantization: str) -> str:
    """What `--base-weights auto` means: the weights the adapter was trained against, `nf4` for an
    adapter trained on a 4-bit NF4 base (its adapter_info's quantization), else `original`."""
    return "nf4" if quantization == "nf4" else "original"


def untie_adapted_head(peft_model: PeftModel) -> None:
    """Give the output head its own weight where it shares the input embedding's (tied) and LoRA
    is on either of them.

    Merging adds a LoRA update to the weight it wraps; tied, that tensor is the other side's too,
    so the merged model would see the update at both ends (and be saved tied): not base + adapter,
    where LoRA on the head changes the logits only and LoRA on the embedding the inputs only. The
    head gets a copy, the update lands on its own side, and the model is saved untied.
    """
    import torch

    base = peft_model.get_base_model()
    head, embedding = base.get_output_embeddings(), base.get_input_embeddings()
    if head is None or embedding is None:
        return
    inner_head, inner_embedding = getattr(head, "base_layer", head), getattr(embedding, "base_layer", embedding)
    adapted = inner_head is not head or inner_embedding is not embedding  # a LoRA layer wraps its base layer
    if not adapted or inner_head.weight.data_ptr() != inner_embedding.weight.data_ptr():
        return
    inner_head.weight = torch.nn.Parameter(inner_head.weight.detach().clone(), requires_grad=False)
    for config in {id(c): c for c in (base.config, base.config.get_text_config())}.values():
        config.tie_word_embeddings = False


def merged_model(info: AdapterInfo, dtype: str = "fp32", base_weights: str = "original",
                 reporter: Reporter = NULL_REPORTER) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Base + adapter merged in memory: `(model, tokenizer)`, a plain transformers model (no peft) on the CPU.

    `dtype` (bf16 | fp16 | fp32) is the dtype the base is loaded and merged in; `base_weights` as in
    the module docstring. The tokenizer is the adapter folder's (saved by training), else the base's.
    Errors: LoraCliError when the base model cannot be found or the adapter does not fit it.
    """
    quiet_libraries()
    resolved = resolve_model(info.base_model, reporter)
    tokenizer = load_tokenizer(info.tokenizer_dir or resolved.path, info.trust_remote_code)
    with reporter.stage(f"Merging the adapter into {info.base_model} ({base_weights} weights, {dtype})"):
        if base_weights == "original":
            base = load_model(resolved.path, "none", dtype, "cpu", info.trust_remote_code)
        else:  # de-quantized: every Linear4bit becomes a Linear holding exactly the NF4 values
            base = load_model(resolved.path, "nf4", "fp32", "cpu", info.trust_remote_code).dequantize()
            base = base.to(torch_dtype(dtype))
        model = attach_adapter(base, info)
        untie_adapted_head(model)
        merged = model.merge_and_unload()
        merged.config.use_cache = True
    return merged, tokenizer


def carry_training_template(info: AdapterInfo, tokenizer: PreTrainedTokenizerBase,
                            reporter: Reporter = NULL_REPORTER) -> str:
    """Make `tokenizer`'s chat template the prompt format the adapter was trained with; say which it is.

    A merged folder is used by runtimes that know nothing of lora-cli's templates (transformers'
    apply_chat_template, vLLM, TGI): with the base model's own chat template they would prompt an
    alpaca-trained model in another format. Returns "training" or "base model" (a text template whose
    layout no chat message can express keeps the base model's, with a warning).
    """
    try:
        tokenizer.chat_template = training_chat_template(load_template(info), tokenizer, info.add_eos)
    except LoraCliError as exc:
        reporter.message(f"warning: the merged folder keeps the base model's chat template, not the training "
                         f"template {info.template}: {exc.message}")
        return "base model"
    return "training"


def merge(info: AdapterInfo, output: str | Path, dtype: str = "bf16", base_weights: str = "auto",
          force: bool = False, reporter: Reporter = NULL_REPORTER) -> MergeResult:
    """Write base + adapter merged to the folder `output` (atomically); `base_weights` as in the module
    docstring (`auto`: the weights the adapter was trained against).

    Errors (LoraCliError, before the base loads): a bad dtype or base-weights choice; an output that
    exists (without `force`), cannot be written or has no room for the model; another process writes it.
    """
    for flag, value, allowed in (("--dtype", dtype, DTYPES), ("--base-weights", base_weights, BASE_WEIGHTS)):
        if value not in allowed:
            raise LoraCliError(f"{flag} must be one of {', '.join(allowed)}, not {value!r}.")
    if base_weights == "auto":
        base_weights = trained_base_weights(info.quantization)
    output = Path(output)
    check_output(output, info.path, force)  # the refusals that need nothing loaded come first: well under a second
    check_writable(output, "folder", "-o", _merged_bytes(info, dtype), f"the merged model in {dtype}")
    with exclusive(output, f"{output}", "Wait for that command to finish, or choose another -o folder."):
        return _merge_into(info, output, dtype, base_weights, check_output(output, info.path, force), reporter)


def _merged_bytes(info: AdapterInfo, dtype: str) -> int:
    """The merged model's size in `dtype` (bytes), from the base's config on the meta device; 0 when
    the config cannot be read here (loading the base says why)."""
    try:
        model = meta_model(resolve_model(info.base_model, need_weights=False).path, info.trust_remote_code)
    except LoraCliError:
        return 0
    return sum(p.numel() for p in model.parameters()) * (4 if dtype == "fp32" else 2)


def _merge_into(info: AdapterInfo, output: Path, dtype: str, base_weights: str, replace: bool,
                reporter: Reporter) -> MergeResult:
    t0 = time.time()
    merged, tokenizer = merged_model(info, dtype, base_weights, reporter)
    chat_template = carry_training_template(info, tokenizer, reporter)
    with reporter.stage(f"Writing {output}"), atomic_dir(output, replace=replace) as tmp:
        merged.save_pretrained(str(tmp), safe_serialization=True)
        tokenizer.save_pretrained(str(tmp))
        (tmp / MERGE_INFO).write_text(json.dumps({
            "base_model": info.base_model, "adapter": str(info.path), "dtype": dtype, "base_weights": base_weights,
            "lora": info.lora.model_dump(), "template": info.template, "add_eos": info.add_eos, "chat_template": chat_template,
            "lora_cli_version": __version__}, indent=2))
        if info.template_text is not None:  # the prompt format the merged weights expect, as trained
            (tmp / TEMPLATE_FILE).write_text(info.template_text, encoding="utf-8")
        mode = 0o666 & ~umask()
        for item in tmp.iterdir():
            os.chmod(item, mode)  # safetensors writes 0600; a model folder is meant to be shared
    files = sorted(p.name for p in output.iterdir())
    size = sum(p.stat().st_size for p in output.iterdir() if p.is_file())
    return MergeResult(str(output), info.base_model, dtype, base_weights, files, size, round(time.time() - t0, 2))
