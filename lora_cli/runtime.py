"""Where and how a run executes: device, precision, processes, and the automatic settings.

Everything "auto" in the config is decided here, once, from the hardware, and the decision
is recorded in the saved run config so a run can be reproduced on other hardware.
"""

from __future__ import annotations

from dataclasses import dataclass

from lora_cli.config import RunConfig
from lora_cli.errors import LoraCliError

GPU_MAX_TOKENS = 16384  # packed tokens per micro-batch on a GPU (see docs/PERFORMANCE.md)


@dataclass
class Runtime:
    accelerator: object
    device: object
    precision: str  # bf16 | fp16 | fp32 (resolved)
    packed: bool
    max_tokens: int
    gradient_checkpointing: bool
    upcast: bool
    world_size: int
    rank: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def on_cuda(self) -> bool:
        return getattr(self.device, "type", str(self.device)) == "cuda"

    def decisions(self) -> dict:
        return {"device": str(self.device), "precision": self.precision, "batching": "packed" if self.packed else "padded",
                "max_tokens": self.max_tokens, "gradient_checkpointing": self.gradient_checkpointing,
                "upcast": "fp32" if self.upcast else "none", "world_size": self.world_size}


def cpu_has_fast_bf16() -> bool:
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


def make_runtime(cfg: RunConfig) -> Runtime:
    import torch
    from accelerate import Accelerator

    t = cfg.train
    want = t.device
    if want.startswith("cuda") and not torch.cuda.is_available():
        raise LoraCliError("--device cuda was asked for, but no CUDA GPU is visible to torch.")
    cpu = want == "cpu" or not torch.cuda.is_available()
    device_type = "cpu" if cpu else "cuda"
    precision = resolve_precision(t.precision, device_type)
    accelerator = Accelerator(cpu=cpu, mixed_precision={"fp32": "no"}.get(precision, precision))
    packed = t.batching != "padded"
    # 0 = decided from the data (see resolve_max_tokens); a GPU wants large micro-batches
    max_tokens = t.max_tokens or (0 if cpu else GPU_MAX_TOKENS)
    gc = {"on": True, "off": False}.get(t.gradient_checkpointing, not cpu)
    upcast = {"fp32": True, "none": False}.get(cfg.model.upcast, precision == "fp16")
    return Runtime(accelerator, accelerator.device, precision, packed, max_tokens, gc, upcast,
                   accelerator.num_processes, accelerator.process_index)


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
