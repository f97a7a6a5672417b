"""`lora-cli train --gpus N`: the same command, started by accelerate's launcher (torchrun underneath),
and the command line that resumes a run."""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from collections.abc import Mapping

from lora_cli.errors import LoraCliError
from lora_cli.train.sharding import check_fsdp_setup, fsdp_requested

# Flags that say where a run starts; the resume command replaces them with --resume.
START_FLAGS = ("--resume", "--overwrite")
START_OPTIONS = ("--resume-from",)


def resume_command(argv: list[str], env: Mapping[str, str] | None = None) -> str:
    """The command line that continues this run from its latest checkpoint: the same flags, with
    --resume in place of --overwrite / --resume / --resume-from PATH (which would go back to the
    older checkpoint). A run started with --gpus N runs as N processes whose own argv lacks it
    (launch_command); it is put back, since a checkpoint resumes only on as many processes."""
    env = os.environ if env is None else env
    kept = _without(argv, START_FLAGS, START_OPTIONS)
    world, local = env.get("WORLD_SIZE", "1"), env.get("LOCAL_WORLD_SIZE", "1")
    if world == local and world.isdigit() and int(world) > 1 and not any(a.startswith("--gpus") for a in kept):
        kept += ["--gpus", world]
        if fsdp_requested(env) and "--fsdp" not in kept:
            kept.append("--fsdp")
    return shlex.join(["lora-cli", *kept, "--resume"])


def launch_if_asked(gpus: int | None, fsdp: bool) -> int | None:
    """With --gpus N (N >= 2): run this command as N processes through accelerate's launcher and return
    their exit code. Otherwise None: this process trains. Refuses --fsdp where it cannot work, before
    any process starts."""
    if gpus and gpus > 1:
        import signal

        if fsdp:
            import torch

            check_fsdp_setup(None, on_cuda=torch.cuda.is_available())  # before N processes fail the same way
        env = dict(os.environ)
        env.setdefault("NCCL_NVLS_ENABLE", "0")
        env.setdefault("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1")
        proc = subprocess.Popen(launch_command(gpus, sys.argv[1:], fsdp), env=env)
        # Ctrl-C reaches the workers (same process group), which save a checkpoint and exit; this
        # parent must not die first and take the launcher down with it
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
        try:
            return proc.wait()
        finally:
            signal.signal(signal.SIGINT, previous)
    if fsdp and not fsdp_requested():
        raise LoraCliError("--fsdp shards the model over several processes: give it with --gpus N (N >= 2), "
                           "or start lora-cli with accelerate launch --config_file configs/accelerate/fsdp-qlora.yaml.")
    return None


def _without(argv: list[str], flags: tuple[str, ...], options: tuple[str, ...]) -> list[str]:
    """`argv` less `flags`, and less `options` with their values (--option VALUE or --option=VALUE)."""
    kept, args = [], iter(argv)
    for arg in args:
        if arg in options:
            next(args, None)  # its value
        elif arg not in flags and not arg.startswith(tuple(o + "=" for o in options)):
            kept.append(arg)
    return kept


def launch_command(n: int, argv: list[str], fsdp: bool = False) -> list[str]:
    # --multi_gpu selects torchrun; on a machine without GPUs the processes fall back to the CPU
    # with gloo (what the test suite uses). Precision stays lora-cli's own choice (--precision).
    from lora_cli.train.sharding import LAUNCH_FLAGS

    mode = LAUNCH_FLAGS if fsdp else ["--multi_gpu"]
    return [sys.executable, "-m", "lora_cli.train.launch", *mode, "--num_processes", str(n),
            "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "lora_cli",
            *_without(argv, ("--fsdp",), ("--gpus",))]  # the launcher's own flags carry --gpus N and --fsdp


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
