"""How much GPU memory a training step needs, and how many layers to checkpoint to fit.

Gradient checkpointing trades a second forward pass of a layer for not keeping its
activations; it is worth paying only for as many layers as the memory budget requires. The
estimate is deliberately simple (bytes per token per decoder layer, linear in hidden and
intermediate sizes) with coefficients calibrated on an H200 (docs/PERFORMANCE.md).
"""

from __future__ import annotations

from dataclasses import dataclass

GIB = 2**30
# Bytes kept per token per decoder layer without checkpointing, as c_h * hidden + c_i * intermediate
# (bf16 activations, LoRA on attention projections, sdpa). Calibrated: see docs/PERFORMANCE.md.
# (H200, Qwen2.5-1.5B shape, nf4 + bf16, no checkpointing: 23.9 GiB at 8k tokens, 43.8 GiB at 16k,
# i.e. 93 KB per token and layer.)
COEF_HIDDEN = 26.0
COEF_INTERMEDIATE = 6.0
FIXED_OVERHEAD = 1.0 * GIB  # CUDA context aside: allocator slack, optimizer state, the loss chunk


@dataclass
class MemoryPlan:
    checkpoint_layers: int  # 0 none, N the first N layers
    estimated_peak_gib: float
    budget_gib: float
    fits: bool


def _dims(config) -> tuple[int, int, int, int]:
    text = getattr(config, "text_config", None) or config
    hidden = int(text.hidden_size)
    inter = int(getattr(text, "intermediate_size", None) or 4 * hidden)
    return hidden, inter, int(text.num_hidden_layers), int(text.vocab_size)


def estimate_peak(config, tokens: int, checkpointed: int, weights_bytes: int) -> float:
    hidden, inter, layers, vocab = _dims(config)
    full = COEF_HIDDEN * hidden + COEF_INTERMEDIATE * inter  # a layer that keeps its activations
    kept = 2.0 * hidden  # a checkpointed layer keeps its bf16 input only
    acts = tokens * ((layers - checkpointed) * full + checkpointed * kept)
    recompute = tokens * full if checkpointed else 0.0  # one layer's activations during its backward
    loss_chunk = 2 * min(tokens, max(128, GIB // (4 * vocab))) * vocab * 4
    return weights_bytes + acts + recompute + loss_chunk + FIXED_OVERHEAD


def plan_checkpointing(config, tokens: int, budget_bytes: float, weights_bytes: int) -> MemoryPlan:
    """The fewest checkpointed layers whose estimated peak fits the budget (all, if none fits)."""
    _, _, layers, _ = _dims(config)
    fitting = (n for n in range(layers + 1) if estimate_peak(config, tokens, n, weights_bytes) <= budget_bytes)
    n = next(fitting, layers)
    peak = estimate_peak(config, tokens, n, weights_bytes)
    return MemoryPlan(n, peak / GIB, budget_bytes / GIB, peak <= budget_bytes)


def default_budget_bytes(requested_gib: float) -> float:
    import torch

    if requested_gib:
        return requested_gib * GIB
    total = torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory
    return min(24 * GIB, 0.9 * total)
