"""A decoding step written for the Llama family (Llama, Qwen2, Mistral): the same arithmetic, far fewer ops.

transformers' forward runs ~60 kernels a layer for one new token on a GPU (RMSNorm as seven ops,
rotary as ten, five separate projections, repeat_kv copies, transposes); a decoding step of a
small model is bound by their number (launches on a GPU, a few microseconds of overhead each on a
CPU), not by its arithmetic. Here a layer is ~22 kernels with a LoRA on every projection:

- q, k and v come from ONE matmul over a stacked [Wq; Wk; Wv; Aq; Ak; Av] (biases folded into
  it), their LoRA B sides from ONE in-place addmm with a block-diagonal B (zero where a projection
  has no LoRA, scale folded in); gate and up likewise. The copy's modules hold views of these
  stacks, so `plain_copy.refresh` writes into them in place and a captured CUDA graph stays valid.
- RMSNorm is torch's rms_norm without its weight, then the weight: rounded as transformers'
  LlamaRMSNorm rounds (fp32 inside, cast back, then the weight in the model's dtype; the fused
  kernel with its weight rounds differently in bf16, on the CPU and on CUDA).
- Rotary on q and k at once (adjacent heads of the fused output), cos and sin from the model's own
  rotary module once per step (every RoPE scaling it knows): on a GPU one batched matmul by
  R = diag(cos) + swap * sin; on the CPU roll + addcmul with a sign-folded sin (rotate_half(x) is
  roll(x, d/2) with its first half negated): 10 us a layer there against 24 for the matmul (bf16, 8 rows).
- Attention without repeat_kv: the query heads of one kv head are that head's query rows (one
  position, one mask row for all), so one sdpa call over the cached keys and values, no copies.
  This step's key and value land in the cache with index_copy_ at cache_pos (capture-safe).
- The output projections add into the residual in place; the logits of the one position.

Prefill stays transformers' forward writing the same StaticCache. Other architectures, and
caches with sliding-window layers, decode with transformers' forward (`why_not_fused` says why).
"""

from __future__ import annotations

from dataclasses import dataclass

FAMILIES = ("llama", "qwen2", "mistral")


def add_delta(base, low, lora_b):
    """base += low @ lora_b^T in place (base: a fresh (rows, out) tensor or a column block of one: no copy of it
    first); low (rows, rank) = x A^T; lora_b (out, rank), scale folded in. Where B is kept in fp32 (CPU), the delta
    is rounded to base's dtype before the add, as peft's own forward rounds it."""
    if lora_b.dtype == base.dtype:
        return base.addmm_(low, lora_b.t())
    return base.add_(low.to(lora_b.dtype).mm(lora_b.t()).to(base.dtype))


def why_not_fused(copy) -> str | None:
    """Why `copy` (a plain transformers model) cannot take the fused step, or None."""
    import torch

    config = copy.config
    kind = getattr(config, "model_type", None)
    if kind not in FAMILIES:
        return f"a step is written for {', '.join(FAMILIES)} models only, not {kind}"
    if getattr(config, "hidden_act", None) != "silu":
        return f"the step is written for silu MLPs, not {config.hidden_act}"
    if any(t != "full_attention" for t in getattr(config, "layer_types", None) or []):
        return "the model has sliding-window attention layers"
    if getattr(config, "sliding_window", None) and getattr(config, "use_sliding_window", kind == "mistral"):
        return "the model has sliding-window attention"
    inner = getattr(copy, "model", None)
    layers = getattr(inner, "layers", None)
    if layers is None or not hasattr(inner, "rotary_emb") or not hasattr(inner, "norm"):
        return f"{type(copy).__name__} is not laid out as transformers' {kind} models are"
    for layer in layers:
        att, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
        names = [(att, "q_proj"), (att, "k_proj"), (att, "v_proj"), (att, "o_proj"), (mlp, "gate_proj"),
                 (mlp, "up_proj"), (mlp, "down_proj")]
        for parent, name in names:
            mod = getattr(parent, name, None)
            if not (type(mod) is torch.nn.Linear or hasattr(mod, "lora_B")):
                return f"{name} of {type(copy).__name__} is a {type(mod).__name__}"
    return None


@dataclass
class _Group:
    """Projections of one input run as one matmul: y = x @ weight^T (+ bias), then base + low @ B^T."""
    weight: object  # (n + R, in): the projections' W rows, then their A rows
    bias: object  # (n + R,) or None: zero on the A rows
    lora_b: object  # (n, R) block-diagonal scale * B, or None where no projection has a LoRA
    n: int  # output width (the projections' outputs side by side)
    loras: list  # its LoraLinear layers, whose B blocks lora_b holds

    @property
    def zero(self) -> bool:
        """CPU: every B is zero (no optimizer step yet, adapter off; plain_copy.refresh notes it): W alone, exactly."""
        return all(m.b_zero for m in self.loras)


def _stack(modules, cpu: bool) -> _Group:
    """Allocate one stack for `modules` (Linear or LoraLinear, one input) and point their parameters into it."""
    import torch

    first = modules[0].weight
    outs = [m.out_features for m in modules]
    ranks = [getattr(m, "rank", 0) for m in modules]
    n, total_r, width = sum(outs), sum(ranks), modules[0].in_features
    weight = torch.empty(n + total_r, width, dtype=first.dtype, device=first.device)
    bias = None
    if any(m.bias is not None for m in modules):
        bias = torch.zeros(n + total_r, dtype=first.dtype, device=first.device)
    b_dtype = torch.float32 if cpu else first.dtype
    lora_b = torch.zeros(n, total_r, dtype=b_dtype, device=first.device) if total_r else None
    row = col = 0
    for mod, out, rank in zip(modules, outs, ranks):
        own_bias = bias[row:row + out] if mod.bias is not None else None
        if rank:
            mod.place(weight[row:row + out], weight[n + col:n + col + rank], lora_b[row:row + out, col:col + rank],
                      own_bias)
        else:
            mod.weight = torch.nn.Parameter(weight[row:row + out], requires_grad=False)
            if own_bias is not None:
                mod.bias = torch.nn.Parameter(own_bias, requires_grad=False)
        row, col = row + out, col + rank
    return _Group(weight, bias, lora_b, n, [m for m, rank in zip(modules, ranks) if rank])


@dataclass
class _Layer:
    attn_norm: object
    mlp_norm: object
    qkv: _Group
    gate_up: _Group
    o_proj: object
    down_proj: object


def fuse(copy) -> tuple["FusedStep | None", str | None]:
    """Stack `copy`'s q/k/v and gate/up weights (before its weights are copied in) and return its step,
    or None and the reason its steps run through transformers' forward."""
    import os

    if os.environ.get("LORA_CLI_TRANSFORMERS_STEP") == "1":
        return None, "LORA_CLI_TRANSFORMERS_STEP=1 is set"
    reason = why_not_fused(copy)
    if reason:
        return None, reason
    cpu = next(copy.parameters()).device.type == "cpu"
    layers = []
    for layer in copy.model.layers:  # one layer at a time: the replaced weights are freed as it goes
        att, mlp = layer.self_attn, layer.mlp
        layers.append(_Layer(layer.input_layernorm, layer.post_attention_layernorm,
                             _stack([att.q_proj, att.k_proj, att.v_proj], cpu), _stack([mlp.gate_proj, mlp.up_proj], cpu),
                             att.o_proj, mlp.down_proj))
    return FusedStep(copy, layers, cpu), None


class FusedStep:
    """One decoding step of a Llama-family plain copy: slot.tok in, slot.logits out (see the module docstring).

    Reads the slot's static tensors (decode._Slot) and its cache's layers' keys and values, so a
    CUDA graph can capture it; on the CPU the keys attended stop at cache_pos (slot.filled).
    """

    def __init__(self, copy, layers: list[_Layer], cpu: bool):
        import torch

        att = copy.model.layers[0].self_attn
        self.copy, self.layers = copy, layers
        self.heads, self.kv_heads = copy.config.num_attention_heads, copy.config.num_key_value_heads
        self.head_dim, self.scaling = att.head_dim, float(att.scaling)
        half = self.head_dim // 2
        dtype, device = layers[0].qkv.weight.dtype, layers[0].qkv.weight.device
        # rotate_half(x) = roll(x, d/2) * sign: the sign is folded into sin once per step
        self.sign = torch.cat([-torch.ones(half), torch.ones(half)]).to(dtype=dtype, device=device)
        # on a GPU, where a layer's cost is its kernel count, rotary is one batched matmul per layer: x @ R with
        # R = diag(cos) + swap * (sign * sin), swap[(i + d/2) % d, i] = 1 (only R's two terms per column are non-zero)
        self.rope_matmul = not cpu
        index = torch.arange(self.head_dim)
        self.swap = torch.zeros(self.head_dim, self.head_dim, dtype=dtype, device=device)
        self.swap[(index + half) % self.head_dim, index] = 1
        self.fp32 = dtype == torch.float32

    def __call__(self, slot) -> None:
        import torch

        inner = self.copy.model
        h = torch.nn.functional.embedding(slot.tok.view(-1), inner.embed_tokens.weight)
        cos, sin = inner.rotary_emb(h, slot.pos)  # (batch, 1, d): the step's positions, once for every layer
        sin = sin * self.sign
        rope = torch.diag_embed(cos[:, 0]).add_(self.swap * sin) if self.rope_matmul else (cos, sin)
        width = self.attended(slot)
        mask = slot.mask[..., :width]  # (batch, 1, 1, width): every query of every head
        for layer, cache in zip(self.layers, slot.cache.layers):
            h = self._layer(layer, cache, h, rope, mask, slot.cache_pos, width)
        h = self._norm(h, inner.norm)
        slot.logits.copy_(self.copy.lm_head(h))

    @staticmethod
    def attended(slot) -> int:
        """Cache positions the step attends to: those filled, with its own (CPU), or the whole cache."""
        return int(slot.cache_pos) + 1 if slot.filled else slot.mask.shape[-1]

    def _norm(self, x, norm):
        import torch

        eps = norm.variance_epsilon
        if self.fp32:  # the fused kernel with its weight rounds as LlamaRMSNorm only in fp32
            return torch.nn.functional.rms_norm(x, (x.shape[-1],), norm.weight, eps)
        return torch.nn.functional.rms_norm(x, (x.shape[-1],), None, eps).mul_(norm.weight)

    def _project(self, group: _Group, x):
        """The group's outputs side by side, (rows, n), each with its LoRA delta."""
        import torch

        if group.lora_b is None or group.zero:
            return torch.nn.functional.linear(x, group.weight[:group.n],
                                              None if group.bias is None else group.bias[:group.n])
        y = torch.addmm(group.bias, x, group.weight.t()) if group.bias is not None else torch.mm(x, group.weight.t())
        return add_delta(y[:, :group.n], y[:, group.n:], group.lora_b)

    @staticmethod
    def _residual(h, x, module):
        """h + module(x) for an output projection (Linear or LoraLinear), x (rows, in); where W alone computes
        it, the residual add inside the addmm (h is this step's own tensor: added to in place)."""
        if hasattr(module, "lora_B") and not module.b_zero:
            return h + module(x)
        h.addmm_(x, module.weight.t())
        return h.add_(module.bias) if module.bias is not None else h

    def _layer(self, layer: _Layer, cache, h, rope, mask, cache_pos, width):
        import torch

        batch, d, heads, kv = h.shape[0], self.head_dim, self.heads, self.kv_heads
        qkv = self._project(layer.qkv, self._norm(h, layer.attn_norm))
        qk = qkv[:, :(heads + kv) * d].view(batch, heads + kv, d)
        if isinstance(rope, tuple):  # (cos, sign * sin), each (batch, 1, d)
            qk = torch.addcmul(qk * rope[0], torch.roll(qk, d // 2, -1), rope[1])
        else:  # R, (batch, d, d)
            qk = torch.bmm(qk, rope)
        cache.keys.index_copy_(2, cache_pos, qk[:, heads:].unsqueeze(2))
        cache.values.index_copy_(2, cache_pos, qkv[:, (heads + kv) * d:].view(batch, kv, 1, d))
        # the query heads of one kv head are that head's queries (one position: one mask row for all of them)
        q = qk[:, :heads].view(batch, kv, heads // kv, d)
        att = torch.nn.functional.scaled_dot_product_attention(
            q, cache.keys[:, :, :width], cache.values[:, :, :width], attn_mask=mask, scale=self.scaling)
        att = att.reshape(batch, heads * d)
        h = self._residual(h, att, layer.o_proj)
        gate_up = self._project(layer.gate_up, self._norm(h, layer.mlp_norm))
        half = gate_up.shape[-1] // 2
        act = torch.nn.functional.silu(gate_up[:, :half]).mul_(gate_up[:, half:])
        return self._residual(h, act, layer.down_proj)
