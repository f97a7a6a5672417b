"""The training prompt as a Jinja chat template: what llama.cpp and transformers apply to a GGUF, and
what a merged model folder carries as its tokenizer's chat template.

One rule maps a record onto ONE user message, in the GGUF's chat template and the Ollama TEMPLATE
alike (the table in docs/EXPORT.md): a text template (alpaca, alpaca-seed, a template file) is cut
as HEAD {instruction} SEPARATOR {input} TAIL (PromptShape) and the Input block travels inside the
message, so no runtime needs to know about inputs; `chat` keeps the tokenizer's own template (the
message as templates.ChatTemplate._messages builds it). Conversations render as lora-cli renders
`messages` records (TextTemplate.segments), every answer followed by the template's suffix and the eos.
The tokenizer's BOS (tokenization.special_prefix) opens the text, as it opens every training
example: llama.cpp strips one leading BOS text from a rendered template before tokenizing with
add_bos (common/chat.cpp), transformers tokenizes it as the special token.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from lora_cli.data.records import Example
from lora_cli.data.templates import PLACEHOLDER, TURN_SEPARATOR, ChatTemplate, TextTemplate
from lora_cli.errors import LoraCliError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

@dataclass(frozen=True)
class PromptShape:
    """A text template cut at its placeholders: prompt = head + user content + tail."""

    head: str
    tail: str
    separator: str | None  # between instruction and input in the user content; None: no {input} in the template
    input_optional: bool  # a blank input leaves `separator + input` out (alpaca)
    suffix: str  # text after the response, trained on like the response (template files)

    def content(self, instruction: str, input: str = "") -> str:
        """The user message for a record (see the module docstring)."""
        if self.separator is None or (self.input_optional and not input.strip()):
            return instruction
        return instruction + self.separator + input


def prompt_shape(template: TextTemplate) -> PromptShape:
    """The shape of a TextTemplate; LoraCliError for a layout no chat message can express."""
    parts = PLACEHOLDER.split(template.with_input)
    names = parts[1::2]
    where = f"The template {template.name}"
    if names.count("instruction") != 1 or names.count("input") > 1 or "output" in names:
        raise LoraCliError(f"{where} uses {{instruction}} {names.count('instruction')} times and {{input}} "
                           f"{names.count('input')} times before {{output}}; the export maps one instruction "
                           "and at most one input onto a chat message.", "Use --format gguf-lora, or `lora-cli merge`.")
    if names == ["input", "instruction"]:
        raise LoraCliError(f"{where} puts {{input}} before {{instruction}}; the export maps an instruction "
                           "followed by its input onto a chat message.", "Use --format gguf-lora, or `lora-cli merge`.")
    if len(names) == 1:
        return PromptShape(parts[0], parts[2], None, False, template.suffix)
    shape = PromptShape(parts[0], parts[4], parts[2], template.without_input is not None, template.suffix)
    if shape.input_optional and template.without_input != shape.head + "{instruction}" + shape.tail:
        raise LoraCliError(f"{where}'s prompt without an input is not its prompt with the Input block removed.")
    return shape


def user_content(template: TextTemplate | ChatTemplate, instruction: str, input: str = "") -> str:
    """The user message that makes the exported templates render a record's training prompt."""
    if isinstance(template, ChatTemplate):
        return ChatTemplate._messages(Example(0, instruction, input, ""))[0]["content"]
    return prompt_shape(template).content(instruction, input)


def describe_mapping(template: TextTemplate | ChatTemplate) -> str:
    """One line for users: what to send as the user message (the prompt) for an instruction and input."""
    if isinstance(template, ChatTemplate):
        return f"the instruction, or the instruction + {TURN_SEPARATOR!r} + the input (the tokenizer's chat template)"
    shape = prompt_shape(template)
    if shape.separator is None:
        return "the instruction (this template has no input)"
    if shape.input_optional:
        return f"the instruction, or the instruction + {shape.separator!r} + the input"
    return f"the instruction + {shape.separator!r} + the input (always, even when the input is empty)"


def jinja_string(text: str) -> str:
    """A Jinja string literal (double-quoted) whose value is `text`; llama.cpp's minja reads it the same."""
    escaped = text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n").replace("\r", "\\r")
    return '"' + escaped.replace("\t", "\\t") + '"'


def text_chat_template(shape: PromptShape, prefix: str, eos: str) -> str:
    """A Jinja chat template rendering conversations exactly as lora-cli renders them for training.

    `prefix`: the text of the tokens training puts in front of every example (a BOS, or "");
    `eos`: the text of the eos appended after every answer ("" when training appended none).
    All literal text sits in string literals, so the runtimes' trim_blocks / lstrip_blocks and
    braces in a template file cannot change it.
    """
    sep, lit = jinja_string(TURN_SEPARATOR), jinja_string
    opener = f'({sep} if ns.turns else ((ns.system + {sep}) if ns.system else ""))'
    prompt = f"{opener} + {lit(shape.head)} + ns.user + {lit(shape.tail)}"
    return "".join([
        '{%- set ns = namespace(system="", n_system=0, user="", n_user=0, turns=0) -%}',
        '{%- for message in messages -%}{%- if message["role"] == "system" -%}',
        f'{{%- set ns.system = ns.system + ({sep} if ns.n_system else "") + message["content"] -%}}',
        '{%- set ns.n_system = ns.n_system + 1 -%}{%- endif -%}{%- endfor -%}',
        f"{{{{- {lit(prefix)} -}}}}" if prefix else "",
        '{%- for message in messages -%}{%- if message["role"] == "user" -%}',
        f'{{%- set ns.user = ns.user + ({sep} if ns.n_user else "") + message["content"] -%}}',
        '{%- set ns.n_user = ns.n_user + 1 -%}',
        '{%- elif message["role"] != "system" -%}',
        f'{{{{- {prompt} + message["content"] + {lit(shape.suffix + eos)} -}}}}',
        '{%- set ns.user = "" -%}{%- set ns.n_user = 0 -%}{%- set ns.turns = ns.turns + 1 -%}',
        '{%- endif -%}{%- endfor -%}',
        f"{{%- if add_generation_prompt -%}}{{{{- {prompt} -}}}}{{%- endif -%}}",
    ])


def training_chat_template(template: TextTemplate | ChatTemplate, tokenizer: PreTrainedTokenizerBase,
                           add_eos: bool) -> str:
    """The chat template that renders conversations as training rendered them, for `tokenizer` (for the
    GGUF metadata and a merged model): the tokenizer's own for `chat`, else the text template's.

    `add_eos`: training appended the eos after answers. transformers' apply_chat_template(tokenize=True)
    of the result gives training's tokens (the BOS included once). For `chat`, the tokens training puts
    in front (a BOS) open the template, since training put them before the template's text: llama.cpp
    strips one leading BOS text and adds the BOS token itself. A template that writes its BOS itself
    (`{{ bos_token }}`) is kept as it is: training did not add a second one either (tokenization.with_prefix).
    Errors: LoraCliError for a text template whose layout no chat message can express (prompt_shape),
    or `chat` without a template.
    """
    from lora_cli.data.tokenization import special_prefix

    prefix = tokenizer.decode(special_prefix(tokenizer), skip_special_tokens=False)
    if isinstance(template, ChatTemplate):
        ChatTemplate.check(tokenizer)
        if prefix and not ChatTemplate.opens_with(tokenizer, prefix):
            return f"{{{{ {jinja_string(prefix)} }}}}" + tokenizer.chat_template
        return tokenizer.chat_template
    return text_chat_template(prompt_shape(template), prefix, tokenizer.eos_token if add_eos else "")
