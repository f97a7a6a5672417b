"""A plain copy of a (4-bit, LoRA-wrapped) model for generation: dequantized, the adapter beside it.

Generating on the 4-bit model dequantizes every layer's weights at every token, and runs the
LoRA branch as separate small layers (dropout, two matmuls, a scale, an add); a plain model in
the compute dtype does far less. The copy is the model's own architecture (transformers'
`from_config`), so every model the loader supports works; `refresh` copies the current weights
in place (the training model's, at each evaluation), so anything captured on the copy's tensors
stays valid.

A LoRA linear layer becomes one `LoraLinear`: its weight is [W; A] stacked, so one matmul gives
both x W^T and x A^T, then one addmm adds scale * (x A^T) B^T. The adapter is not merged into
W: in bf16 a merged W + scale * B A rounds away deltas under W's resolution (2^-8 of its
magnitude), and the early adapters a training probe sees are such deltas; kept apart, the copy
computes what the peft model computes. Other LoRA layers (embeddings) are merged, in fp32 and
rounded once. What the copy cannot hold (DoRA's magnitude vectors, a LoRA on an output matrix
tied to the embeddings, several adapters active on one layer, an adapter kind other than LoRA)
is reported by `why_not_copyable`, and the caller generates eagerly on the model itself.

On the CPU, where every op of a decoding step costs microseconds beside its arithmetic, a
LoraLinear keeps B in fp32 (a bf16 matmul of a rank-r B costs ~30 us of kernel overhead, an
fp32 one 10-17 us) and runs W alone while B is all zero (before the first optimizer step, or
the adapter switched off): exactly what it would compute with B, for ~30 us less a layer.
"""

from __future__ import annotations


def _lora_linear_class():
    import torch

    class _LoraLinear(torch.nn.Module):
        """y = x W^T (+ bias) + (x A^T) (scale B)^T: W and A rows of one weight (see the module docstring).

        `weight` (out, in) and `lora_A` (rank, in) are views: of this layer's own [W; A], one matmul for both,
        or, once `place`d, of a decoder layer's fused stack (fused_step.py), whose step reads them there.
        `lora_B` (out, rank) holds scale * B, so a fused block-diagonal B needs no per-layer scale.
        """

        def __init__(self, out_features: int, in_features: int, rank: int, bias: bool, dtype, cpu: bool = False):
            super().__init__()
            self.out_features, self.in_features, self.rank = out_features, in_features, rank
            self.stacked = torch.empty(out_features + rank, in_features, dtype=dtype)  # [W; A]
            self.weight = torch.nn.Parameter(self.stacked[:out_features], requires_grad=False)
            self.lora_A = torch.nn.Parameter(self.stacked[out_features:], requires_grad=False)
            # the CPU keeps B in fp32 (see the module docstring); a GPU's captured step reads it in the copy's dtype
            self.lora_B = torch.nn.Parameter(torch.empty(out_features, rank, dtype=torch.float32 if cpu else dtype),
                                             requires_grad=False)
            self.cpu = cpu
            self.b_zero = False  # CPU: B is all zero (set by refresh), the adapter adds nothing
            self.bias = torch.nn.Parameter(torch.empty(out_features, dtype=dtype), requires_grad=False) \
                if bias else None

        def place(self, weight, lora_a, lora_b, bias) -> None:
            """Hold views of a fused stack instead of an own [W; A] (refresh then writes into the stack)."""
            self.stacked = None
            self.weight = torch.nn.Parameter(weight, requires_grad=False)
            self.lora_A = torch.nn.Parameter(lora_a, requires_grad=False)
            self.lora_B = torch.nn.Parameter(lora_b, requires_grad=False)
            if self.bias is not None:
                self.bias = torch.nn.Parameter(bias, requires_grad=False)

        def parts(self, x):
            """x W^T (+ bias) and x A^T, one matmul when [W; A] is one weight."""
            if self.stacked is None:
                return torch.nn.functional.linear(x, self.weight, self.bias), torch.nn.functional.linear(x, self.lora_A)
            base, low = torch.nn.functional.linear(x, self.stacked).split([self.out_features, self.rank], -1)
            return (base + self.bias if self.bias is not None else base), low

        def forward(self, x):
            if self.b_zero:  # CPU: no optimizer step yet, or the adapter switched off: W alone, exactly
                return torch.nn.functional.linear(x, self.weight, self.bias)
            from lora_cli.infer.fused_step import add_delta

            shape = x.shape[:-1]
            base, low = self.parts(x.reshape(-1, self.in_features))
            return add_delta(base, low, self.lora_B).reshape(*shape, self.out_features)

    return _LoraLinear


def _source_base(model):
    """The transformers model inside a peft wrapper (or the model itself)."""
    get = getattr(model, "get_base_model", None)
    return get() if callable(get) else model


def _is_lora(module) -> bool:
    return hasattr(module, "lora_A") and hasattr(module, "get_base_layer")


def _active(module) -> list[str]:
    """The adapters whose delta this LoRA layer adds right now (none while adapters are disabled)."""
    if getattr(module, "disable_adapters", False) or getattr(module, "merged", False):
        return []
    return [a for a in module.active_adapters if a in module.lora_A]


def _split_layer(module) -> str | None:
    """The adapter a LoRA linear layer keeps beside its weight in the copy (its one adapter), or None: merged."""
    import torch

    names = [a for a in module.active_adapters if a in module.lora_A]
    if len(names) != 1 or getattr(module, "merged", False):
        return None
    base = module.get_base_layer()
    linear = isinstance(module.lora_A[names[0]], torch.nn.Linear) and hasattr(base, "in_features")
    return names[0] if linear else None


def why_not_copyable(model) -> str | None:
    """A reason the copy would not compute what `model` computes, or None."""
    base = _source_base(model)
    tied = bool(getattr(base.config, "tie_word_embeddings", False))
    out = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
    for module in base.modules():
        if _is_lora(module) and len(getattr(module, "lora_magnitude_vector", None) or {}):
            return "DoRA adapters are not merged for generation"
        if _is_lora(module) and tied and module is out:
            return "a LoRA on an output matrix tied to the embeddings cannot be merged into one copy"
        if _is_lora(module) and len([a for a in module.active_adapters if a in module.lora_A]) > 1:
            return "several adapters active on one layer are not combined for generation"
        kind = type(module).__module__
        if kind.startswith("peft.tuners") and not kind.startswith(("peft.tuners.lora", "peft.tuners.tuners_utils")):
            return f"the adapter kind {type(module).__name__} is not merged for generation"
    return None


def copy_bytes(model, dtype) -> int:
    """Bytes a copy of `model` in `dtype` takes: one element per logical weight (4-bit weights count whole)."""
    import torch

    shapes = (getattr(getattr(p, "quant_state", None), "shape", None) or p.shape
              for module in _source_base(model).modules() if not _is_lora(module)
              for p in module.parameters(recurse=False))
    return sum(torch.Size(shape).numel() for shape in shapes) * (torch.finfo(dtype).bits // 8)


def build_copy(model, dtype, device):
    """A plain transformers model of `model`'s architecture on `device` in `dtype`, weights from `model`."""
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.initialization import no_init_weights

    base = _source_base(model)
    config = base.config
    with torch.device(device), no_init_weights():
        copy = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa",
                                                trust_remote_code=getattr(config, "auto_map", None) is not None)
    lora_linear = _lora_linear_class()
    cpu = torch.device(device).type == "cpu"
    with torch.device(device):
        for name, module in base.named_modules():
            adapter = _split_layer(module) if _is_lora(module) else None
            if adapter is not None:
                inner = module.get_base_layer()
                copy.set_submodule(name, lora_linear(inner.out_features, inner.in_features,
                                                     module.lora_A[adapter].out_features, inner.bias is not None,
                                                     dtype, cpu))
    copy.eval().requires_grad_(False)
    copy.generation_config = base.generation_config
    from lora_cli.infer.fused_step import fuse

    # plain attributes, not submodules: refresh walks the copy's modules
    copy.__dict__["fused_step"], copy.__dict__["fused_note"] = fuse(copy)
    refresh(copy, model)
    return copy


def _weight(param, dtype):
    """A parameter's values in `dtype`; bitsandbytes 4-bit weights dequantized."""
    state = getattr(param, "quant_state", None)
    if state is not None:
        import bitsandbytes.functional as bnbf

        return bnbf.dequantize_4bit(param.data, state).to(dtype)
    return param.data.to(dtype)


def _resolve(source, name: str):
    """The module of `source` that computes what the copy's module `name` computes, and its LoRA layer (or None)."""
    module = source.get_submodule(name) if name else source
    if _is_lora(module):
        return module.get_base_layer(), module
    inner = getattr(module, "modules_to_save", None)  # peft's ModulesToSaveWrapper: the trained copy when active
    if inner is not None and hasattr(module, "original_module"):
        name = getattr(module, "active_adapter", None)
        name = name[0] if isinstance(name, (list, tuple)) else name
        use = not getattr(module, "disable_adapters", False) and name in inner
        return (inner[name] if use else module.original_module), None
    return module, None


def _refresh_split(target, lora) -> None:
    """[W; A] and B of a LoRA linear layer into its LoraLinear; B zero while the adapter is switched off."""
    base = lora.get_base_layer()
    adapter = _split_layer(lora)
    target.weight.copy_(_weight(base.weight, target.weight.dtype))
    target.lora_A.copy_(lora.lora_A[adapter].weight)
    if target.bias is not None:
        target.bias.copy_(base.bias)
    if _active(lora):  # scale * B, computed in fp32 and rounded once
        target.lora_B.copy_(lora.lora_B[adapter].weight.float() * float(lora.scaling[adapter]))
    else:
        target.lora_B.zero_()
    target.b_zero = target.cpu and not bool(target.lora_B.any())


def refresh(copy, model) -> None:
    """Copy `model`'s current weights (dequantized, active LoRA deltas added) into `copy`, in place."""
    import torch

    source = _source_base(model)
    # on the CPU decoding runs in inference mode, where a model may replace a buffer (dynamic RoPE's
    # frequencies) by an inference tensor, which only inference mode may update in place
    cpu = next(copy.parameters()).device.type == "cpu"
    with torch.inference_mode() if cpu else torch.no_grad():
        for name, target in copy.named_modules():
            own = list(target.named_parameters(recurse=False)) + list(target.named_buffers(recurse=False))
            if not own:
                continue
            src, lora = _resolve(source, name)
            if hasattr(target, "lora_B") and lora is not None:
                _refresh_split(target, lora)
                continue
            for attr, tensor in own:
                value = getattr(src, attr, None)
                if value is None:
                    continue  # a buffer the copy computes itself (rotary frequencies)
                deltas = _active(lora) if (lora is not None and attr == "weight") else []
                # merged in fp32 and rounded once: a LoRA delta is small beside W, a bf16 sum would lose part of it
                value = _weight(value, torch.float32 if deltas else tensor.dtype)
                for adapter in deltas:
                    value = value + lora.get_delta_weight(adapter).to(torch.float32)
                tensor.copy_(value.reshape(tensor.shape))
