"""Which models map onto a GGUF architecture, their hyperparameters, and their tensor names.

Mapped: `llama` (LlamaForCausalLM: SmolLM2, Llama 3.0; not Llama 3.1+, whose rope scaling is refused, and
not models with a SentencePiece tokenizer, refused by vocab.py) and `qwen2` (Qwen2ForCausalLM: Qwen2,
Qwen2.5), as llama.cpp's convert_hf_to_gguf.py writes them: the same
metadata keys, tensor names from gguf's own map (`gguf.get_tensor_name_map`), and for llama the
rows of attn_q / attn_k permuted for llama.cpp's rotary layout (LlamaModel.permute there; the
transformers GGUF loader undoes it). Anything else is refused before a byte is written, and the
mapped names are checked against the complete set the architecture needs: a file that would load
with missing, extra or misnamed tensors is never written.
"""

from __future__ import annotations

from dataclasses import dataclass

import gguf

from lora_cli.errors import LoraCliError

SUPPORTED = {"llama": "LLAMA", "qwen2": "QWEN2"}
HINT = ("lora-cli exports llama (SmolLM2, Llama 3) and qwen2 (Qwen2, Qwen2.5) models with byte-level BPE tokenizers. "
        "For others: `lora-cli merge`, then llama.cpp's convert_hf_to_gguf.py on the merged folder.")
_BLOCK = ("attn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_norm", "ffn_gate", "ffn_up", "ffn_down")


@dataclass(frozen=True)
class ArchSpec:
    model_type: str  # transformers' name: llama | qwen2
    arch_name: str  # gguf's name (general.architecture)
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    tied: bool

    @property
    def arch(self):
        return getattr(gguf.MODEL_ARCH, SUPPORTED[self.model_type])


def _rope(config) -> tuple[float, str]:
    """(theta, rope type): transformers 5 holds both in rope_parameters, whichever keys config.json used."""
    params = config.rope_parameters or {}
    return float(params.get("rope_theta", 10000.0)), params.get("rope_type", "default")


def check_config(config, name: str) -> ArchSpec:
    """The model's ArchSpec, or one LoraCliError listing every reason it cannot be mapped."""
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED:
        archs = ", ".join(getattr(config, "architectures", None) or []) or "no architectures listed"
        raise LoraCliError(f"Cannot export {name} to GGUF: its architecture {model_type} ({archs}) is not one "
                           "lora-cli maps onto llama.cpp's tensors.", HINT)
    heads, hidden = config.num_attention_heads, config.hidden_size
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    reasons = []
    _, rope_kind = _rope(config)
    if rope_kind != "default":
        reasons.append(f"rope scaling {rope_kind!r} (transformers' GGUF loader would drop it)")
    if getattr(config, "hidden_act", "silu") != "silu":
        reasons.append(f"activation {config.hidden_act!r} (llama.cpp's {model_type} uses silu)")
    if model_type == "llama" and (getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False)):
        reasons.append("attention or MLP biases (a llama GGUF loaded by transformers would drop them)")
    if model_type == "qwen2" and getattr(config, "use_sliding_window", False):
        reasons.append("sliding-window attention")
    if model_type == "qwen2" and head_dim * heads != hidden:
        reasons.append(f"head_dim {head_dim} != hidden_size / heads")
    if reasons:
        raise LoraCliError(f"Cannot export {name} ({model_type}) to GGUF: " + "; ".join(reasons) + ".", HINT)
    arch_name = gguf.MODEL_ARCH_NAMES[getattr(gguf.MODEL_ARCH, SUPPORTED[model_type])]
    return ArchSpec(model_type, arch_name, config.num_hidden_layers, heads, config.num_key_value_heads, head_dim,
                    bool(getattr(config, "tie_word_embeddings", False)))


def add_hparams(writer, config, spec: ArchSpec) -> None:
    """The {arch}.* keys llama.cpp reads (convert_hf_to_gguf.py: TextModel, LlamaModel, Qwen2Model)."""
    theta, _ = _rope(config)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(spec.layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(spec.heads)
    writer.add_head_count_kv(spec.kv_heads)
    writer.add_rope_freq_base(theta)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    if spec.model_type == "llama":
        writer.add_vocab_size(config.vocab_size)
        writer.add_rope_dimension_count(spec.head_dim)
        if spec.head_dim * spec.heads != config.hidden_size:
            writer.add_key_length(spec.head_dim)
            writer.add_value_length(spec.head_dim)


def expected_names(spec: ArchSpec) -> set[str]:
    """Every tensor a GGUF of this architecture must hold, no more."""
    names = {"token_embd.weight", "output_norm.weight"} | ({"output.weight"} if not spec.tied else set())
    for b in range(spec.layers):
        names |= {f"blk.{b}.{t}.weight" for t in _BLOCK}
        if spec.model_type == "qwen2":
            names |= {f"blk.{b}.attn_{t}.bias" for t in "qkv"}
    return names


def gguf_name(name_map, hf_name: str) -> str | None:
    """`blk.0.attn_q.weight` for `model.layers.0.self_attn.q_proj.weight` (None when the map has no entry)."""
    base, dot, suffix = hf_name.rpartition(".")
    mapped = name_map.get_name(base) if dot else None
    return f"{mapped}.{suffix}" if mapped else None


def tensor_names(hf_names: list[str], spec: ArchSpec) -> dict[str, str]:
    """{hf name: gguf name} for a state dict; LoraCliError unless it is exactly the architecture's set."""
    name_map = gguf.get_tensor_name_map(spec.arch, spec.layers)
    mapping, unmapped = {}, []
    for hf in hf_names:
        if spec.tied and hf == "lm_head.weight":
            continue  # the output projection is token_embd itself
        target = gguf_name(name_map, hf)
        (unmapped.append(hf) if target is None else mapping.__setitem__(hf, target))
    expected = expected_names(spec)
    missing, extra = sorted(expected - set(mapping.values())), sorted(set(mapping.values()) - expected)
    if unmapped or missing or extra or len(set(mapping.values())) != len(mapping):
        detail = "; ".join(f"{what}: {', '.join(items[:4])}{' ...' if len(items) > 4 else ''}" for what, items in
                           (("no GGUF name for", unmapped), ("missing", missing), ("unexpected", extra)) if items)
        raise LoraCliError(f"The merged {spec.model_type} model's tensors do not match llama.cpp's {spec.arch_name} "
                           f"layout ({detail or 'duplicate names'}); nothing was written.", HINT)
    return mapping


def to_gguf_layout(gguf_tensor: str, array, spec: ArchSpec):
    """llama's q/k rows in llama.cpp's rotary order (convert_hf_to_gguf.py LlamaModel.permute); others as they are."""
    if spec.model_type != "llama" or not gguf_tensor.endswith((".attn_q.weight", ".attn_k.weight")):
        return array
    heads = spec.heads if ".attn_q." in gguf_tensor else spec.kv_heads
    # within each head, interleave the two rotary halves: rows (h, 2, d) -> (h, d, 2)
    return array.reshape(heads, 2, array.shape[0] // heads // 2, *array.shape[1:]).swapaxes(1, 2).reshape(array.shape)
