"""The adapter alone as a GGUF LoRA adapter, laid out as llama.cpp's convert_lora_to_gguf.py writes it.

general.type = "adapter", adapter.type = "lora", adapter.lora.alpha; for every adapted matrix W of
the base GGUF (e.g. blk.0.attn_q.weight) two tensors W.lora_a (peft's lora_A, rank x in) and
W.lora_b (peft's lora_B, out x rank). llama.cpp adds scale * lora_b @ (lora_a @ x) with
scale = alpha / rank (llama-adapter.cpp), which is peft's alpha / r; for an rsLoRA adapter
(alpha / sqrt(r)) the alpha written is alpha * sqrt(r). On llama, lora_b's rows of attn_q and
attn_k are permuted like the base weights' rows, so the product lands in llama.cpp's rotary
layout. A runtime applies it to a base GGUF of the same architecture: the adapter's corrections
were learned against the base the adapter was trained on (for a QLoRA adapter, its NF4 rounding),
so a base GGUF of other weights (another quantization) gives a slightly different model.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import gguf

from lora_cli import __version__
from lora_cli.adapter.folder import ADAPTER_CONFIG, ADAPTER_WEIGHTS
from lora_cli.errors import LoraCliError
from lora_cli.export.architecture import gguf_name, to_gguf_layout
from lora_cli.export.gguf_model import stream
from lora_cli.progress import NULL_REPORTER

LORA_OUTTYPES = ("f32", "f16", "bf16", "q8_0")


def _adapter_pairs(info, spec) -> dict[str, dict]:
    """{gguf base tensor name: {"a": array, "b": array}} from adapter_model.safetensors."""
    from safetensors.torch import load_file

    name_map = gguf.get_tensor_name_map(spec.arch, spec.layers)
    pairs: dict[str, dict] = {}
    for key, tensor in load_file(str(info.path / ADAPTER_WEIGHTS)).items():
        which = "a" if ".lora_A." in key else "b" if ".lora_B." in key else None
        hf = key.removeprefix("base_model.model.").replace(f".lora_{which.upper()}.weight", ".weight") if which else key
        target = gguf_name(name_map, hf) if which else None
        if target is None or not target.startswith("blk.") or tensor.dim() != 2:
            raise LoraCliError(f"The adapter tensor {key} has no place in a GGUF LoRA adapter for {spec.arch_name} "
                               "(lora-cli writes adapters of the attention and MLP matrices).",
                               "Use --format gguf: the merged model holds every change.")
        pairs.setdefault(target, {})[which] = tensor.float().numpy()
    broken = [t for t, p in pairs.items() if set(p) != {"a", "b"}]
    if broken or not pairs:
        raise LoraCliError(f"The adapter in {info.path} is incomplete (lora_A/lora_B pairs missing for "
                           f"{', '.join(broken[:3]) or 'every module'}).")
    return pairs


def lora_alpha(peft_config: dict) -> float:
    """The alpha to write so that llama.cpp's alpha / rank is peft's scale; refuses what it cannot express."""
    unsupported = [k for k in ("use_dora", "rank_pattern", "alpha_pattern", "modules_to_save", "fan_in_fan_out")
                   if peft_config.get(k)]
    if unsupported:
        raise LoraCliError(f"A GGUF LoRA adapter cannot express this adapter's {', '.join(unsupported)}.",
                           "Use --format gguf: the merged model holds every change.")
    alpha, r = float(peft_config["lora_alpha"]), int(peft_config["r"])
    return alpha * math.sqrt(r) if peft_config.get("use_rslora") else alpha


def write_lora_gguf(path: Path, info, spec, outtype: str, reporter=NULL_REPORTER) -> dict:
    """Write the adapter of `info` for the architecture `spec` to `path`; returns {GGML type: count}."""
    peft_config = json.loads((info.path / ADAPTER_CONFIG).read_text(encoding="utf-8"))
    alpha = lora_alpha(peft_config)
    pairs = _adapter_pairs(info, spec)
    writer = gguf.GGUFWriter(None, spec.arch_name)
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
    writer.add_name(f"{info.base_model} LoRA ({info.path.name})")
    writer.add_string("lora_cli.version", __version__)
    writer.add_string("lora_cli.template", info.template)
    plan = []
    for base, pair in sorted(pairs.items()):
        b = to_gguf_layout(base, pair["b"], spec)  # rows of B are the rows of W: permuted like W's
        plan += [(base + suffix, array.shape, lambda x=array: x) for suffix, array in ((".lora_a", pair["a"]),
                                                                                        (".lora_b", b))]
    return stream(writer, path, outtype, plan, reporter, f"Writing {outtype} GGUF LoRA adapter")
