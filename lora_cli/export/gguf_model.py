"""The merged model as one GGUF file, written with the `gguf` package (writer, name map, quantizers).

Tensor types per --outtype, as llama.cpp's converter and quantizer choose them (docs/EXPORT.md):
every matrix in that type, except that q8_0 keeps attn_v and ffn_down in F16 (llama.cpp's Q8_0
matmul rounds the activations to 8 bits too, and src/llama-quant.cpp treats these two as the most
sensitive; measured in docs/EXPORT.md: 96.7% -> 97.8% next-token agreement for 19% more file) and
q4_0 keeps token_embd and output in Q8_0 (the gguf package has no K-quant quantizer). Vectors stay
F32, and a matrix whose rows are not a multiple of the block size falls back to F16
(convert_hf_to_gguf.py). Quantizing starts from the fp32 merge, so nothing is rounded twice. Each
tensor is converted and streamed to the file after the header, one at a time: memory holds the
fp32 model plus one converted tensor.
"""

from __future__ import annotations

from collections import Counter

import gguf
import numpy as np
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as Q
from gguf.quants import quant_shape_to_byte_shape, quantize

from lora_cli.errors import LoraCliError
from lora_cli.export.architecture import add_hparams, tensor_names, to_gguf_layout
from lora_cli.export.vocab import add_vocab
from lora_cli.progress import NULL_REPORTER

FILE_TYPES = {"f32": "ALL_F32", "f16": "MOSTLY_F16", "bf16": "MOSTLY_BF16", "q8_0": "MOSTLY_Q8_0",
              "q4_0": "MOSTLY_Q4_0"}
_MATRIX = {"f32": "F32", "f16": "F16", "bf16": "BF16", "q8_0": "Q8_0", "q4_0": "Q4_0"}
_KEEP_8BIT = ("token_embd.weight", "output.weight")
_KEEP_F16_IN_Q8 = (".attn_v.weight", ".ffn_down.weight")  # model matrices only: a LoRA's end in .lora_a/.lora_b


def tensor_type(outtype: str, name: str, shape: tuple[int, ...]):
    """The GGML type a tensor is stored in (see the module docstring)."""
    if len(shape) == 1:
        return Q.F32
    qtype = Q[_MATRIX[outtype]]
    if outtype == "q4_0" and name in _KEEP_8BIT:
        qtype = Q.Q8_0
    if outtype == "q8_0" and name.endswith(_KEEP_F16_IN_Q8):
        return Q.F16
    block = GGML_QUANT_SIZES[qtype][0]
    return qtype if shape[-1] % block == 0 else Q.F16


def encode(array, qtype):
    """`array` (float32, numpy) in `qtype`: float arrays for F32/F16, gguf's quantizer's bytes otherwise."""
    if qtype in (Q.F32, Q.F16):
        return np.ascontiguousarray(array, dtype=np.float32 if qtype == Q.F32 else np.float16)
    return quantize(np.ascontiguousarray(array, dtype=np.float32), qtype)


def declare(writer, name: str, shape: tuple[int, ...], qtype) -> None:
    """The tensor's entry in the header, before its data exists (shape and byte count from the type)."""
    if qtype in (Q.F32, Q.F16):
        dtype = np.float32 if qtype == Q.F32 else np.float16
        writer.add_tensor_info(name, shape, np.dtype(dtype), int(np.prod(shape)) * np.dtype(dtype).itemsize)
        return
    byte_shape = quant_shape_to_byte_shape(shape, qtype)
    writer.add_tensor_info(name, byte_shape, np.dtype(np.uint8), int(np.prod(byte_shape)), raw_dtype=qtype)


def stream(writer, path, outtype: str, plan: list[tuple[str, tuple[int, ...], object]], reporter=NULL_REPORTER,
           label: str = "") -> dict:
    """Each tensor declared in its type for `outtype` (tensor_type), the header, metadata and tensor infos
    written, then each tensor: `plan` is [(gguf name, shape, producer())].

    `producer()` returns the float32 numpy array, called only when that tensor is written.
    Returns {GGML type name: count}.
    """
    types = [tensor_type(outtype, name, shape) for name, shape, _ in plan]
    for (name, shape, _), qtype in zip(plan, types):
        declare(writer, name, shape, qtype)
    try:
        writer.write_header_to_file(path)
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        with reporter.stage(label or f"Writing {path}", total=len(plan), unit="tensors") as stage:
            for (_, _, produce), qtype in zip(plan, types):
                writer.write_tensor_data(encode(produce(), qtype))
                stage.update(1)
    finally:
        writer.close()
    return dict(Counter(qtype.name for qtype in types))


def write_model_gguf(path, model, tokenizer, spec, outtype: str, chat_template: str, metadata: dict,
                     reporter=NULL_REPORTER) -> dict[str, int]:
    """Write `model` (a merged transformers model, fp32) with its tokenizer and chat template to `path`;
    returns {GGML type name: tensor count}."""
    metadata = dict(metadata)
    state = model.state_dict()
    names = tensor_names(list(state), spec)
    head, embed = state.get("lm_head.weight"), state.get("model.embed_tokens.weight")
    if spec.tied and head is not None and embed is not None and not head.equal(embed):
        raise LoraCliError("The merged model's lm_head differs from its tied token embedding (an adapter on "
                           "lm_head?); a GGUF with tied embeddings cannot hold both.", "Use --format gguf-lora.")
    writer = gguf.GGUFWriter(None, spec.arch_name)
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(metadata.pop("name"))
    writer.add_file_type(getattr(gguf.LlamaFileType, FILE_TYPES[outtype]))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    add_hparams(writer, model.config, spec)
    add_vocab(writer, tokenizer, model.config.vocab_size)
    writer.add_chat_template(chat_template)
    for key, value in metadata.items():
        writer.add_string(f"lora_cli.{key}", str(value))
    plan = [(target, tuple(state[hf_name].shape),
             lambda t=state[hf_name], n=target: to_gguf_layout(n, t.detach().float().cpu().numpy(), spec))
            for hf_name, target in names.items()]
    return stream(writer, path, outtype, plan, reporter, f"Writing {outtype} GGUF")
