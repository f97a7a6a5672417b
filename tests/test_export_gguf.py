"""export --format gguf: the merged model round-trips through transformers' GGUF loader (weights, logits,
tokenizer, chat template), and what cannot be mapped is refused before anything is written."""

import json
import re

import numpy as np
import pytest
import torch
from helpers import RecordingReporter
from helpers.export import (
    CONVERSATION,
    IDS,
    adapter,
    conversation_prompt,
    mapped_conversation,
    model_dir,
    prompt_text,
    template_file,
    training_text,
    val_records,
)

from lora_cli.adapter.folder import read_adapter
from lora_cli.adapter.merging import merged_model
from lora_cli.data.records import Example
from lora_cli.data.templates import get_template
from lora_cli.data.tokenization import LabelPolicy, encode_batch, encode_example_prompt
from lora_cli.errors import LoraCliError
from lora_cli.data.chat_template import user_content
from lora_cli.export.runner import export

ARCHS = ["llama", "qwen2"]
# Largest logit difference to the fp32 merge, as a fraction of the largest logit, measured on these random
# tiny models (init 0.3: large logits amplify rounding), llama / qwen2: f32 0 / 0, f16 0.0043 / 0.0025,
# bf16 0.029 / 0.024, q8_0 0.062 / 0.054, q4_0 0.80 / 0.84 (4 bits wreck a random 64-wide model; the
# embedded model's numbers are in the README). Asserted with ~1.5x margin.
TOLERANCE = {"f32": 1e-6, "f16": 0.007, "bf16": 0.045, "q8_0": 0.1, "q4_0": 1.3}


def load_gguf(path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name)
    assert model.dtype == torch.float32  # de-quantized to fp32 by the loader
    return model.eval(), AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=torch.tensor([IDS])).logits.float()


def stored(weight: torch.Tensor, outtype: str, name: str, arch: str) -> torch.Tensor:
    """What the GGUF should hold for a merged weight, rounded exactly as its type rounds (gguf's own quantizers)."""
    import gguf
    from gguf.quants import dequantize, quantize

    from lora_cli.export.architecture import gguf_name
    from lora_cli.export.gguf_model import tensor_type

    target = gguf_name(gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.upper()], 64), name)
    qtype = tensor_type(outtype, target, tuple(weight.shape))
    array = weight.float().numpy()
    if qtype.name == "F16":
        return torch.from_numpy(array.astype(np.float16).astype(np.float32))
    if qtype.name in ("F32",):
        return weight.float()
    return torch.from_numpy(dequantize(quantize(array, qtype), qtype).copy())


@pytest.fixture(scope="module")
def adapters(tmp_path_factory, tiny_model_dir):
    return {arch: adapter(tmp_path_factory, tiny_model_dir, arch) for arch in ARCHS}


@pytest.fixture(scope="module")
def references(adapters):
    return {arch: merged_model(read_adapter(path), "fp32", "original")[0] for arch, path in adapters.items()}


@pytest.mark.slow  # the export matrix: architectures x types
@pytest.mark.parametrize("outtype", ["f32", "f16", "bf16", "q8_0", "q4_0"])
@pytest.mark.parametrize("arch", ARCHS)
def test_the_gguf_holds_the_merged_weights_and_reproduces_the_merged_logits(arch, outtype, adapters, references,
                                                                           tmp_path):
    result = export(read_adapter(adapters[arch]), tmp_path / "model.gguf", "gguf", outtype)
    loaded, _ = load_gguf(tmp_path / "model.gguf")
    reference = references[arch]
    assert result.architecture == arch and loaded.config.model_type == arch
    assert loaded.config.tie_word_embeddings == (arch == "qwen2")  # the tiny llama has its own output matrix
    want = reference.state_dict()
    for name, tensor in loaded.state_dict().items():  # every tensor, exactly as the type rounds it
        assert torch.equal(tensor, stored(want[name], outtype, name, arch)), name
    got, ref = logits(loaded), logits(reference)
    ratio = float((got - ref).abs().max() / ref.abs().max())
    assert ratio <= TOLERANCE[outtype], (outtype, ratio)
    if outtype in ("f32", "f16", "bf16", "q8_0"):
        assert (got.argmax(-1) == ref.argmax(-1)).float().mean() >= 0.75


def tensor_types(path) -> dict[str, tuple[str, int]]:
    """{gguf tensor name: (GGML type name, number of dimensions)}, read with gguf's own reader."""
    from gguf import GGUFReader

    return {t.name: (t.tensor_type.name, len(t.shape)) for t in GGUFReader(str(path)).tensors}


@pytest.mark.parametrize("arch", ARCHS)
def test_a_q8_0_export_keeps_attention_values_and_ffn_down_in_f16_and_every_other_matrix_in_q8_0(
        arch, adapters, tmp_path):
    import gguf

    from lora_cli.export.check_artifact import open_artifact

    result = export(read_adapter(adapters[arch]), tmp_path / "model.gguf", "gguf", "q8_0")
    types = tensor_types(tmp_path / "model.gguf")
    layers = {name.split(".")[1] for name in types if name.startswith("blk.")}
    kept = {f"blk.{i}.{kind}.weight" for i in layers for kind in ("attn_v", "ffn_down")}
    assert len(kept) == 2 * len(layers) >= 4 and kept <= set(types)
    for name, (qtype, dims) in types.items():
        want = "F32" if dims == 1 else "F16" if name in kept else "Q8_0"
        assert qtype == want, (name, qtype)
    assert types["token_embd.weight"][0] == "Q8_0" and ("output.weight" in types) == (arch == "llama")
    assert result.tensors == {"F16": len(kept), "F32": sum(d == 1 for _, d in types.values()),
                              "Q8_0": sum(d == 2 for _, d in types.values()) - len(kept)}
    file_type = gguf.GGUFReader(str(tmp_path / "model.gguf")).fields["general.file_type"].contents()
    assert file_type == gguf.LlamaFileType.MOSTLY_Q8_0  # what Ollama shows as the quantization
    assert open_artifact(tmp_path / "model.gguf").weight_type == "Q8_0"  # held to q8_0's agreement target


def test_only_the_merged_q8_0_export_keeps_f16_matrices_not_q4_0_nor_a_q8_0_lora_adapter(adapters, tmp_path):
    info = read_adapter(adapters["llama"])
    export(info, tmp_path / "q4.gguf", "gguf", "q4_0")
    export(info, tmp_path / "lora.gguf", "gguf-lora", "q8_0")
    q4, lora = tensor_types(tmp_path / "q4.gguf"), tensor_types(tmp_path / "lora.gguf")
    assert q4["blk.0.attn_v.weight"][0] == q4["blk.0.ffn_down.weight"][0] == "Q4_0"
    assert {t for name, (t, dims) in q4.items() if dims == 2 and not name.startswith(("token_embd", "output"))} \
        == {"Q4_0"}
    # lora_a's rows are the matrix's (64 wide here), so Q8_0; lora_b's are the rank's, below 32, so F16 as before
    assert lora["blk.0.attn_v.weight.lora_a"][0] == lora["blk.0.ffn_down.weight.lora_a"][0] == "Q8_0"


def test_the_gguf_tokenizer_encodes_and_decodes_the_val_records_like_the_training_tokenizer(adapters, tmp_path):
    from lora_cli.model.load import load_tokenizer

    for arch, path in adapters.items():
        export(read_adapter(path), tmp_path / f"{arch}.gguf", "gguf", "q8_0")
        _, gguf_tok = load_gguf(tmp_path / f"{arch}.gguf")
        tok = load_tokenizer(path)
        assert (gguf_tok.eos_token, gguf_tok.bos_token) == (tok.eos_token, tok.bos_token)
        for row in val_records():
            text = f"{row['instruction']}\n\n{row['input']} -> {row['output']}{tok.eos_token}"
            ids = tok(text)["input_ids"]  # with the BOS the training tokenizer adds (llama) or none (qwen2)
            assert gguf_tok(text)["input_ids"] == ids, (arch, text)
            assert gguf_tok.decode(ids, skip_special_tokens=True) == tok.decode(ids, skip_special_tokens=True)


@pytest.mark.parametrize("kind", ["alpaca", "alpaca-seed", "chat", "file"])
@pytest.mark.parametrize("arch", ARCHS)
def test_the_chat_template_in_the_metadata_renders_lora_clis_prompt(arch, kind, adapters, tmp_path):
    """For every val record: the metadata's Jinja template, given the record as one user message (see
    chat_template.py), renders the training prompt's text and tokens; text templates also the whole example;
    and a conversation renders as training rendered it."""
    from lora_cli.model.load import load_tokenizer

    name = str(template_file(tmp_path)) if kind == "file" else kind
    info = read_adapter(adapters[arch], template=name)
    export(info, tmp_path / "model.gguf", "gguf", "q8_0")
    _, gguf_tok = load_gguf(tmp_path / "model.gguf")
    tok, template = load_tokenizer(adapters[arch]), get_template(name)
    bos = tok.bos_token if arch == "llama" else ""
    for row in val_records():
        example = Example(1, row["instruction"], row["input"], row["output"])
        user = {"role": "user", "content": user_content(template, row["instruction"], row["input"])}
        rendered = gguf_tok.apply_chat_template([user], tokenize=False, add_generation_prompt=True)
        assert rendered == bos + prompt_text(template, tok, example), (kind, row)
        ids = gguf_tok(rendered, add_special_tokens=False)["input_ids"]
        assert ids == encode_example_prompt(example, tok, template), (kind, row)
        if kind != "chat":  # the tokenizer's own template adds a newline after a turn, which training leaves out
            full = gguf_tok.apply_chat_template([user, {"role": "assistant", "content": row["output"]}], tokenize=False)
            assert full == bos + training_text(template, tok, example)
            assert gguf_tok(full, add_special_tokens=False)["input_ids"] == \
                encode_batch([example], tok, template, LabelPolicy(max_length=4096))[0].input_ids
    # a conversation (system, two turns, two user messages in a row), up to its last answer, as training rendered it
    messages = CONVERSATION if kind != "chat" else CONVERSATION[:3] + CONVERSATION[4:]
    rendered = gguf_tok.apply_chat_template(mapped_conversation(template, messages[:-1]), tokenize=False,
                                            add_generation_prompt=True)
    assert rendered == bos + conversation_prompt(template, tok, messages)


def test_a_qlora_adapter_is_exported_on_the_nf4_weights_it_was_trained_against_except_under_q4_0(
        tmp_path_factory, tiny_model_dir, tmp_path):
    from gguf import GGUFReader

    from lora_cli.infer.generation import load_for_inference

    path = adapter(tmp_path_factory, tiny_model_dir, "llama", quantization="nf4")
    result = export(read_adapter(path), tmp_path / "model.gguf", "gguf", "f32")  # --base-weights auto
    assert result.base_weights == "nf4"
    meta = GGUFReader(str(tmp_path / "model.gguf")).fields["lora_cli.base_weights"].contents()
    assert meta == "nf4"
    evaluated = load_for_inference(read_adapter(path), precision="fp32", device="cpu")  # 4-bit, as eval runs it
    assert evaluated.model.base_model.model.model.layers[0].self_attn.q_proj.base_layer.__class__.__name__ == "Linear4bit"
    got, ref = logits(load_gguf(tmp_path / "model.gguf")[0]), logits(evaluated.model)
    assert torch.allclose(got, ref, atol=1e-3, rtol=1e-3)
    original = export(read_adapter(path), tmp_path / "original.gguf", "gguf", "f32", base_weights="original")
    assert original.base_weights == "original"
    reporter = RecordingReporter()  # q4_0 would round NF4 values twice: auto takes the original weights, and says so
    assert export(read_adapter(path), tmp_path / "q4.gguf", "gguf", "q4_0", reporter=reporter).base_weights == "original"
    assert any("not exactly the one `lora-cli eval` measured" in m for m in reporter.messages)
    assert (logits(load_gguf(tmp_path / "original.gguf")[0]) - ref).abs().max() > 10 * (got - ref).abs().max()


def _edit_config(src, dest, **changes):
    import shutil

    shutil.copytree(src, dest)
    config = json.loads((dest / "config.json").read_text())
    config.update(changes)
    (dest / "config.json").write_text(json.dumps(config))
    return dest


def _gpt2_dir(tmp_path, tokenizer_dir):
    import shutil

    from transformers import GPT2Config, GPT2LMHeadModel

    folder = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(vocab_size=400, n_embd=32, n_layer=1, n_head=2)).save_pretrained(folder)
    for f in tokenizer_dir.glob("tokenizer*"):
        shutil.copy(f, folder / f.name)
    return folder


@pytest.mark.parametrize("case, message", [
    ("gpt2", "its architecture gpt2 (GPT2LMHeadModel) is not one lora-cli maps"),
    ("rope", "rope scaling 'llama3'"),
    ("bias", "attention or MLP biases"),
    ("wordlevel", "not a byte-level BPE"),
])
def test_what_cannot_be_mapped_is_refused_in_one_message_and_nothing_is_written(case, message, adapters,
                                                                                tmp_path_factory, tiny_model_dir,
                                                                                tmp_path):
    llama = model_dir(tmp_path_factory, tiny_model_dir, "llama")
    rope = {"rope_parameters": {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
                                "high_freq_factor": 4.0, "original_max_position_embeddings": 256}}
    base = {"gpt2": lambda: _gpt2_dir(tmp_path, tiny_model_dir),
            "rope": lambda: _edit_config(llama, tmp_path / "rope", **rope),
            "bias": lambda: _edit_config(llama, tmp_path / "bias", attention_bias=True),
            "wordlevel": lambda: _wordlevel_copy(llama, tmp_path / "wordlevel")}[case]()
    # training saved the tokenizer into the adapter folder; without that copy the base's tokenizer is used
    info = read_adapter(_adapter_without_tokenizer(adapters["llama"], tmp_path / "adapter"), model=str(base))
    with pytest.raises(LoraCliError, match=re.escape(message)) as err:
        export(info, tmp_path / "out" / "model.gguf", "gguf")
    assert "\n" not in err.value.message
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def _adapter_without_tokenizer(src, dest):
    import shutil

    shutil.copytree(src, dest, ignore=shutil.ignore_patterns("tokenizer*", "chat_template*", "checkpoints"))
    return dest


def _wordlevel_copy(src, dest):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    _edit_config(src, dest)
    vocab = AutoTokenizer.from_pretrained(str(src)).get_vocab()
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<|end_of_text|>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    for f in dest.glob("tokenizer*"):
        f.unlink()
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|eot_id|>").save_pretrained(dest)
    return dest
