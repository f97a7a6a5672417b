"""export --format gguf-lora: the adapter, applied to its base the way llama.cpp applies a GGUF LoRA
(W + alpha / rank * lora_b @ lora_a, names through transformers' own GGUF name map), is the peft model."""

import pytest
import torch
from helpers.export import IDS, adapter, model_dir

from lora_cli.adapter.folder import read_adapter
from lora_cli.errors import LoraCliError
from lora_cli.export.gguf_lora import lora_alpha
from lora_cli.export.runner import export
from lora_cli.infer.generation import load_for_inference

ARCHS = ["llama", "qwen2"]


def apply_gguf_lora(model, path) -> dict:
    """Add the adapter in `path` to `model`'s weights as llama.cpp does (llama-adapter.cpp); its metadata."""
    from gguf import GGUFReader, dequantize
    from transformers.modeling_gguf_pytorch_utils import TENSOR_PROCESSORS, TensorProcessor, get_gguf_hf_weights_map

    reader = GGUFReader(str(path))
    meta = {k: reader.fields[k].contents() for k in ("general.architecture", "general.type", "adapter.type",
                                                     "adapter.lora.alpha")}
    heads = {"num_attention_heads": model.config.num_attention_heads,
             "num_key_value_heads": model.config.num_key_value_heads}
    processor = TENSOR_PROCESSORS.get(meta["general.architecture"], TensorProcessor)(config=heads)
    to_hf = get_gguf_hf_weights_map(model, processor)
    tensors = {t.name: t for t in reader.tensors}
    weights = dict(model.named_parameters())
    for name in [n for n in tensors if n.endswith(".lora_a")]:
        base = name.removesuffix(".lora_a")
        a, b = tensors[name], tensors[base + ".lora_b"]
        target = weights[to_hf[base]]
        in_features, out_features = target.shape[1], target.shape[0]
        assert (a.shape[0], b.shape[1], a.shape[1]) == (in_features, out_features, b.shape[0])  # llama.cpp's checks
        a_w = dequantize(a.data, a.tensor_type).reshape(a.shape[1], a.shape[0])
        b_w = dequantize(b.data, b.tensor_type).reshape(b.shape[1], b.shape[0])
        b_w = processor.process(weights=b_w, name=base + ".lora_b").weights  # llama: rows back in HF order
        scale = meta["adapter.lora.alpha"] / b_w.shape[1]
        with torch.no_grad():
            target += scale * torch.from_numpy(b_w.copy()) @ torch.from_numpy(a_w.copy())
    return meta


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=torch.tensor([IDS])).logits.float()


@pytest.mark.slow  # the export matrix: architectures x types
@pytest.mark.parametrize("outtype, atol", [("f32", 1e-4), ("q8_0", 0.05)])
@pytest.mark.parametrize("arch", ARCHS)
def test_the_gguf_lora_adapter_applied_as_llama_cpp_does_reproduces_the_peft_model(arch, outtype, atol,
                                                                                   tmp_path_factory, tiny_model_dir,
                                                                                   tmp_path):
    from transformers import AutoModelForCausalLM

    path = adapter(tmp_path_factory, tiny_model_dir, arch)
    result = export(read_adapter(path), tmp_path / "adapter.gguf", "gguf-lora", outtype)
    assert result.files == ["adapter.gguf"] and result.base_weights == ""
    peft = load_for_inference(read_adapter(path), precision="fp32", device="cpu")
    reference = logits(peft.model)
    with peft.model.disable_adapter():
        base_only = logits(peft.model)
    base = AutoModelForCausalLM.from_pretrained(str(model_dir(tmp_path_factory, tiny_model_dir, arch)),
                                                dtype=torch.float32)
    meta = apply_gguf_lora(base, tmp_path / "adapter.gguf")
    assert meta == {"general.architecture": arch, "general.type": "adapter", "adapter.type": "lora",
                    "adapter.lora.alpha": 32.0}
    got = logits(base)
    assert (reference - base_only).abs().max() > 1.0  # the adapter matters, so a match means it was applied right
    assert torch.allclose(got, reference, atol=atol * float(reference.abs().max()), rtol=0), outtype


def test_rslora_alpha_is_rescaled_and_what_a_gguf_lora_cannot_express_is_refused():
    assert lora_alpha({"lora_alpha": 32, "r": 16}) == 32
    assert lora_alpha({"lora_alpha": 32, "r": 16, "use_rslora": True}) == 32 * 4  # llama.cpp divides by r, not sqrt(r)
    for key, value in (("use_dora", True), ("rank_pattern", {"q_proj": 8}), ("modules_to_save", ["lm_head"])):
        with pytest.raises(LoraCliError, match=key):
            lora_alpha({"lora_alpha": 32, "r": 16, key: value})
