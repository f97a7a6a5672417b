"""Where a run executes: device, precision and processes, decided once from the hardware.

These come first because loading the model and starting the process group need them; the
settings that also depend on the model and the data are decided by plan.decide. Both results
are frozen and recorded in the saved run config, so a run can be reproduced on other hardware.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING

from lora_cli.config import RunConfig
from lora_cli.errors import LoraCliError

if TYPE_CHECKING:
    import torch
    from accelerate import Accelerator


@dataclass(frozen=True)
class Placement:
    accelerator: Accelerator  # processes, DDP/FSDP wrapping, mixed precision
    device: torch.device  # of this process
    precision: str  # bf16 | fp16 | fp32 (resolved)
    world_size: int  # processes
    rank: int
    fsdp: bool = False  # base sharded over the processes (lora_cli/train/sharding.py) instead of copied

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def on_cuda(self) -> bool:
        return getattr(self.device, "type", str(self.device)) == "cuda"


def fresh_accelerator(cpu: bool, mixed_precision: str, **tracking: str | list[str]) -> Accelerator:
    """An Accelerator for this run, whatever an earlier run in the same process left behind.

    accelerate keeps its state process-wide: a second `Accelerator(mixed_precision=...)` with
    another precision (or `cpu=True` after a GPU run) raises "AcceleratorState has already been
    initialized". A notebook, a sweep or the benchmark harness trains several times in one process,
    so the precision state is cleared first, as transformers' Trainer does before each run
    (`AcceleratorState._reset_state`). The process state (device, process group) is kept when
    torch.distributed is running: a launched worker keeps its place in the group. torch.compile's
    caches are cleared too, so earlier runs' compiled layers do not count against dynamo's
    recompile limit (which would silently run this run's layers uncompiled). `tracking`:
    log_with and project_dir for the experiment trackers (trackers.accelerator_kwargs).
    """
    import torch
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState

    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    AcceleratorState._reset_state(reset_partial_state=not distributed)
    GradientState._reset_state()
    if "torch._dynamo" in sys.modules:  # only an earlier compile can have left anything
        torch._dynamo.reset()
    return Accelerator(cpu=cpu, mixed_precision=mixed_precision, **tracking)


def wants_upcast(cfg: RunConfig, precision: str) -> bool:
    """Non-quantized weights in fp32: as --upcast says; automatic: only under fp16, whose range is
    too narrow for the norms (bf16 and fp32 need no upcast)."""
    return {"fp32": True, "none": False}.get(cfg.model.upcast, precision == "fp16")


def place(cfg: RunConfig) -> Placement:
    """Device (train.device), precision (train.precision) and processes for this run.

    Errors: LoraCliError for a device that is not there, a precision the device cannot do, FSDP
    without CUDA GPUs, a tracker whose package is missing, or an option this placement cannot run
    (before any model is loaded).
    """
    from lora_cli.model.device import pick_device, resolve_precision
    from lora_cli.train import trackers
    from lora_cli.train.sharding import check_fsdp_setup, fsdp_requested

    trackers.check_installed(cfg.train.trackers())
    device_type = pick_device(cfg.train.device).type
    if cfg.lora.init_lora_weights == "loftq" and device_type != "cuda":
        raise LoraCliError("--init-lora-weights loftq needs a CUDA GPU: peft computes it there "
                           "(replace_lora_weights_loftq).", "Use default or gaussian on the CPU.")
    precision = resolve_precision(cfg.train.precision, device_type)
    fsdp = fsdp_requested()
    if fsdp and device_type == "cpu":
        check_fsdp_setup(None, on_cuda=False)
    if fsdp and wants_upcast(cfg, precision):  # an FSDP unit flattens one dtype: fp32 norms beside 16-bit weights
        raise LoraCliError("--upcast fp32 (or fp16, which upcasts by default) cannot be sharded with FSDP.",
                           "Use --precision bf16 with FSDP, or pass --upcast none.")
    if fsdp and (cfg.train.loraplus_lr_ratio or cfg.lora.init_lora_weights in ("pissa", "olora")):
        raise LoraCliError("--loraplus-lr-ratio, and --init-lora-weights pissa or olora, do not run under --fsdp "
                           "(FSDP flattens the LoRA weights they tell apart by name).")
    accelerator = fresh_accelerator(device_type == "cpu", {"fp32": "no"}.get(precision, precision),
                                    **trackers.accelerator_kwargs(cfg))
    if fsdp:
        check_fsdp_setup(accelerator, on_cuda=True)
    return Placement(accelerator, accelerator.device, precision, accelerator.num_processes,
                     accelerator.process_index, fsdp)
