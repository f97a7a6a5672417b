"""Tiny models and adapters for the export tests (built once per session), and what the tests compare.

- a Llama (tiny_models.build_llama: untied output matrix, GQA) with a Llama 3 style tokenizer that
  puts a BOS before every text and ends turns with <|eot_id|>;
- a Qwen2 (helpers.adapter_factory.peaked_model_dir: tied embeddings, q/k/v biases) with conftest's ChatML
  tokenizer (no BOS, eos <|im_end|>);
adapters on every linear layer (so attn_k's permutation and the MLP are exercised too).
"""

from __future__ import annotations

from pathlib import Path

from helpers.adapter_factory import make_adapter, peaked_model_dir
from helpers import make_records, write_jsonl

_MEMO: dict[str, Path] = {}
IDS = [5, 17, 42, 99, 150, 3, 77, 201, 8, 64, 33, 120, 250, 11]


def llama_dir(factory) -> Path:
    if "llama" not in _MEMO:
        from tiny_models import build_llama, build_llama_tokenizer

        folder = factory.mktemp("tiny-llama")
        tok = build_llama_tokenizer(folder)
        build_llama(folder, len(tok))
        _MEMO["llama"] = folder
    return _MEMO["llama"]


def model_dir(factory, tiny_model_dir: Path, arch: str) -> Path:
    return llama_dir(factory) if arch == "llama" else peaked_model_dir(factory, tiny_model_dir)


def adapter(factory, tiny_model_dir: Path, arch: str, quantization: str = "none") -> Path:
    """An adapter on every linear layer of the tiny `arch` model (trained once per session)."""
    return make_adapter(factory, model_dir(factory, tiny_model_dir, arch), f"export-{arch}-{quantization}", epochs=2,
                        **{"lora.target_modules": ["all-linear"], "model.quantization": quantization})


def val_records() -> list[dict]:
    """Records with and without an input (blank too), and characters a template must carry through."""
    rows = make_records(5, seed=3)
    rows[0]["input"], rows[1]["input"] = "", "   "
    rows[2]["instruction"] += ' "quoted" {braces} {{ .Prompt }} \\ tab\there'
    rows[3]["input"] = "line one\nline two"
    return rows


def val_file(folder: Path) -> Path:
    return write_jsonl(folder / "val.jsonl", val_records())


def template_file(folder: Path) -> Path:
    """A template file with braces, quotes, a backslash, an unprintable character (a zero-width joiner) and a
    suffix: what escaping in Jinja, Go and the Modelfile must carry through."""
    path = folder / "template.txt"
    path.write_text('<task> {{not a "placeholder"}} """ \u200d\\n\n{instruction}\n-- context --\n{input}\n<answer>\n'
                    '{output}</answer>\n', encoding="utf-8")
    return path


def prompt_text(template, tokenizer, example) -> str:
    """lora-cli's training prompt for a record, as text: every segment before the response."""
    return "".join(text for text, _ in template.segments(example, tokenizer)[:-1])


def training_text(template, tokenizer, example, add_eos: bool = True) -> str:
    """lora-cli's whole training text for a record: segments, the eos after each trained one (as tokenization does)."""
    out = []
    for text, trainable in template.segments(example, tokenizer):
        out.append(text)
        if trainable and add_eos and not text.endswith(tokenizer.eos_token):
            out.append(tokenizer.eos_token)
    return "".join(out)


def conversation_prompt(template, tokenizer, messages: list[dict], add_eos: bool = True) -> str:
    """lora-cli's training text of a conversation up to its last answer (the prompt for that answer)."""
    from lora_cli.data.records import Example

    segments = template.segments(Example(0, messages=messages), tokenizer)[:-1]
    out = []
    for text, trainable in segments:
        out.append(text)
        if trainable and add_eos and not text.endswith(tokenizer.eos_token):
            out.append(tokenizer.eos_token)
    return "".join(out)


def mapped_conversation(template, messages: list[dict]) -> list[dict]:
    """`messages` as sent to an exported template: each turn's user messages joined (as lora-cli and Ollama
    join them) and mapped like an instruction with an empty input (chat_template.user_content)."""
    from lora_cli.data.chat_template import user_content

    out: list[dict] = []
    for msg in messages:
        if msg["role"] == "user" and out and out[-1]["role"] == "user":
            out[-1] = {"role": "user", "content": out[-1]["content"] + "\n\n" + msg["content"]}
        else:
            out.append(dict(msg))
    return [dict(m, content=user_content(template, m["content"], "")) if m["role"] == "user" else m for m in out]


CONVERSATION = [
    {"role": "system", "content": "You answer in one word."},
    {"role": "user", "content": "Name a color."},
    {"role": "assistant", "content": "Red."},
    {"role": "user", "content": "Another one?"},
    {"role": "user", "content": "Not red."},
    {"role": "assistant", "content": "Blue."},
]
