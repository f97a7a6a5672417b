"""Which device and which precision: the one place that checks and resolves them.

Training (runtime.place), generate/chat/eval (inference) and merge all ask here, so "auto",
"cuda" without a GPU, and fp16 on a CPU get the same answer and the same message everywhere.
"""

from __future__ import annotations

import os

from lora_cli.config import PRECISIONS, check_device_name
from lora_cli.errors import LoraCliError

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
            flags = next((line.split(":", 1)[1].split() for line in fh if line.startswith("flags")), [])
    except OSError:
        return False
    return bool({"avx512_bf16", "amx_bf16"} & set(flags))


def pick_device(device: str = "auto"):
    """torch.device for --device: auto (a CUDA GPU when torch sees one), cpu, cuda or cuda:N."""
    import torch

    check_device_name(device)
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise LoraCliError("--device cuda was asked for, but no CUDA GPU is visible to torch.")
    return torch.device(device)


def resolve_precision(requested: str, device_type: str) -> str:
    """bf16, fp16 or fp32 for --precision on a device type ("cpu" or "cuda").

    auto: bf16 on a GPU that has it (else fp16); on a CPU, bf16 only with hardware bf16
    (avx512_bf16/AMX): without it torch emulates bf16 matmuls ~50x slower than fp32
    (docs/PERFORMANCE.md).
    """
    import torch

    if requested not in PRECISIONS:
        raise LoraCliError(f"--precision must be one of {', '.join(PRECISIONS)}, not {requested!r}.")
    if requested == "auto":
        if device_type == "cuda":
            return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        return "bf16" if cpu_has_fast_bf16() else "fp32"
    if requested == "fp16" and device_type != "cuda":
        raise LoraCliError("--precision fp16 needs a CUDA GPU; on the CPU use bf16 or fp32.")
    if requested == "bf16" and device_type == "cuda" and not torch.cuda.is_bf16_supported():
        raise LoraCliError("This GPU does not support bf16; use --precision fp16 or fp32.")
    return requested


def torch_dtype(precision: str):
    """torch dtype of bf16 / fp16 / fp32."""
    import torch

    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[precision]
