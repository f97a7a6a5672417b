"""`lora-cli train`: reads the cache (tokenizing first if needed), trains, writes ./adapters."""

from __future__ import annotations

import os
import shlex
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from lora_cli.options import (TRAIN, AlphaOpt, CacheOpt, ConfigOpt, DropOpt, EosOpt, MaxLenOpt, ModelOpt, PromptOpt,
                              QuantOpt, RankOpt, SetOpt, SkipOpt, TargetsOpt, TemplateOpt, TrainFileOpt, TrustOpt,
                              UpcastOpt, ValFileOpt, data_flags, lora_flags)

Opt = typer.Option
# Flags that say where a run starts; the resume command replaces them with --resume.
START_FLAGS = ("--resume", "--overwrite")
START_OPTIONS = ("--resume-from",)


def resume_command(argv: list[str], env=None) -> str:
    """The command line that continues this run from its latest checkpoint: the same flags, with
    --resume in place of --overwrite / --resume / --resume-from PATH (which would go back to the
    older checkpoint). A run started with --gpus N runs as N processes whose own argv lacks it
    (launch.strip_gpus); it is put back, since a checkpoint resumes only on as many processes."""
    env = os.environ if env is None else env
    kept, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg in START_FLAGS or any(arg.startswith(o + "=") for o in START_OPTIONS):
            continue
        elif arg in START_OPTIONS:
            skip = True
        else:
            kept.append(arg)
    world, local = env.get("WORLD_SIZE", "1"), env.get("LOCAL_WORLD_SIZE", "1")
    if world == local and world.isdigit() and int(world) > 1 and not any(a.startswith("--gpus") for a in kept):
        kept += ["--gpus", world]
        if env.get("ACCELERATE_USE_FSDP", "false").lower() == "true" and "--fsdp" not in kept:
            kept.append("--fsdp")
    return shlex.join(["lora-cli", *kept, "--resume"])


def train(
    model: ModelOpt = None,
    train_file: TrainFileOpt = None,
    val: ValFileOpt = None,
    output: Annotated[Optional[Path], Opt("--output", "-o", help="Adapter folder. [default: adapters]")] = None,
    epochs: Annotated[Optional[int], Opt("--epochs", "-e", rich_help_panel=TRAIN, help="[default: 3]")] = None,
    max_steps: Annotated[Optional[int], Opt("--max-steps", rich_help_panel=TRAIN,
                                            help="Stop after this many optimizer steps (0: all epochs).")] = None,
    batch_size: Annotated[Optional[int], Opt("--batch-size", "-b", rich_help_panel=TRAIN,
                                             help="Examples per micro-batch when padded. [default: 2]")] = None,
    eval_batch_size: Annotated[Optional[int], Opt("--eval-batch-size", rich_help_panel=TRAIN, help="[default: 2]")] = None,
    grad_accum: Annotated[Optional[int], Opt("--grad-accum", rich_help_panel=TRAIN,
                                             help="Micro-batches per optimizer step. [default: 2]")] = None,
    lr: Annotated[Optional[float], Opt("--lr", rich_help_panel=TRAIN, help="[default: 2e-4]")] = None,
    weight_decay: Annotated[Optional[float], Opt("--weight-decay", rich_help_panel=TRAIN, help="[default: 0]")] = None,
    warmup_steps: Annotated[Optional[int], Opt("--warmup-steps", rich_help_panel=TRAIN, help="[default: 0]")] = None,
    scheduler: Annotated[Optional[str], Opt("--scheduler", rich_help_panel=TRAIN,
                                            help="linear, cosine or constant. [default: linear]")] = None,
    precision: Annotated[Optional[str], Opt("--precision", rich_help_panel=TRAIN,
                                            help="auto, bf16, fp16 or fp32. [default: auto: bf16 where supported]")] = None,
    batching: Annotated[Optional[str], Opt("--batching", rich_help_panel=TRAIN,
                                           help="packed (token budget, no padding), padded (the seed's), auto.")] = None,
    max_tokens: Annotated[Optional[int], Opt("--max-tokens", rich_help_panel=TRAIN,
                                             help="Tokens per packed micro-batch (0: automatic).")] = None,
    pack_length: Annotated[Optional[int], Opt("--pack-length", rich_help_panel=TRAIN,
                                              help="Tokens per packed row (0: automatic, 1024 on a GPU).")] = None,
    gradient_checkpointing: Annotated[Optional[str], Opt(
        "--gradient-checkpointing", rich_help_panel=TRAIN,
        help="auto (as many layers as the memory budget needs), on, off, or a number of layers.")] = None,
    memory_budget_gib: Annotated[Optional[float], Opt(
        "--memory-budget-gib", rich_help_panel=TRAIN,
        help="GPU memory the automatic settings plan for (0: min(24 GiB, 90% of the GPU)).")] = None,
    compile_layers: Annotated[Optional[str], Opt("--compile", rich_help_panel=TRAIN,
                                                 help="torch.compile the decoder layers: auto (on a GPU), on, off.")] = None,
    seed: Annotated[Optional[int], Opt("--seed", rich_help_panel=TRAIN, help="[default: 42]")] = None,
    log_every: Annotated[Optional[int], Opt("--log-every", rich_help_panel=TRAIN, help="[default: 10]")] = None,
    save_every_steps: Annotated[Optional[int], Opt("--save-every-steps", rich_help_panel=TRAIN,
                                                   help="Also checkpoint every N steps (0: each epoch only).")] = None,
    keep_checkpoints: Annotated[Optional[int], Opt("--keep-checkpoints", rich_help_panel=TRAIN, help="[default: 2]")] = None,
    device: Annotated[Optional[str], Opt("--device", rich_help_panel=TRAIN, help="auto, cpu or cuda.")] = None,
    lora_r: RankOpt = None,
    lora_alpha: AlphaOpt = None,
    lora_dropout: DropOpt = None,
    target_modules: TargetsOpt = None,
    quantization: QuantOpt = None,
    upcast: UpcastOpt = None,
    trust_remote_code: TrustOpt = None,
    template: TemplateOpt = None,
    max_length: MaxLenOpt = None,
    train_on_prompt: PromptOpt = None,
    add_eos: EosOpt = None,
    skip_invalid: SkipOpt = None,
    cache_dir: CacheOpt = None,
    resume: Annotated[bool, Opt("--resume", help="Continue from the latest checkpoint in the output folder.")] = False,
    resume_from: Annotated[Optional[Path], Opt("--resume-from", help="Continue from this checkpoint folder.")] = None,
    overwrite: Annotated[bool, Opt("--overwrite", help="Replace a different run's adapter folder.")] = False,
    gpus: Annotated[Optional[int], Opt("--gpus", help="Run on N GPUs through accelerate's launcher.")] = None,
    fsdp: Annotated[bool, Opt("--fsdp", help="With --gpus: shard the 4-bit base over the GPUs (FSDP) instead of "
                                             "copying it to each, for models too large for one GPU.")] = False,
    config: ConfigOpt = None,
    set_: SetOpt = None,
) -> None:
    """Train a LoRA adapter (QLoRA by default) and write it with its config, metrics and parameter summary."""
    if gpus and gpus > 1:
        from lora_cli.launch import relaunch_with_accelerate

        if fsdp:
            import torch

            from lora_cli.sharding import check_fsdp_setup

            check_fsdp_setup(None, on_cuda=torch.cuda.is_available())  # before N processes fail the same way

        raise typer.Exit(relaunch_with_accelerate(gpus, fsdp))
    if fsdp and os.environ.get("ACCELERATE_USE_FSDP", "false").lower() != "true":
        from lora_cli.errors import LoraCliError

        raise LoraCliError("--fsdp shards the model over several processes: give it with --gpus N (N >= 2), "
                           "or start lora-cli with accelerate launch --config_file configs/accelerate/fsdp-qlora.yaml.")
    from lora_cli.config import build_config
    from lora_cli.errors import TrainingInterrupted
    from lora_cli.render import RichReporter, out
    from lora_cli.training import train as run_training

    flags = data_flags(model, quantization, trust_remote_code, train_file, val, template, max_length, train_on_prompt,
                       add_eos, skip_invalid, cache_dir)
    flags.update(lora_flags(lora_r, lora_alpha, lora_dropout, target_modules))
    flags.update({
        "output.dir": str(output) if output else None, "model.upcast": upcast,
        "train.epochs": epochs, "train.max_steps": max_steps, "train.batch_size": batch_size,
        "train.eval_batch_size": eval_batch_size, "train.grad_accum": grad_accum, "train.lr": lr,
        "train.weight_decay": weight_decay, "train.warmup_steps": warmup_steps, "train.scheduler": scheduler,
        "train.precision": precision, "train.batching": batching, "train.max_tokens": max_tokens, "train.pack_length": pack_length,
        "train.gradient_checkpointing": gradient_checkpointing, "train.memory_budget_gib": memory_budget_gib,
        "train.compile": compile_layers, "train.seed": seed,
        "train.log_every": log_every, "train.save_every_steps": save_every_steps,
        "train.keep_checkpoints": keep_checkpoints, "train.device": device,
    })
    cfg = build_config(str(config) if config else None, set_, flags)
    reporter = RichReporter()
    try:
        result = run_training(cfg, resume=str(resume_from) if resume_from else resume, overwrite=overwrite,
                              reporter=reporter)
    except TrainingInterrupted as exc:
        exc.resume_command = resume_command(sys.argv[1:])
        raise
    d = result.decisions
    first = f"{result.first_loss:.4f}" if result.first_loss is not None else "-"
    last = f"{result.last_loss:.4f}" if result.last_loss is not None else "-"
    evals = " -> ".join(f"{x:.4f}" for x in result.eval_losses) or "-"
    out.print(f"Trained {result.steps} steps on {d['device']} ({d['precision']}, {d['batching']}), "
              f"{result.tokens:,} tokens in {result.seconds:.1f} s.")
    out.print(f"train loss {first} -> {last}; eval loss {evals}")
    out.print(f"Adapter written to {result.output}")


def register(app: typer.Typer, handle_errors) -> None:
    app.command("train")(handle_errors(train))
