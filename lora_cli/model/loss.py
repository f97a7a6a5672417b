"""The training loss: summed cross-entropy over target tokens, without full-vocabulary logits.

A 1.5B Qwen has a 152k vocabulary: the logits of an 8k-token micro-batch are 5 GB in fp32,
most of the memory of a QLoRA step and a slow fp32 matmul besides. `linear_cross_entropy`
keeps only the hidden states of tokens that have a target (prompt and padding need none),
and computes logits chunk by chunk, deriving the gradient for the hidden states in the same
pass (the lm_head weight is frozen), so no logits are kept for the backward.
"""

from __future__ import annotations

import functools

from lora_cli.model.backbone import GraphedBackbone, block_causal_mask

IGNORE = -100  # label of a position without a target: torch's cross_entropy ignore_index, as in transformers


def _at_least_fp32(x):
    import torch

    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def _chunk_rows(vocab: int, budget_bytes: int = 1 << 30) -> int:
    return max(128, budget_bytes // (4 * max(vocab, 1)))


@functools.cache
def _linear_cross_entropy_function():
    import torch

    class _LinearCrossEntropy(torch.autograd.Function):
        @staticmethod
        def forward(ctx, hidden, weight, targets, chunk):
            need_grad = hidden.requires_grad
            total = torch.zeros((), dtype=torch.promote_types(hidden.dtype, torch.float32), device=hidden.device)
            grad = torch.empty_like(hidden) if need_grad else None
            w = weight
            for s in range(0, hidden.shape[0], chunk):
                h = hidden[s:s + chunk].to(w.dtype)
                t = targets[s:s + chunk]
                logits = _at_least_fp32(h @ w.t())
                lse = torch.logsumexp(logits, dim=-1)
                total += (lse - logits.gather(1, t[:, None]).squeeze(1)).sum()
                if need_grad:
                    probs = logits.sub_(lse[:, None]).exp_()
                    probs[torch.arange(t.shape[0], device=t.device), t] -= 1.0
                    grad[s:s + chunk] = (probs.to(w.dtype) @ w).to(hidden.dtype)
                del logits
            ctx.save_for_backward(grad)
            return total

        @staticmethod
        def backward(ctx, grad_total):
            (grad,) = ctx.saved_tensors
            return grad * grad_total.to(grad.dtype), None, None, None

    return _LinearCrossEntropy


def linear_cross_entropy(hidden, weight, targets, chunk: int | None = None, keep=None, n: int | None = None):
    """Sum of CE(hidden @ weight.T, targets) over targets != -100, and their count.

    hidden: [..., D]; weight: [V, D] (frozen); targets: [...] already aligned (no shift).
    keep/n: the flat positions with a target and their number, when the caller knows them
    (finding them on the GPU would stall the CPU until the forward pass has finished).
    """
    flat_h = hidden.reshape(-1, hidden.shape[-1])
    flat_t = targets.reshape(-1)
    if keep is None:
        keep = (flat_t != IGNORE).nonzero().squeeze(1)
        n = int(keep.numel())
    if n == 0:
        return _at_least_fp32(flat_h[:0].sum() * 0.0), 0
    h = flat_h.index_select(0, keep)
    t = flat_t.index_select(0, keep)
    if weight.requires_grad:  # lm_head is being trained: plain autograd path
        import torch.nn.functional as F

        return F.cross_entropy(_at_least_fp32(h @ weight.t()), t, reduction="sum"), n
    return _linear_cross_entropy_function().apply(h, weight, t, chunk or _chunk_rows(weight.shape[0])), n


def token_losses(model, input_ids, attention_mask, targets):
    """Cross-entropy of every target token, for evaluation (no gradient kept).

    model: a transformers causal LM (not peft-wrapped); input_ids, attention_mask, targets:
    [B, L], targets already shifted with -100 where there is none. Returns (losses [n] fp32,
    targets [n]) over the n positions with a target, in row-major order. Logits are computed
    only at those positions, in chunks, where the head is a plain Linear (fused_blocker).
    """
    import torch
    import torch.nn.functional as F

    keep = targets != IGNORE
    wanted = targets[keep]
    if fused_blocker(model) is not None:
        logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
        return F.cross_entropy(_at_least_fp32(logits[keep]), wanted, reduction="none"), wanted
    hidden = model.get_decoder()(input_ids=input_ids, attention_mask=attention_mask,
                                 use_cache=False).last_hidden_state[keep]
    weight = model.get_output_embeddings().weight
    rows = _chunk_rows(weight.shape[0])
    losses = [F.cross_entropy(_at_least_fp32(h.to(weight.dtype) @ weight.t()), t, reduction="none")
              for h, t in zip(hidden.split(rows), wanted.split(rows))]
    return (torch.cat(losses) if losses else hidden.new_zeros(0, dtype=torch.float32)), wanted


def plain_cross_entropy(logits, targets):
    import torch.nn.functional as F

    flat_t = targets.reshape(-1)
    loss = F.cross_entropy(_at_least_fp32(logits.reshape(-1, logits.shape[-1])), flat_t, ignore_index=IGNORE,
                           reduction="sum")
    return loss, int((flat_t != IGNORE).sum())


def fused_blocker(model, adapted=()) -> str | None:
    """Why the fused loss cannot stand in for this model's output head, or None where it can.

    The fused loss computes logits as hidden @ head.weight.T, skipping the head module itself:
    right only for a plain bias-free torch Linear with no logit scaling, nothing wrapped around
    it (a LoRA on the head would never train, and evaluation would score without it) and no
    hook on it. model: a transformers causal LM (peft's base model after LoRA is attached);
    adapted: full names of the modules LoRA is about to wrap, to decide before it is attached.
    """
    import torch

    cfg = getattr(model, "config", None)
    for attr in ("final_logit_softcapping", "logit_scale", "output_multiplier_scale"):
        if getattr(cfg, attr, None) not in (None, 1, 1.0):
            return f"the model scales its logits ({attr})"
    head = model.get_output_embeddings()
    if head is None:
        return "the model has no output head"
    name = next((k for k, m in model.named_modules() if m is head), "lm_head")
    if name in adapted or hasattr(head, "base_layer"):
        return f"LoRA on the output head {name}, which the fused loss would bypass"
    if type(head) is not torch.nn.Linear:
        return f"the output head {name} is a {type(head).__name__}, not a plain Linear"
    if head.bias is not None:
        return f"the output head {name} has a bias"
    if head._forward_hooks or head._forward_pre_hooks:
        return f"the output head {name} has hooks"
    return None


def make_loss_module(peft_model, fused: bool, graphed_backbone: bool = False):
    """An nn.Module computing (summed loss, n_targets): the unit DDP wraps.

    fused: the run's decision (train/plan.py); checked again here on the model as it now is,
    so a head the fused path would bypass always gets the plain loss (full logits).
    graphed_backbone: training micro-batches replay the decoder as one CUDA graph
    (backbone.GraphedBackbone); only with the fused loss, which needs its hidden states alone.
    The module's `graphed` attribute is that backbone (None without it).
    """
    import torch

    base = peft_model.get_base_model()
    fused = fused and fused_blocker(base) is None
    own_mask = getattr(base.config, "_attn_implementation", "sdpa") == "sdpa"
    graphed = GraphedBackbone(base.get_decoder(), own_mask) if graphed_backbone and fused else None

    class CausalLMLoss(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = peft_model
            self.graphed = graphed

        def forward(self, input_ids, targets, attention_mask=None, position_ids=None, target_index=None,
                    n_targets=None):
            if graphed is not None:  # builds the packed examples' mask itself, inside its graph
                hidden = graphed(input_ids, attention_mask, position_ids)
            else:
                if attention_mask is None and position_ids is not None and own_mask:
                    attention_mask = block_causal_mask(position_ids)
                kwargs = dict(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                              use_cache=False)
                if not fused:
                    return plain_cross_entropy(self.model(**kwargs).logits, targets)
                hidden = base.get_decoder()(**kwargs).last_hidden_state
            return linear_cross_entropy(hidden, base.get_output_embeddings().weight, targets,
                                        keep=target_index, n=n_targets)

    return CausalLMLoss()
