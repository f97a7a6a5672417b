"""What the loop steps: the wrapped loss module, its optimizer and schedule, ready (and restored).

`prepare_trainable` puts a checkpoint's adapter weights in before wrapping (FSDP shards them), and
its optimizer, schedule and RNG after (resume.py): AdamW and the schedule are built over the wrapped
module's parameters, which FSDP replaces with flat shards.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from lora_cli.config import RunConfig, TrainConfig
from lora_cli.errors import LoraCliError
from lora_cli.train.checkpoint import Checkpoint
from lora_cli.train.runtime import Placement

if TYPE_CHECKING:
    import torch
    from peft import PeftModel
    from torch.optim.lr_scheduler import LRScheduler


@dataclass
class Trainable:
    module: torch.nn.Module  # loss module (loss.make_loss_module) as accelerate prepared it
    optimizer: torch.optim.Optimizer  # accelerate's AcceleratedOptimizer over AdamW
    scheduler: LRScheduler
    params: list[torch.nn.Parameter]  # trainable parameters of `module`
    adapter_names: dict[str, str] | None = None  # FSDP: state-dict name -> adapter-file name (sharding.adapter_names)


def make_optimizer(params: list[torch.nn.Parameter], train: TrainConfig,
                   peft_model: PeftModel) -> torch.optim.Optimizer:
    """AdamW (torch's fused kernel, on CUDA and the CPU alike) over `params`, those that require a gradient.

    Fused, so that a step's update can be skipped on the device's word (late_read.py), and one
    code path runs in the CPU tests and on a GPU.

    With train.loraplus_lr_ratio (LoRA+), peft's create_loraplus_optimizer builds it from
    `peft_model` instead: lora_B (and DoRA's magnitudes) at lr x ratio, lora_A at lr.
    """
    import torch

    if not params:
        raise LoraCliError("No trainable parameters: LoRA matched no module.", "Check --target-modules.")
    kwargs = dict(betas=(0.9, 0.999), eps=1e-8, fused=True)
    if train.loraplus_lr_ratio:
        from peft.optimizers import create_loraplus_optimizer

        return create_loraplus_optimizer(peft_model, torch.optim.AdamW, lr=train.lr,
                                         loraplus_lr_ratio=train.loraplus_lr_ratio,
                                         loraplus_weight_decay=train.weight_decay, **kwargs)
    return torch.optim.AdamW(params, lr=train.lr, weight_decay=train.weight_decay, **kwargs)


def warmup_steps(train: TrainConfig, total_steps: int) -> int:
    """Optimizer steps of warmup: --warmup-steps, or --warmup-ratio of the run's steps rounded up (as transformers).

    A --warmup-steps as long as the run or longer is capped at a tenth of it (rounded up): uncapped,
    the learning rate would still be climbing when the run ends (100 on a 3-step run trains at
    0 .. 4e-06 for --lr 2e-4). `warmup_note` says so."""
    import math

    if train.warmup_steps and train.warmup_steps >= total_steps > 0:
        return math.ceil(total_steps / 10)
    return train.warmup_steps or math.ceil(train.warmup_ratio * total_steps)


def warmup_note(train: TrainConfig, total_steps: int) -> str | None:
    """The sentence train says when --warmup-steps was capped (None when it was not)."""
    used = warmup_steps(train, total_steps)
    if not train.warmup_steps or used == train.warmup_steps:
        return None
    return (f"--warmup-steps {train.warmup_steps} is not shorter than the run ({total_steps} optimizer steps): "
            f"warming up for {used} instead, so the learning rate reaches --lr.")


def make_scheduler(optimizer: torch.optim.Optimizer, train: TrainConfig, total_steps: int) -> LRScheduler:
    """transformers' schedule of train.scheduler after the warmup, over `total_steps` optimizer steps;
    cosine with --min-lr-ratio is transformers' cosine_with_min_lr (it ends at lr x ratio)."""
    from transformers import get_scheduler

    name = train.scheduler if train.scheduler != "constant" else "constant_with_warmup"
    extra = {}
    if train.scheduler == "cosine" and train.min_lr_ratio:
        name, extra = "cosine_with_min_lr", {"min_lr_rate": train.min_lr_ratio}
    return get_scheduler(name, optimizer, num_warmup_steps=warmup_steps(train, total_steps),
                         num_training_steps=max(total_steps, 1), scheduler_specific_kwargs=extra)


def prepare_trainable(peft_model: PeftModel, cfg: RunConfig, placement: Placement, total_steps: int,
                      checkpoint: Checkpoint | None, fused_loss: bool, graphed_backbone: bool) -> Trainable:
    """fused_loss: the run plan's choice of loss; graphed_backbone: the plan's compile scope is the whole
    decoder, captured as one CUDA graph (model/backbone.py)."""
    from lora_cli.model.loss import make_loss_module
    from lora_cli.train import resume

    acc = placement.accelerator
    if checkpoint is not None:
        resume.restore_adapter(peft_model, checkpoint, placement)
    names = None
    if placement.fsdp:
        from lora_cli.train import sharding

        sharding.configure(acc, peft_model, placement.precision)
        names = sharding.adapter_names(peft_model)
    module = acc.prepare(make_loss_module(peft_model, fused_loss, graphed_backbone))
    params = [p for p in module.parameters() if p.requires_grad]
    optimizer = make_optimizer(params, cfg.train, peft_model)
    scheduler = make_scheduler(optimizer, cfg.train, total_steps)
    optimizer = acc.prepare(optimizer)
    if checkpoint is not None:
        resume.restore_training(module, optimizer, scheduler, checkpoint, placement, total_steps)
    return Trainable(module, optimizer, scheduler, params, names)
