"""`lora-cli train --gpus N`: the same command, started by accelerate's launcher (torchrun underneath)."""

from __future__ import annotations

import os
import subprocess
import sys


def strip_gpus(argv: list[str]) -> list[str]:
    """The workers' argv: without --gpus N and --fsdp, which the launcher's own flags carry."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
            continue
        if arg == "--fsdp":
            continue
        if arg == "--gpus":
            skip = True
            continue
        if arg.startswith("--gpus="):
            continue
        out.append(arg)
    return out


def launch_command(n: int, argv: list[str], fsdp: bool = False) -> list[str]:
    # --multi_gpu selects torchrun; on a machine without GPUs the processes fall back to the CPU
    # with gloo (what the test suite uses). Precision stays lora-cli's own choice (--precision).
    from lora_cli.sharding import LAUNCH_FLAGS

    mode = LAUNCH_FLAGS if fsdp else ["--multi_gpu"]
    return [sys.executable, "-m", "accelerate.commands.launch", *mode, "--num_processes", str(n),
            "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "lora_cli",
            *strip_gpus(argv)]


def relaunch_with_accelerate(n: int, fsdp: bool = False) -> int:
    """Run the launcher and wait. Ctrl-C reaches the workers (same process group), which save a
    checkpoint and exit; this parent must not die first and take the launcher down with it."""
    import signal

    env = dict(os.environ)
    env.setdefault("NCCL_NVLS_ENABLE", "0")
    env.setdefault("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1")
    proc = subprocess.Popen(launch_command(n, sys.argv[1:], fsdp), env=env)
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        return proc.wait()
    finally:
        signal.signal(signal.SIGINT, previous)
