"""Load and adapt the base model (found by resolve.py).

`load_model` loads it in 4-bit NF4 or unquantized, from safetensors only;
`prepare_for_training` freezes, upcasts and checkpoints it; `attach_lora` puts peft's LoRA on
top. Imports of torch/transformers/peft happen inside functions so the CLI starts fast.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings
from dataclasses import replace
from pathlib import Path

from lora_cli.config import LoraSettings
from lora_cli.errors import LoraCliError
from lora_cli.model.device import torch_dtype
from lora_cli.model.resolve import resolve_model
from lora_cli.model.targets import Targets, resolve_targets


def quiet_libraries() -> None:
    """Silence progress bars and chatter of the libraries; lora-cli reports progress itself."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    for name in ("transformers", "bitsandbytes", "peft", "accelerate", "datasets", "torch.distributed"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning, module=r"(torch|transformers|peft|bitsandbytes|accelerate)")
    from transformers.utils import logging as tlog

    tlog.set_verbosity_error()
    tlog.disable_progress_bar()


def _load_error(exc: Exception, what: str, path: Path) -> LoraCliError:
    if "trust_remote_code" in str(exc):
        return LoraCliError(f"The {what} in {path} needs code from its own repository to load, and lora-cli runs no "
                            "remote code unless asked.", "Pass --trust-remote-code if you trust where the model comes from.")
    return LoraCliError(f"Cannot load the {what} from {path}: {exc}")


def load_tokenizer(path: Path, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        raise _load_error(exc, "tokenizer", path) from None
    if not getattr(tokenizer, "is_fast", False):
        raise LoraCliError(f"The tokenizer in {path} is not a fast tokenizer; lora-cli needs one (tokenizer.json).")
    if tokenizer.eos_token_id is None:
        raise LoraCliError(f"The tokenizer in {path} has no eos token; the model could never learn to stop.")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token  # padding is masked by attention and labels, never by id
    return tokenizer


def guard_cpu_4bit(model) -> None:
    """Stop bitsandbytes from repacking 4-bit weights for CPU inference (see PLATFORM.md).

    On CPUs with avx512_bf16 the first eval()+no_grad forward repacks every Linear4bit into
    an inference layout without an autograd path; training then silently stops learning.
    """
    bnb_nn = sys.modules.get("bitsandbytes.nn")
    if bnb_nn is None:  # no 4-bit layer can exist before bitsandbytes is imported (and importing it costs seconds)
        return
    for module in model.modules():
        if isinstance(module, bnb_nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False


def load_model(path: Path, quantization: str, precision: str, device, trust_remote_code: bool = False,
               attn_implementation: str = "sdpa", sharded: bool = False):
    """The base model on `device`, 4-bit NF4 (compute dtype = precision) or unquantized.

    sharded (FSDP): loaded on the CPU, 4-bit bytes stored as the compute dtype; FSDP moves it
    to the GPU one unit at a time (see sharding.py).
    """
    import torch
    from transformers import AutoModelForCausalLM

    dtype = torch_dtype(precision)
    kwargs = dict(use_safetensors=True, trust_remote_code=trust_remote_code, attn_implementation=attn_implementation,
                  dtype=dtype)
    if quantization == "nf4":
        try:
            import bitsandbytes  # noqa: F401
            from transformers import BitsAndBytesConfig
        except ImportError:
            raise LoraCliError("4-bit loading needs bitsandbytes, which is not installed.",
                               "pip install bitsandbytes, or pass --quantization none.") from None
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype,
            bnb_4bit_quant_storage=dtype if sharded else torch.uint8)
        kwargs["device_map"] = {"": "cpu" if sharded else torch.device(device)}
    try:
        model = AutoModelForCausalLM.from_pretrained(str(path), **kwargs)
    except (OSError, ValueError) as exc:
        raise _load_error(exc, "model", path) from None
    if quantization != "nf4" and not sharded:
        model.to(device)
    model.config.use_cache = False
    guard_cpu_4bit(model)
    return model


def decoder_layers(model) -> list:
    from transformers.modeling_layers import GradientCheckpointingLayer

    return [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]


def prepare_for_training(model, quantized: bool, upcast: bool, checkpoint_layers: int,
                         input_grads: bool = False) -> None:
    """Freeze the base; optionally upcast non-quantized weights to fp32 (peft's way); checkpointing.

    checkpoint_layers: 0 = none, -1 = every decoder layer, N = the first N decoder layers (the
    memory/speed dial: each checkpointed layer keeps only its input and is recomputed in the
    backward pass). input_grads: the embeddings' output requires grad, so every decoder layer
    sees an input that does (compiled layers then share one graph instead of two: layer 0's
    input would otherwise be the only one without).
    """
    if quantized and upcast:
        from peft import prepare_model_for_kbit_training

        prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    else:
        for param in model.parameters():
            param.requires_grad_(False)
    if checkpoint_layers:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if input_grads or checkpoint_layers:
        model.enable_input_require_grads()
    if checkpoint_layers > 0:
        for layer in decoder_layers(model)[checkpoint_layers:]:
            layer.gradient_checkpointing = False


def compile_layers(model, mode: str = "on", static_shapes: bool = False) -> None:
    """torch.compile each decoder layer (fuses norms, activations, rotary embedding and LoRA glue).

    mode "graphs": inductor's reduce-overhead mode, each layer replayed as a CUDA graph (one
    launch instead of dozens; needs static shapes). static_shapes: compile for the one shape
    every micro-batch has (dynamic=False); otherwise a shape seen twice becomes dynamic.
    """
    options = {"mode": "reduce-overhead"} if mode == "graphs" else {}
    for layer in decoder_layers(model):
        layer.compile(dynamic=False if static_shapes else None, **options)


def dequantized_bytes(model, precision: str) -> int:
    """Bytes that keeping the 4-bit weights dequantized (in the compute dtype) would add; 0 if none."""
    bnb_nn = sys.modules.get("bitsandbytes.nn")
    if bnb_nn is None:  # not imported: the model holds no 4-bit layer
        return 0
    per = {"bf16": 2, "fp16": 2, "fp32": 4}[precision]
    # a Linear4bit's weight holds two values a byte; its logical shape is out_features x in_features
    return int(sum(m.out_features * m.in_features * (per - 0.5) for m in model.modules()
                   if isinstance(m, bnb_nn.Linear4bit)))


def meta_model(config_dir, trust_remote_code: bool = False):
    """The model of config_dir/config.json built on the meta device: its modules and shapes,
    no weights (instant even for a large model; nothing is loaded or downloaded)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(str(config_dir), trust_remote_code=trust_remote_code)
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        raise _load_error(exc, "model config", Path(config_dir)) from None


def check_targets(name: str, lora: LoraSettings, trust_remote_code: bool = False) -> Targets:
    """LoRA's target modules checked against model `name` (hub id, folder, embedded name) before
    any weight loads: from its config.json on the meta device. LoraCliError names every name
    that is not a module LoRA can adapt (see targets.resolve_targets)."""
    model = meta_model(resolve_model(name, need_weights=False).path, trust_remote_code)
    targets = resolve_targets(model, lora.target_modules, name)
    modules = dict(model.named_modules())
    shapes = [getattr(modules.get(n), "weight", None) for n in targets.adapted]
    # r x (inputs + outputs) per adapted 2-D weight: the size of its A and B
    count = sum(lora.r * (w.shape[0] + w.shape[1]) for w in shapes if w is not None and w.dim() == 2)
    return replace(targets, lora_parameters=count)


def attach_lora(model, lora: LoraSettings, model_name: str = "the model", model_path: Path | None = None):
    """peft's LoRA (DoRA, rsLoRA, and the initialisation chosen) on `model`, on the modules
    targets.resolve_targets finds (every name checked).

    model_path: the base's folder, whose safetensors LoftQ reads the unquantized weights from.
    Errors: LoraCliError when the settings do not fit the model (no target module, an init that
    the base's dtype does not allow).
    """
    from peft import LoraConfig, get_peft_model

    targets = resolve_targets(model, lora.target_modules, model_name)
    # init `default` is peft's True (kaiming A, zero B); loftq starts as default and is then replaced
    init = {"default": True, "loftq": True}.get(lora.init_lora_weights, lora.init_lora_weights)
    try:
        peft_model = get_peft_model(model, LoraConfig(
            r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, bias=lora.bias, task_type="CAUSAL_LM",
            target_modules=targets.peft_value, use_dora=lora.use_dora, use_rslora=lora.use_rslora,
            init_lora_weights=init))
        if lora.init_lora_weights == "loftq":
            from peft import replace_lora_weights_loftq

            replace_lora_weights_loftq(peft_model, model_path=str(model_path) if model_path else None)
        return peft_model
    except (ValueError, TypeError, FileNotFoundError) as exc:
        raise LoraCliError(f"Cannot attach LoRA: {exc}",
                           "Check --target-modules against the model's module names (e.g. q_proj,v_proj, or "
                           "all-linear), and --init-lora-weights against --quantization.") from None
