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
    return [sys.executable, "-m", "lora_cli.launch", *mode, "--num_processes", str(n),
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


def accelerate_launch(argv: list[str]) -> int:
    """accelerate's launcher, minus its traceback when a worker fails.

    A worker that stops on bad input has printed its one-line error and exited 1 (130 after
    Ctrl-C); the launcher would then add torch elastic's ChildFailedError traceback. Here it
    exits with the worker's own code instead.
    """
    import logging

    from accelerate.commands.launch import launch_command as run
    from accelerate.commands.launch import launch_command_parser
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)  # "worker failed": it said why
    try:
        run(launch_command_parser().parse_args(argv))
    except ChildFailedError as exc:
        codes = [f.exitcode for _, f in sorted(exc.failures.items())]
        code = next((c for c in codes if c > 0), None)
        return code if code is not None else 128 - codes[0]  # killed by a signal: 128 + its number
    return 0


if __name__ == "__main__":
    sys.exit(accelerate_launch(sys.argv[1:]))
