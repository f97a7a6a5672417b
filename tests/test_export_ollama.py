"""export --format ollama: the Modelfile's TEMPLATE, read as Ollama reads it and rendered by a small Go-template
renderer (tests/helpers/gotemplate.py), gives lora-cli's training prompt byte for byte; stops and parameters."""

import pytest
from helpers.export import (
    CONVERSATION,
    adapter,
    conversation_prompt,
    mapped_conversation,
    prompt_text,
    template_file,
    val_records,
)
from helpers.gotemplate import ollama_render, parse_modelfile

from lora_cli.adapter.folder import read_adapter
from lora_cli.data.records import Example
from lora_cli.data.templates import get_template
from lora_cli.errors import LoraCliError
from lora_cli.data.chat_template import user_content
from lora_cli.export.modelfile import chat_shape, go_template
from lora_cli.export.runner import export

ARCHS = ["llama", "qwen2"]


@pytest.fixture(scope="module")
def adapters(tmp_path_factory, tiny_model_dir):
    return {arch: adapter(tmp_path_factory, tiny_model_dir, arch) for arch in ARCHS}


def read_modelfile(folder):
    commands = parse_modelfile((folder / "Modelfile").read_text(encoding="utf-8"))
    single = {name: value for name, value in commands if name != "stop"}
    return single, [value for name, value in commands if name == "stop"]


@pytest.mark.parametrize("kind", ["alpaca", "alpaca-seed", "chat", "file"])
@pytest.mark.parametrize("arch", ARCHS)
def test_the_modelfile_template_renders_lora_clis_prompt_byte_for_byte(arch, kind, adapters, tmp_path):
    from gguf import GGUFReader

    from lora_cli.model.load import load_tokenizer

    name = str(template_file(tmp_path)) if kind == "file" else kind
    result = export(read_adapter(adapters[arch], template=name), tmp_path / "ollama", "ollama", "q8_0")
    modelfile, _ = read_modelfile(tmp_path / "ollama")
    gguf = tmp_path / "ollama" / modelfile["from"].removeprefix("./")
    assert gguf.read_bytes()[:4] == b"GGUF" and sorted(result.files) == ["Modelfile", gguf.name]
    tok, template = load_tokenizer(adapters[arch]), get_template(name)
    system = modelfile.get("system")
    for row in val_records():
        example = Example(1, row["instruction"], row["input"], row["output"])
        user = {"role": "user", "content": user_content(template, row["instruction"], row["input"])}
        assert ollama_render(modelfile["template"], [user], system) == prompt_text(template, tok, example), row
    # a conversation (system, two turns, two user messages in a row) as training rendered it. Ollama joins
    # consecutive messages of one role, as lora-cli's text templates do; a tokenizer's chat template renders
    # them as turns of their own, so for `chat` the conversation alternates.
    messages = CONVERSATION if kind != "chat" else CONVERSATION[:3] + CONVERSATION[4:]
    conversation = mapped_conversation(template, messages[:-1])
    assert ollama_render(modelfile["template"], conversation, system) == conversation_prompt(template, tok, messages)
    # the BOS training puts first is not in the TEMPLATE: the runtime adds it, as the GGUF says
    add_bos = GGUFReader(str(gguf)).fields["tokenizer.ggml.add_bos_token"].contents()
    assert add_bos == (arch == "llama") and not modelfile["template"].startswith(tok.bos_token or "\0")


@pytest.mark.parametrize("arch, kind, stops", [
    ("qwen2", "alpaca", ["<|im_end|>", "### Instruction:"]),
    ("llama", "alpaca", ["<|eot_id|>", "### Instruction:"]),
    ("qwen2", "chat", ["<|im_end|>", "<|im_start|>user"]),
    ("llama", "chat", ["<|eot_id|>", "<|start_header_id|>user<|end_header_id|>"]),
])
def test_the_modelfile_stops_on_the_training_eos_and_the_templates_markers_and_is_greedy(arch, kind, stops, adapters,
                                                                                        tmp_path):
    export(read_adapter(adapters[arch], template=kind), tmp_path / "ollama", "ollama", "f16")
    modelfile, found = read_modelfile(tmp_path / "ollama")
    assert found == stops
    assert (modelfile["temperature"], modelfile["repeat_penalty"]) == ("0", "1")
    assert "system" not in modelfile  # neither template has a default system prompt


def test_smollm2s_chat_template_maps_onto_a_template_and_its_default_system_prompt(use_embedded):
    """The embedded model's ChatML template adds a system prompt when there is none: it becomes SYSTEM."""
    from lora_cli.model.load import load_tokenizer
    from lora_cli.model.resolve import resolve_model

    tok = load_tokenizer(resolve_model("smollm2-135m").path)
    shape = chat_shape(tok, tok.eos_token, add_eos=True)
    assert shape.default_system == "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
    template = go_template(shape)
    for messages in ([CONVERSATION[1]], CONVERSATION[:2], CONVERSATION[1:4], CONVERSATION[:4]):
        want = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        assert ollama_render(template, messages, shape.default_system) == want


def test_a_chat_template_that_is_not_rendered_turn_by_turn_is_refused_for_ollama(adapters, tmp_path):
    """Llama 2's template puts the system prompt inside the first [INST]: no per-turn TEMPLATE renders it."""
    import shutil

    llama2 = ("{% if messages[0]['role'] == 'system' %}{% set sys = '<<SYS>>\\n' + messages[0]['content'] + "
              "'\\n<</SYS>>\\n\\n' %}{% set msgs = messages[1:] %}{% else %}{% set sys = '' %}{% set msgs = messages %}"
              "{% endif %}{% for m in msgs %}{% if m['role'] == 'user' %}[INST] {{ (sys if loop.first else '') + "
              "m['content'] }} [/INST]{% else %} {{ m['content'] }}</s>{% endif %}{% endfor %}")
    folder = tmp_path / "adapter"
    shutil.copytree(adapters["qwen2"], folder)
    (folder / "chat_template.jinja").write_text(llama2)
    with pytest.raises(LoraCliError, match="cannot be written as an Ollama TEMPLATE") as err:
        export(read_adapter(folder, template="chat"), tmp_path / "ollama", "ollama")
    assert "--format gguf" in err.value.hint and not (tmp_path / "ollama").exists()
    export(read_adapter(folder, template="chat"), tmp_path / "model.gguf", "gguf")  # its own template, in GGUF
