"""Where and how a run executes: device, precision, processes, and the automatic settings.

Everything "auto" in the config is decided here, once, from the hardware, and the decision
is recorded in the saved run config so a run can be reproduced on other hardware.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass

from lora_cli.config import RunConfig
from lora_cli.errors import LoraCliError

GPU_MAX_TOKENS = 16384  # packed tokens per micro-batch on a GPU (see docs/PERFORMANCE.md)
GPU_PACK_LENGTH = 1024  # tokens per packed row: sdpa attends over whole rows, so shorter rows waste less


@dataclass
class Runtime:
    accelerator: object
    device: object
    precision: str  # bf16 | fp16 | fp32 (resolved)
    packed: bool
    max_tokens: int
    pack_length: int
    checkpoint_layers: int  # 0 none, -1 all, N the first N decoder layers
    upcast: bool
    world_size: int
    rank: int
    grad_accum: int = 1
    auto_checkpointing: bool = False  # decide checkpoint_layers from the memory budget once the model is known
    compile: bool = False
    fsdp: bool = False  # base sharded over the processes (lora_cli/sharding.py) instead of copied

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def on_cuda(self) -> bool:
        return getattr(self.device, "type", str(self.device)) == "cuda"

    def decisions(self) -> dict:
        return {"device": str(self.device), "precision": self.precision, "batching": "packed" if self.packed else "padded",
                "max_tokens": self.max_tokens, "pack_length": self.pack_length,
                "checkpoint_layers": self.checkpoint_layers, "upcast": "fp32" if self.upcast else "none",
                "compile": self.compile, "world_size": self.world_size, "fsdp": self.fsdp,
                "micro_batches_per_step": self.grad_accum * self.world_size}


def _has_triton() -> bool:
    import importlib.util

    return importlib.util.find_spec("triton") is not None


CPU_BF16_ENV = "LORA_CLI_CPU_BF16"  # 1/0: take the CPU as having (or lacking) native bf16; unset: detect


def cpu_has_fast_bf16() -> bool:
    """Whether this CPU computes bf16 natively (avx512_bf16 or AMX), which makes bf16 the fastest
    CPU precision. LORA_CLI_CPU_BF16=1/0 overrides the detection: how the suite runs both ways on
    any machine."""
    forced = os.environ.get(CPU_BF16_ENV, "").strip()
    if forced in ("0", "1"):
        return forced == "1"
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as fh:
            for line in fh:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return bool(flags & {"avx512_bf16", "amx_bf16"})
    except OSError:
        pass
    return False


def resolve_precision(requested: str, device_type: str) -> str:
    import torch

    if requested == "auto":
        if device_type == "cuda":
            return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        # bf16 is the fastest CPU path only with hardware bf16 (avx512_bf16/AMX); without it, torch
        # emulates bf16 matmuls ~50x slower than fp32 (measured: docs/PERFORMANCE.md).
        return "bf16" if cpu_has_fast_bf16() else "fp32"
    if requested == "fp16" and device_type != "cuda":
        raise LoraCliError("--precision fp16 needs a CUDA GPU; on the CPU use bf16 or fp32.")
    if requested == "bf16" and device_type == "cuda" and not torch.cuda.is_bf16_supported():
        raise LoraCliError("This GPU does not support bf16; use --precision fp16 or fp32.")
    return requested


def fresh_accelerator(cpu: bool, mixed_precision: str):
    """An Accelerator for this run, whatever an earlier run in the same process left behind.

    accelerate keeps its state process-wide: a second `Accelerator(mixed_precision=...)` with
    another precision (or `cpu=True` after a GPU run) raises "AcceleratorState has already been
    initialized". A notebook, a sweep or the benchmark harness trains several times in one process,
    so the precision state is cleared first, as transformers' Trainer does before each run
    (`AcceleratorState._reset_state`). The process state (device, process group) is kept when
    torch.distributed is running: a launched worker keeps its place in the group. torch.compile's
    caches are cleared too, so earlier runs' compiled layers do not count against dynamo's
    recompile limit (which would silently run this run's layers uncompiled).
    """
    import torch
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState

    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    AcceleratorState._reset_state(reset_partial_state=not distributed)
    GradientState._reset_state()
    if "torch._dynamo" in sys.modules:  # only an earlier compile can have left anything
        torch._dynamo.reset()
    return Accelerator(cpu=cpu, mixed_precision=mixed_precision)


def make_runtime(cfg: RunConfig) -> Runtime:
    import torch

    t = cfg.train
    want = t.device
    if want.startswith("cuda") and not torch.cuda.is_available():
        raise LoraCliError("--device cuda was asked for, but no CUDA GPU is visible to torch.")
    cpu = want == "cpu" or not torch.cuda.is_available()
    device_type = "cpu" if cpu else "cuda"
    precision = resolve_precision(t.precision, device_type)
    from lora_cli.sharding import check_fsdp_setup, fsdp_requested

    fsdp = fsdp_requested()
    if fsdp and cpu:
        check_fsdp_setup(None, on_cuda=False)
    accelerator = fresh_accelerator(cpu, {"fp32": "no"}.get(precision, precision))
    if fsdp:
        check_fsdp_setup(accelerator, on_cuda=True)
    packed = t.batching != "padded"
    # 0 = decided from the data (see resolve_max_tokens); a GPU wants large micro-batches
    max_tokens = t.max_tokens or (0 if cpu else GPU_MAX_TOKENS)
    pack_length = t.pack_length or (0 if cpu else min(GPU_PACK_LENGTH, max_tokens))
    gc = t.gradient_checkpointing
    layers = {"on": -1, "off": 0}.get(gc, int(gc) if gc.isdigit() else (0 if cpu else None))
    upcast = {"fp32": True, "none": False}.get(cfg.model.upcast, precision == "fp16")
    if fsdp and upcast:  # an FSDP unit flattens one dtype: fp32 norms beside 16-bit weights cannot be sharded
        raise LoraCliError("--upcast fp32 (or fp16, which upcasts by default) cannot be sharded with FSDP.",
                           "Use --precision bf16 with FSDP, or pass --upcast none.")
    # compiled layers under FSDP1 are untested here: off unless asked for
    compile_default = not cpu and not fsdp and _has_triton()
    return Runtime(accelerator, accelerator.device, precision, packed, max_tokens, pack_length,
                   -1 if layers is None else layers, upcast, accelerator.num_processes, accelerator.process_index,
                   grad_accum=t.grad_accum, auto_checkpointing=layers is None,
                   compile={"on": True, "off": False}.get(t.compile, compile_default), fsdp=fsdp)


def resolve_max_tokens(rt: Runtime, lengths: list[int], batch_size: int) -> int:
    """The packed token budget when left automatic on the CPU.

    A CPU gains nothing from large micro-batches, so the budget keeps the recipe's average of
    `batch_size` examples per micro-batch (and so its number of optimizer steps), minus the
    padding. An example longer than the budget still gets a micro-batch of its own.
    """
    if rt.max_tokens or not lengths:
        return rt.max_tokens or 1
    rt.max_tokens = max(1, round(batch_size * sum(lengths) / len(lengths)))
    return rt.max_tokens


def resolve_checkpointing(rt: Runtime, model_path, budget_gib: float, reporter=None) -> None:
    """Auto gradient checkpointing on a GPU: checkpoint only as many layers as the budget needs."""
    if not rt.auto_checkpointing:
        return
    from transformers import AutoConfig

    from lora_cli.memory import default_budget_bytes, plan_checkpointing

    config = AutoConfig.from_pretrained(str(model_path))
    import torch

    weights = torch.cuda.memory_allocated(rt.device)
    plan = plan_checkpointing(config, rt.max_tokens, default_budget_bytes(budget_gib), weights)
    rt.checkpoint_layers = plan.checkpoint_layers
    if reporter is not None:
        reporter.message(f"Memory plan: {plan.checkpoint_layers} checkpointed layer(s), ~{plan.estimated_peak_gib:.1f} GiB "
                         f"of a {plan.budget_gib:.1f} GiB budget" + ("" if plan.fits else " (may not fit: lower --max-tokens)"))
