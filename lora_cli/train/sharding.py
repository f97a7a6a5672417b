"""QLoRA + FSDP: what changes when the base model is sharded over the GPUs instead of copied.

accelerate wraps the model (FSDP1, started by `lora-cli train --gpus N --fsdp` or
`accelerate launch --config_file configs/accelerate/fsdp-qlora.yaml`). For 4-bit weights to
be sharded at all, three things must hold, as in peft's and transformers' FSDP-QLoRA recipe:
- the packed 4-bit bytes are stored as the compute dtype (`bnb_4bit_quant_storage`), so FSDP
  can flatten them together with the layer's other (bf16) weights;
- every FSDP unit holds parameters of one dtype and one requires_grad: decoder layers are
  units, and each LoRA matrix is a unit of its own (peft's `fsdp_auto_wrap_policy`); so no
  fp32 upcast of norms (`prepare_model_for_kbit_training`) under FSDP;
- each process quantizes the base on the CPU and FSDP moves one unit at a time to its GPU and
  shards it, so no GPU ever holds the whole model (bitsandbytes keeps the quantization state
  on the module, where it survives FSDP's flattening).
Adapter and optimizer state are gathered to the main process (FULL_STATE_DICT) to be saved in
the same checkpoint format as a single-GPU run's; resuming scatters them back.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from lora_cli.errors import LoraCliError

if TYPE_CHECKING:
    from collections.abc import Mapping
    from contextlib import AbstractContextManager

    import torch
    from accelerate import Accelerator
    from peft import PeftModel

# accelerate launch flags for lora-cli's FSDP setup (configs/accelerate/fsdp-qlora.yaml says the same)
LAUNCH_FLAGS = ["--use_fsdp", "--fsdp_version", "1", "--fsdp_sharding_strategy", "FULL_SHARD",
                "--fsdp_use_orig_params", "false", "--fsdp_sync_module_states", "false",
                "--fsdp_cpu_ram_efficient_loading", "false", "--fsdp_backward_prefetch", "BACKWARD_PRE",
                "--fsdp_state_dict_type", "FULL_STATE_DICT"]


def fsdp_requested(env: Mapping[str, str] | None = None) -> bool:
    env = os.environ if env is None else env
    return env.get("ACCELERATE_USE_FSDP", "false").lower() == "true"


def check_fsdp_setup(accelerator: Accelerator, on_cuda: bool) -> None:
    """Refuse FSDP settings that cannot work with a 4-bit base, before any model is loaded."""
    if not on_cuda:
        raise LoraCliError("FSDP was asked for (--fsdp, or use_fsdp in an accelerate config), but it needs CUDA GPUs "
                           "and torch sees none.", "Drop --fsdp to train data-parallel on the CPU.")
    if accelerator is None:
        return
    plugin = accelerator.state.fsdp_plugin
    if getattr(plugin, "fsdp_version", 1) != 1:
        raise LoraCliError("lora-cli's QLoRA + FSDP path runs FSDP version 1; the accelerate config asks for "
                           f"version {plugin.fsdp_version}.", "Set fsdp_version: 1 (configs/accelerate/fsdp-qlora.yaml).")
    if plugin.cpu_ram_efficient_loading:
        raise LoraCliError("fsdp_cpu_ram_efficient_loading is on: every process but the first would load the "
                           "base on the meta device, which a 4-bit base does not survive.",
                           "Set fsdp_cpu_ram_efficient_loading: false (configs/accelerate/fsdp-qlora.yaml); each "
                           "process quantizes the base on the CPU and FSDP moves it to the GPU shard by shard.")


def configure(accelerator: Accelerator, peft_model: PeftModel, precision: str) -> None:
    """Wrap policy (decoder layers + one unit per LoRA matrix) and mixed precision for the plugin."""
    import torch
    from peft.utils.other import fsdp_auto_wrap_policy
    from torch.distributed.fsdp import MixedPrecision

    plugin = accelerator.state.fsdp_plugin
    plugin.auto_wrap_policy = fsdp_auto_wrap_policy(peft_model)
    compute = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    # LoRA weights stay fp32 (the optimizer's copy); forward in the compute dtype; gradients reduced
    # in fp32 (LoRA gradients are small, their precision is not); buffers (rotary) stay fp32.
    plugin.mixed_precision_policy = (MixedPrecision(param_dtype=compute, reduce_dtype=torch.float32,
                                                    buffer_dtype=torch.float32) if compute else None)


def _contexts(module: torch.nn.Module, rank0_only: bool) -> AbstractContextManager[None]:
    from torch.distributed.fsdp import FullOptimStateDictConfig, FullStateDictConfig, StateDictType
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    offload = next(module.parameters()).device.type != "cpu"  # gathered on the GPU, kept on the CPU
    return FSDP.state_dict_type(module, StateDictType.FULL_STATE_DICT,
                                FullStateDictConfig(offload_to_cpu=offload, rank0_only=rank0_only),
                                FullOptimStateDictConfig(offload_to_cpu=offload, rank0_only=rank0_only))


def adapter_names(peft_model: PeftModel, prefix: str = "model.") -> dict:
    """{name in the training module's state dict: name in the adapter file}, learnt from peft on the
    unwrapped model (under FSDP, peft no longer recognises its own layers by their module names)."""
    from peft import get_peft_model_state_dict

    state = peft_model.state_dict()
    saved = get_peft_model_state_dict(peft_model, state_dict=state)
    owner = {id(v): k for k, v in state.items()}
    return {prefix + owner[id(v)]: k for k, v in saved.items()}


def gather(module: torch.nn.Module, optimizer: torch.optim.Optimizer, names: dict) -> tuple[dict, dict]:
    """(adapter tensors as the adapter file names them, optimizer state), whole, on the main
    process; empty dicts elsewhere. `names` comes from `adapter_names` before wrapping.

    Collective: every process must call it. The optimizer state is keyed by parameter names
    (FSDP's full format), so it loads back at any world size.
    """
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    with _contexts(module, rank0_only=True):
        root = module.state_dict()
        optim = FSDP.optim_state_dict(module, _inner(optimizer))
    if not root:
        return {}, {}
    return {names[k]: v for k, v in root.items() if k in names}, optim


def load_optimizer(module: torch.nn.Module, optimizer: torch.optim.Optimizer, full_state: dict) -> None:
    """Scatter a gathered optimizer state back to this process's shards (every process calls it)."""
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    with _contexts(module, rank0_only=False):
        local = FSDP.optim_state_dict_to_load(module, _inner(optimizer), full_state)
    optimizer.load_state_dict(local)


def _inner(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    return getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer wraps the torch one
