"""A run's automatic settings, decided once from the hardware, the model and the data.

`decide` turns every "auto" of the training config into a value: the step's token budget and its
micro-batches, packed row length and static shapes, gradient checkpointing, the fp32 upcast,
keeping the NF4 base dequantized, torch.compile. It runs once the base model is loaded (the memory
plan needs its size on the GPU) and the tokenized lengths are known; the result is frozen and saved
in run_config.yaml, so what a run printed is what it did.
"""

from __future__ import annotations

import importlib.util
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

from lora_cli.config import RunConfig
from lora_cli.train.runtime import Placement, wants_upcast

if TYPE_CHECKING:
    from transformers import PretrainedConfig

GPU_MAX_TOKENS = 16384  # the most packed tokens per micro-batch the automatic step puts on a GPU (PERFORMANCE.md)
CPU_MAX_TOKENS = 8192  # and on a CPU (activations in RAM)
GPU_EVAL_TOKENS = 8192  # tokens per evaluation micro-batch on a GPU, at least
GPU_PACK_LENGTH = 1024  # tokens per packed row: sdpa attends over whole rows, so shorter rows waste less
ROW_MULTIPLE = 64  # packed rows are a multiple of this many tokens
MIN_COMPILE_STEPS = 200  # compiling costs ~7-15 s once: auto compiles only runs of at least this many steps
MIN_GRAPH_STEPS = 20  # capturing the decoder costs ~1 s once and saves ~0.1 s a step (docs/PERFORMANCE.md)
# inside the captured decoder, compiled layers (fused kernels) saved 9 ms a step at the 1.5B shape for
# ~5 s of compiling: auto compiles them only for runs this long (docs/PERFORMANCE.md, the training step)
MIN_LAYER_COMPILE_STEPS = 1000


@dataclass(frozen=True)
class RunPlan:
    packed: bool  # token-budget micro-batches with per-example attention, or padded ones
    max_tokens: int  # packed tokens per training micro-batch
    eval_max_tokens: int  # packed tokens per evaluation micro-batch
    pack_length: int  # tokens per packed row (0: one row of max_tokens)
    checkpoint_layers: int  # 0 none, -1 all, N the first N decoder layers
    upcast: bool  # non-quantized weights in fp32 (peft's prepare_model_for_kbit_training)
    compile: str  # "off", "on" (torch.compile each decoder layer) or "graphs" (and replay as CUDA graphs)
    micro_batches_per_step: int  # micro-batches of one optimizer step, all processes together
    static_shapes: bool = False  # every micro-batch padded to one shape: a compiled model never recompiles
    dequantize: bool = False  # the NF4 base dequantized once into the compute dtype (same values)
    memory_note: str = ""  # how the checkpointing was chosen (GPU), for the user
    fused_loss: bool = True  # loss from hidden states chunk by chunk (model/loss.py), or from full logits
    loss_note: str = ""  # why the plain loss replaces the fused one asked for, for the user
    compile_note: str = ""  # why an automatic GPU run is not replayed as CUDA graphs, for the user
    compile_scope: str = "layers"  # graphs of: "backbone" (the whole decoder, one capture) or "layers" (each layer)
    compile_layers: bool = False  # each decoder layer torch.compiled (inside the backbone's graph, if captured)

    def record(self, placement: Placement) -> dict:
        """What run_config.yaml records under `run`: every decision, as plain values."""
        return {"device": str(placement.device), "precision": placement.precision,
                "batching": "packed" if self.packed else "padded", "max_tokens": self.max_tokens,
                "pack_length": self.pack_length, "checkpoint_layers": self.checkpoint_layers,
                "upcast": "fp32" if self.upcast else "none", "compile": self.compile,
                "static_shapes": self.static_shapes, "dequantized_base": self.dequantize,
                "world_size": placement.world_size, "fsdp": placement.fsdp,
                "micro_batches_per_step": self.micro_batches_per_step, "fused_loss": self.fused_loss,
                "compile_scope": self.compile_scope, "compile_layers": self.compile_layers}


def step_budget(cfg: RunConfig, lengths: list[int], on_cuda: bool) -> tuple[int, int]:
    """(tokens per packed micro-batch, micro-batches per optimizer step on one process).

    Automatic (train.max_tokens 0): an optimizer step holds the recipe's examples, batch_size x
    grad_accum of the data's mean length, in as few micro-batches as the memory cap allows (on a
    GPU every micro-batch pays a fixed cost, so 2 x 2 examples cost twice 1 x 4; packing makes the
    two the same step). Learning per epoch then matches the recipe's (docs/PERFORMANCE.md, time to
    quality). An explicit --max-tokens keeps its meaning: grad_accum micro-batches of that budget.
    Padded batching keeps the recipe's own step: grad_accum micro-batches of batch_size examples
    (the token figure is then the most a micro-batch can hold, padding included: the memory plan's).
    """
    t = cfg.train
    if t.batching == "padded":
        return t.batch_size * max(lengths, default=1), t.grad_accum
    if t.max_tokens:
        return t.max_tokens, t.grad_accum
    if not lengths:
        return 1, t.grad_accum
    step_tokens = math.ceil(t.batch_size * t.grad_accum * sum(lengths) / len(lengths))
    n = math.ceil(step_tokens / (GPU_MAX_TOKENS if on_cuda else CPU_MAX_TOKENS))
    return math.ceil(step_tokens / n), n


def _checkpointing(cfg: RunConfig, placement: Placement, model_config: PretrainedConfig, max_tokens: int,
                   weights_bytes: int) -> tuple[int, str, bool]:
    """(checkpointed layers, note, fits): auto on a GPU checkpoints only as many layers as the budget needs."""
    gc = cfg.train.gradient_checkpointing
    if gc in ("on", "off") or gc.isdigit():
        return {"on": -1, "off": 0}.get(gc, int(gc) if gc.isdigit() else 0), "", True
    if not placement.on_cuda:
        return 0, "", True
    from lora_cli.model.memory import default_budget_bytes, plan_checkpointing

    plan = plan_checkpointing(model_config, max_tokens, default_budget_bytes(cfg.train.memory_budget_gib),
                              weights_bytes)
    note = (f"Memory plan: {plan.checkpoint_layers} checkpointed layer(s), ~{plan.estimated_peak_gib:.1f} GiB of a "
            f"{plan.budget_gib:.1f} GiB budget" + ("" if plan.fits else " (may not fit: lower --max-tokens)"))
    return plan.checkpoint_layers, note, plan.fits


def _compile_mode(cfg: RunConfig, placement: Placement, estimated_steps: int) -> tuple[str, str]:
    """(compile mode, the reason an automatic GPU run does not get CUDA graphs, or "").

    auto on a CUDA GPU: "graphs" (the decoder's forward and backward replayed as CUDA graphs: a
    small step is launch-bound, docs/PERFORMANCE.md) where the step's shapes are static and nothing
    in the step is known not to replay, for runs that repay the ~1 s capture; elsewhere "on" (each
    decoder layer compiled, where triton is installed and the run repays compiling) or "off", with
    the reason.
    """
    t = cfg.train
    if t.compile != "auto":
        return t.compile, ""
    if not placement.on_cuda:
        return "off", ""  # the CPU stays eager: compiling repays itself only on a GPU
    if placement.fsdp:  # compiled layers under FSDP1 are untested here
        return "off", "Not compiled: compiled layers are not used with FSDP (--fsdp)."
    blocker = _graphs_blocker(cfg, placement)
    if not blocker:
        if estimated_steps >= MIN_GRAPH_STEPS:
            return "graphs", ""
        return "off", (f"Not captured as CUDA graphs: {estimated_steps} optimizer steps do not repay the capture "
                       f"(auto captures runs of {MIN_GRAPH_STEPS}+ steps; --compile graphs to capture anyway).")
    if not _has_triton():
        return "off", f"Not compiled: torch.compile needs triton, which is not installed ({blocker} for CUDA graphs)."
    if estimated_steps < MIN_COMPILE_STEPS:
        return "off", (f"Not compiled: {estimated_steps} optimizer steps do not repay compiling "
                       f"(auto compiles runs of {MIN_COMPILE_STEPS}+ steps; --compile on to compile anyway); "
                       f"no CUDA graphs: {blocker}.")
    return "on", f"Compiled without CUDA graphs: {blocker}."


def _has_triton() -> bool:
    return importlib.util.find_spec("triton") is not None


def _graphs_blocker(cfg: RunConfig, placement: Placement) -> str:
    """Why CUDA graphs are not chosen automatically for this run ("" where they are)."""
    t = cfg.train
    if t.pack_length:
        return "--pack-length gives micro-batches of varying shape, and each shape would be captured anew"
    if placement.world_size > 1:
        return "several processes (DDP) have not been measured under graphs; --compile graphs to try"
    if t.batching == "padded":
        return "padded micro-batches vary in shape, and each shape would be captured anew"
    if placement.precision == "fp16":
        return "fp16 with its loss scaler has not been measured under graphs; --compile graphs to try"
    return ""


def _checkpointed_note(layers: int, compiled: bool) -> str:
    # a checkpointed layer's forward runs again inside the backward pass, i.e. inside the backward's
    # capture: not measured under graphs
    which = "every decoder layer is" if layers < 0 else f"{layers} decoder layer(s) are"
    done = "Compiled without CUDA graphs" if compiled else "Not compiled, no CUDA graphs"
    return (f"{done}: {which} checkpointed (their forward runs again in the backward pass, "
            "not measured under graphs); --compile graphs to try.")


def decide(cfg: RunConfig, placement: Placement, model_config: PretrainedConfig, lengths: list[int],
           weights_bytes: int = 0, dequantize_bytes: int = 0, loss_blocker: str | None = None) -> RunPlan:
    """Every automatic training setting, from the config, the placement, the model's config and
    the tokenized training lengths (tokens per example).

    weights_bytes: GPU memory the loaded base holds; dequantize_bytes: what keeping its NF4
    weights dequantized would add (0 when the base is not quantized), both in bytes;
    loss_blocker: why the fused loss cannot compute this model's logits (model/loss.py
    fused_blocker, asked before LoRA is attached), None where it can.
    """
    t, cuda = cfg.train, placement.on_cuda
    max_tokens, per_process = step_budget(cfg, lengths, cuda)
    longest = max(lengths, default=1)
    estimated = t.max_steps or t.epochs * math.ceil(sum(lengths) / max(max_tokens * per_process, 1))
    compile_mode, compile_note = _compile_mode(cfg, placement, estimated)
    static = cuda and compile_mode != "off" and not t.pack_length
    row = max(min(GPU_PACK_LENGTH, max_tokens), longest if static else 0)  # a GPU's automatic row
    pack_length = t.pack_length or (math.ceil(row / ROW_MULTIPLE) * ROW_MULTIPLE if cuda else 0)
    layers, note, fits = _checkpointing(cfg, placement, model_config, max_tokens, weights_bytes)
    dequantize = _wants_dequantized(cfg, dequantize_bytes) and not wants_upcast(cfg, placement.precision)
    if dequantize:
        more = _checkpointing(cfg, placement, model_config, max_tokens, weights_bytes + dequantize_bytes)
        # auto: only where it costs no checkpointed layer (that memory is worth more as activations)
        if cfg.model.dequantize == "on" or (more[2] and more[0] == layers):
            layers, note, fits = more
        else:
            dequantize = False
    if compile_mode == "graphs" and t.compile == "auto" and layers:
        compiles = _has_triton() and estimated >= MIN_COMPILE_STEPS
        compile_mode, compile_note = ("on" if compiles else "off"), _checkpointed_note(layers, compiles)
    # a GPU evaluation is launch-bound like a step: few large micro-batches (no gradient, no activations kept)
    eval_tokens = (max(max_tokens, t.eval_batch_size * cfg.data.max_length, GPU_EVAL_TOKENS) if cuda
                   else max(max_tokens, longest))
    fused = t.fused_loss and loss_blocker is None
    loss_note = "" if fused or not t.fused_loss else f"Loss from full logits, not the fused loss: {loss_blocker}."
    scope = _compile_scope(cfg, compile_mode, layers, fused)
    if compile_mode == "graphs" and scope == "layers" and t.compile == "auto" and not _has_triton():
        compile_mode, compile_note = "off", "Not compiled: torch.compile needs triton, which is not installed."
    compiled = compile_mode == "on" or (compile_mode == "graphs" and (
        scope == "layers" or t.compile == "graphs" or (estimated >= MIN_LAYER_COMPILE_STEPS and _has_triton())))
    return RunPlan(packed=t.batching != "padded", max_tokens=max_tokens, eval_max_tokens=eval_tokens,
                   pack_length=pack_length, checkpoint_layers=layers, upcast=wants_upcast(cfg, placement.precision),
                   compile=compile_mode, micro_batches_per_step=per_process * placement.world_size,
                   static_shapes=static, dequantize=dequantize, memory_note=note, fused_loss=fused,
                   loss_note=loss_note, compile_note=compile_note, compile_scope=scope,
                   compile_layers=compiled)


def _compile_scope(cfg: RunConfig, compile_mode: str, checkpoint_layers: int, fused: bool) -> str:
    """"backbone": the whole decoder (embeddings, every layer, the final norm, the attention mask) is
    captured as one CUDA graph (model/backbone.py), so a micro-batch replays one forward and one
    backward graph instead of a pair per layer, whose host-side bookkeeping was most of a step on one
    GPU (docs/PERFORMANCE.md). Only with the fused loss (it needs the hidden states, not the model's
    head), no checkpointed layer (its forward runs again inside the backward) and no NEFTune (its
    noise hook would be captured). Elsewhere "layers": each compiled layer replayed as its own graph."""
    whole = compile_mode == "graphs" and fused and not checkpoint_layers and not cfg.train.neftune_alpha
    return "backbone" if whole else "layers"


def _wants_dequantized(cfg: RunConfig, dequantize_bytes: int) -> bool:
    """on / off as asked; auto: where there is a 4-bit base to dequantize (the memory check follows)."""
    if cfg.model.quantization != "nf4" or cfg.model.dequantize == "off":
        return False
    if cfg.model.dequantize == "auto" and cfg.model.upcast == "fp32":
        return False  # peft's upcast would make the dequantized weights fp32 as well
    if cfg.lora.init_lora_weights == "loftq":
        return False  # peft's LoftQ reads the 4-bit weights (Linear4bit modules) to start from
    return cfg.model.dequantize == "on" or dequantize_bytes > 0
