"""export: the command line, where files land (atomically, never over a user's file), and the tokenizer's
pre-tokenizer named so that a GGUF reader splits text as the training tokenizer did."""

import json

import pytest
from helpers.export import adapter
from typer.testing import CliRunner

from lora_cli.adapter.folder import read_adapter
from lora_cli.cli.app import app
from lora_cli.errors import LoraCliError
from lora_cli.export.runner import export

runner = CliRunner()


@pytest.fixture(scope="module")
def qwen_adapter(tmp_path_factory, tiny_model_dir):
    return adapter(tmp_path_factory, tiny_model_dir, "qwen2")


def test_a_gguf_file_is_replaced_only_with_force_and_only_if_it_is_a_gguf(qwen_adapter, tmp_path):
    info = read_adapter(qwen_adapter)
    export(info, tmp_path / "model.gguf", "gguf", "q8_0")
    before = (tmp_path / "model.gguf").stat().st_size
    with pytest.raises(LoraCliError, match="already exists"):
        export(info, tmp_path / "model.gguf", "gguf", "f16")
    export(info, tmp_path / "model.gguf", "gguf", "f16", force=True)
    assert (tmp_path / "model.gguf").stat().st_size > before  # f16 is larger than q8_0: it was replaced
    (tmp_path / "notes.gguf").write_text("my notes")
    with pytest.raises(LoraCliError, match="not a GGUF file; refusing to replace it, even with --force"):
        export(info, tmp_path / "notes.gguf", "gguf", force=True)
    assert (tmp_path / "notes.gguf").read_text() == "my notes"
    with pytest.raises(LoraCliError, match="is a folder"):
        export(info, tmp_path, "gguf")
    with pytest.raises(LoraCliError, match="into the adapter folder"):
        export(info, qwen_adapter / "model.gguf", "gguf")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.gguf", "notes.gguf"]  # no temporaries left


def test_an_ollama_folder_is_replaced_only_with_force_and_only_if_it_holds_an_export(qwen_adapter, tmp_path):
    info = read_adapter(qwen_adapter)
    (tmp_path / "empty").mkdir()
    export(info, tmp_path / "empty", "ollama", "q8_0")  # an empty folder is fine
    with pytest.raises(LoraCliError, match="already exists"):
        export(info, tmp_path / "empty", "ollama")
    export(info, tmp_path / "empty", "ollama", "f16", force=True)
    assert "f16" in (tmp_path / "empty" / "Modelfile").read_text()
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    with pytest.raises(LoraCliError, match="holds no Modelfile; refusing to replace it, even with --force"):
        export(info, mine, "ollama", force=True)
    (tmp_path / "file").write_text("x")
    with pytest.raises(LoraCliError, match="is a file"):
        export(info, tmp_path / "file", "ollama")
    assert (mine / "notes.txt").read_text() == "keep me"


@pytest.mark.parametrize("fmt, dest", [("gguf", "model.gguf"), ("ollama", "ollama"), ("gguf-lora", "adapter.gguf")])
def test_a_failed_write_leaves_nothing_behind(fmt, dest, qwen_adapter, tmp_path, monkeypatch):
    import gguf

    def disk_full(self, *a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensor_data", disk_full)
    with pytest.raises(LoraCliError, match="No space left"):
        export(read_adapter(qwen_adapter), tmp_path / dest, fmt)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("args, message", [
    (["export", "-a", "{adapter}"], "No output given"),
    (["export", "-a", "{adapter}", "-o", "{tmp}/m.gguf", "--format", "onnx"], "--format must be one of gguf, gguf-lora"),
    (["export", "-a", "{adapter}", "-o", "{tmp}/m.gguf", "--outtype", "q2_k"], "--outtype must be one of"),
    (["export", "-a", "{adapter}", "-o", "{tmp}/m.gguf", "--format", "gguf-lora", "--outtype", "q4_0"],
     "is not offered for --format gguf-lora"),
    (["export", "-a", "{adapter}", "-o", "{tmp}/m.gguf", "--base-weights", "int8"], "--base-weights must be one of"),
    (["export", "-a", "{tmp}/nope", "-o", "{tmp}/m.gguf"], "does not exist"),
])
def test_cli_export_bad_inputs(args, message, qwen_adapter, tmp_path):
    fill = {"adapter": str(qwen_adapter), "tmp": str(tmp_path)}
    res = runner.invoke(app, [a.format(**fill) for a in args])
    assert res.exit_code == 1 and message in res.output and "Traceback" not in res.output
    assert not (tmp_path / "m.gguf").exists()


def test_cli_export_says_what_it_wrote_and_how_to_prompt_it(qwen_adapter, tmp_path):
    res = runner.invoke(app, ["export", "-a", str(qwen_adapter), "-f", "ollama", "-o", str(tmp_path / "out"),
                              "--outtype", "q8_0"])
    assert res.exit_code == 0, res.output
    assert "Wrote" in res.output and "Modelfile, model.gguf" in res.output
    assert "Prompt (the user message): the instruction, or the instruction + '\\n\\n### Input:\\n' + the input" \
        in res.output
    assert f"ollama create out -f {tmp_path / 'out' / 'Modelfile'}" in res.output
    res = runner.invoke(app, ["export", "-a", str(qwen_adapter), "-o", str(tmp_path / "m.gguf"), "--json"])
    result = json.loads(res.stdout)
    assert result["format"] == "gguf" and result["outtype"] == "f16" and result["size_bytes"] > 0
    assert result["base_weights"] == "original" and result["tensors"]["F16"] > 0


def _vocab_only_gguf(tokenizer, folder):
    import gguf

    from lora_cli.export.vocab import add_vocab

    writer = gguf.GGUFWriter(None, "qwen2")
    add_vocab(writer, tokenizer, len(tokenizer))
    writer.write_header_to_file(folder / "vocab.gguf")
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    writer.close()
    return gguf.GGUFReader(str(folder / "vocab.gguf")).fields["tokenizer.ggml.pre"].contents()


@pytest.mark.parametrize("split, name", [("llama3", "llama-bpe"), ("qwen2", "qwen2")])
def test_the_pre_tokenizer_is_named_so_that_a_gguf_reader_splits_text_as_training_did(split, name, tmp_path):
    from tiny_models import build_llama_tokenizer
    from transformers import AutoTokenizer

    from lora_cli.export.vocab import LLAMA3_SPLIT, QWEN2_SPLIT

    tok = build_llama_tokenizer(tmp_path, split=LLAMA3_SPLIT if split == "llama3" else QWEN2_SPLIT)
    assert _vocab_only_gguf(tok, tmp_path) == name
    loaded = AutoTokenizer.from_pretrained(str(tmp_path), gguf_file="vocab.gguf")
    for text in ("I've 12345 apples\n\n  and 'RE they?", "3.14159 is pi", "tab\there  two  spaces\r\n"):
        assert loaded(text)["input_ids"] == tok(text)["input_ids"], text  # the two splits differ on digits


def test_a_pre_tokenizer_without_a_llama_cpp_name_is_refused():
    from lora_cli.export.vocab import pre_tokenizer_name

    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "use_regex": True}
    assert pre_tokenizer_name({"pre_tokenizer": byte_level}) == "gpt-2"
    digits = {"type": "Digits", "individual_digits": True}
    assert pre_tokenizer_name({"pre_tokenizer": {"type": "Sequence", "pretokenizers": [digits, byte_level]}}) == "smollm"
    with pytest.raises(LoraCliError, match="has no llama.cpp name"):
        pre_tokenizer_name({"pre_tokenizer": {"type": "Whitespace"}})
    with pytest.raises(LoraCliError, match="has no llama.cpp name"):
        pre_tokenizer_name({"pre_tokenizer": dict(byte_level, add_prefix_space=True)})
