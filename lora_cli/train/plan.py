"""A run's automatic settings, decided once from the hardware, the model and the data.

`decide` turns every "auto" of the training config into a value: batching, micro-batch token
budgets, packed row length, gradient checkpointing, the fp32 upcast, torch.compile. It runs once
the base model is loaded (the memory plan needs its size on the GPU) and the tokenized lengths
are known; the result is frozen and saved in run_config.yaml, so what a run printed is what it did.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass

from lora_cli.config import RunConfig
from lora_cli.train.runtime import Placement, wants_upcast

GPU_MAX_TOKENS = 16384  # packed tokens per micro-batch on a GPU (see docs/PERFORMANCE.md)
GPU_PACK_LENGTH = 1024  # tokens per packed row: sdpa attends over whole rows, so shorter rows waste less


@dataclass(frozen=True)
class RunPlan:
    packed: bool  # token-budget micro-batches with per-example attention, or padded ones
    max_tokens: int  # packed tokens per training micro-batch
    eval_max_tokens: int  # packed tokens per evaluation micro-batch
    pack_length: int  # tokens per packed row (0: one row of max_tokens)
    checkpoint_layers: int  # 0 none, -1 all, N the first N decoder layers
    upcast: bool  # non-quantized weights in fp32 (peft's prepare_model_for_kbit_training)
    compile: bool  # torch.compile each decoder layer
    micro_batches_per_step: int  # grad_accum x processes
    memory_note: str = ""  # how the checkpointing was chosen (GPU), for the user
    fused_loss: bool = True  # loss from hidden states chunk by chunk (model/loss.py), or from full logits
    loss_note: str = ""  # why the plain loss replaces the fused one asked for, for the user

    def record(self, placement: Placement) -> dict:
        """What run_config.yaml records under `run`: every decision, as plain values."""
        return {"device": str(placement.device), "precision": placement.precision,
                "batching": "packed" if self.packed else "padded", "max_tokens": self.max_tokens,
                "pack_length": self.pack_length, "checkpoint_layers": self.checkpoint_layers,
                "upcast": "fp32" if self.upcast else "none", "compile": self.compile,
                "world_size": placement.world_size, "fsdp": placement.fsdp,
                "micro_batches_per_step": self.micro_batches_per_step, "fused_loss": self.fused_loss}


def _cpu_max_tokens(lengths: list[int], batch_size: int) -> int:
    """A CPU gains nothing from large micro-batches: keep the recipe's average of `batch_size`
    examples per micro-batch (and so its number of optimizer steps), minus the padding. An
    example longer than the budget still gets a micro-batch of its own."""
    return max(1, round(batch_size * sum(lengths) / len(lengths))) if lengths else 1


def _checkpointing(cfg: RunConfig, placement: Placement, model_config, max_tokens: int,
                   weights_bytes: int) -> tuple[int, str]:
    """(checkpointed layers, note): auto on a GPU checkpoints only as many layers as the budget needs."""
    gc = cfg.train.gradient_checkpointing
    if gc in ("on", "off") or gc.isdigit():
        return {"on": -1, "off": 0}.get(gc, int(gc) if gc.isdigit() else 0), ""
    if not placement.on_cuda:
        return 0, ""
    from lora_cli.model.memory import default_budget_bytes, plan_checkpointing

    plan = plan_checkpointing(model_config, max_tokens, default_budget_bytes(cfg.train.memory_budget_gib),
                              weights_bytes)
    note = (f"Memory plan: {plan.checkpoint_layers} checkpointed layer(s), ~{plan.estimated_peak_gib:.1f} GiB of a "
            f"{plan.budget_gib:.1f} GiB budget" + ("" if plan.fits else " (may not fit: lower --max-tokens)"))
    return plan.checkpoint_layers, note


def decide(cfg: RunConfig, placement: Placement, model_config, lengths: list[int], weights_bytes: int = 0,
           loss_blocker: str | None = None) -> RunPlan:
    """Every automatic training setting, from the config, the placement, the model's config and
    the tokenized training lengths. weights_bytes: GPU memory the loaded base holds (bytes);
    loss_blocker: why the fused loss cannot compute this model's logits (model/loss.py
    fused_blocker, asked before LoRA is attached), None where it can."""
    t, cpu = cfg.train, not placement.on_cuda
    max_tokens = t.max_tokens or (_cpu_max_tokens(lengths, t.batch_size) if cpu else GPU_MAX_TOKENS)
    pack_length = t.pack_length or (0 if cpu else min(GPU_PACK_LENGTH, max_tokens))
    upcast = wants_upcast(cfg, placement.precision)
    layers, note = _checkpointing(cfg, placement, model_config, max_tokens, weights_bytes)
    # compiled layers under FSDP1 are untested here: off unless asked for
    compile_default = not cpu and not placement.fsdp and importlib.util.find_spec("triton") is not None
    fused = t.fused_loss and loss_blocker is None
    loss_note = "" if fused or not t.fused_loss else f"Loss from full logits, not the fused loss: {loss_blocker}."
    return RunPlan(packed=t.batching != "padded", max_tokens=max_tokens,
                   eval_max_tokens=max(max_tokens, t.eval_batch_size * cfg.data.max_length),
                   pack_length=pack_length, checkpoint_layers=layers, upcast=upcast,
                   compile={"on": True, "off": False}.get(t.compile, compile_default),
                   micro_batches_per_step=t.grad_accum * placement.world_size, memory_note=note,
                   fused_loss=fused, loss_note=loss_note)
