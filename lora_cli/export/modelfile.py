"""An Ollama Modelfile whose TEMPLATE renders the training prompt, in Ollama's Go-template syntax.

The TEMPLATE has the shape

    {{ if .System }}SYSTEM_OPEN{{ .System }}SYSTEM_CLOSE{{ end }}USER_OPEN{{ .Prompt }}GENERATION{{ .Response }}AFTER

and no `.Messages`, so Ollama runs it per turn in its legacy mode (template/template.go, Execute;
docs/EXPORT.md): AFTER closes every answered turn as training did (for a text template the suffix,
the eos and "\\n\\n"), and `.Prompt` is chat_template.py's user message. For the `chat` template the
pieces are found by rendering the tokenizer's Jinja template with marker strings, and checked by
rendering conversations both ways; a template that does not fit the shape is refused (use --format gguf).
"""

from __future__ import annotations

import json
import unicodedata
from dataclasses import dataclass

from lora_cli import __version__
from lora_cli.data.templates import TURN_SEPARATOR, ChatTemplate
from lora_cli.errors import LoraCliError
from lora_cli.data.chat_template import prompt_shape
from lora_cli.export.check_artifact import ollama_render

GREEDY_PARAMETERS = (("temperature", "0"), ("repeat_penalty", "1"))  # lora-cli generate's default: plain greedy
_U1, _U2, _R1, _SYS = "@@lora-cli-user-1@@", "@@lora-cli-user-2@@", "@@lora-cli-answer-1@@", "@@lora-cli-system@@"


@dataclass(frozen=True)
class OllamaShape:
    system_open: str
    system_close: str
    user_open: str
    generation: str  # between the prompt and the response
    after: str  # after the response of every answered turn
    default_system: str | None  # the template's system text when the conversation has none (Modelfile SYSTEM)

    def render(self, messages: list[dict]) -> str:
        """What Ollama's legacy Execute renders for `messages` with this shape's TEMPLATE (for checks)."""
        return ollama_render(go_template(self), messages, self.default_system)


def text_shape(template, eos: str) -> OllamaShape:
    """The shape for alpaca, alpaca-seed or a template file (see the module docstring)."""
    shape = prompt_shape(template)
    return OllamaShape("", TURN_SEPARATOR, shape.head, shape.tail, shape.suffix + eos + TURN_SEPARATOR, None)


def _cut(text: str, marker: str, what: str) -> tuple[str, str]:
    if text.count(marker) != 1:
        raise _unfit(f"the {what} does not appear exactly once in what it renders")
    before, _, after = text.partition(marker)
    return before, after


def _unfit(why: str) -> LoraCliError:
    return LoraCliError(f"This tokenizer's chat template cannot be written as an Ollama TEMPLATE: {why}.",
                        "Use --format gguf: its metadata carries the tokenizer's own chat template, which "
                        "llama.cpp applies (and `ollama create` can be given a TEMPLATE of your own).")


def chat_shape(tokenizer, eos: str, add_eos: bool) -> OllamaShape:
    """The shape of the tokenizer's Jinja chat template, found with marker strings and checked."""
    ChatTemplate.check(tokenizer)

    def render(messages, gen):
        try:
            return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)
        except Exception as exc:  # e.g. a template that raises on a system message
            raise _unfit(f"rendering {[m['role'] for m in messages]} failed ({type(exc).__name__}: {exc})") from None

    user1, user2 = {"role": "user", "content": _U1}, {"role": "user", "content": _U2}
    answer, system = {"role": "assistant", "content": _R1}, {"role": "system", "content": _SYS}
    first, generation = _cut(render([user1], True), _U1, "user message")
    with_system = render([system, user1], True)
    sys_open, rest = _cut(with_system, _SYS, "system message")
    sys_then_user, gen2 = _cut(rest, _U1, "user message")
    answered = render([user1, answer], False)
    two_turns = render([user1, answer, user2], True)
    if gen2 != generation or not answered.startswith(first + _U1 + generation + _R1):
        raise _unfit("the generation prompt is not the start of the answered conversation")
    after = answered[len(first + _U1 + generation + _R1):]
    user_open, gen3 = _cut(two_turns[len(answered):], _U2, "second user message") if two_turns.startswith(
        answered) else (None, None)
    if user_open is None or gen3 != generation or not sys_then_user.endswith(user_open):
        raise _unfit("a second turn does not continue the first one as a first turn begins")
    sys_close = sys_then_user[: len(sys_then_user) - len(user_open)]
    default = None
    if first != user_open:
        if not (first.startswith(sys_open) and first.endswith(sys_close + user_open)):
            raise _unfit("its text before the first user message is neither a user turn nor a default system message")
        default = first[len(sys_open): len(first) - len(sys_close + user_open)]
    shape = OllamaShape(sys_open, sys_close, user_open, generation, after, default)
    for messages in ([user1], [system, user1], [user1, answer, user2], [system, user1, answer, user2]):
        if shape.render(messages) != render(messages, True):
            raise _unfit(f"it renders {[m['role'] for m in messages]} differently from a per-turn template")
    stripped = after.rstrip()
    if add_eos and eos and not (_R1 + stripped).endswith(eos):  # training appended the eos after the turn's end
        shape = OllamaShape(sys_open, sys_close, user_open, generation, stripped + eos + after[len(stripped):], default)
    return shape


def stop_strings(template, shape: OllamaShape, eos_texts: list[str]) -> list[str]:
    """The training eos (and the model's other end tokens), then the template's end-of-turn markers."""
    # a chat turn's end, and the next turn's start (e.g. "### Instruction:": the model starting a new turn)
    markers = ([shape.after.strip()] if isinstance(template, ChatTemplate) else []) + [shape.user_open.strip()]
    stops = [text for i, text in enumerate(eos_texts) if text and text not in eos_texts[:i]]
    for text in (m.splitlines()[0].strip() for m in markers if m):
        if text and text not in stops and '"""' not in text and all(_printable(c) for c in text):
            stops.append(text)  # a marker a Modelfile cannot quote is left out: the eos is what matters
    return stops


def _printable(ch: str) -> bool:
    """Characters the Modelfile parser keeps (Go's strconv.IsPrint), plus the whitespace it handles itself."""
    return ch in "\n\t\r " or unicodedata.category(ch)[0] in "LMNPS"


def go_string(text: str) -> str:
    """A Go interpreted string literal whose value is `text`: JSON's escapes are Go's; braces (no "{{" or "}}"
    even inside the literal) and what the Modelfile parser would drop become \\u escapes."""
    return "".join(ch if _printable(ch) and ch not in "{}" else f"\\u{ord(ch):04x}" if ord(ch) <= 0xFFFF
                   else f"\\U{ord(ch):08x}" for ch in json.dumps(text, ensure_ascii=False))


def go_literal(text: str) -> str:
    """Template text for `text`: as is, or as a string action when it holds "{{", '\"\"\"' or unprintable characters."""
    if text and ("{{" in text or text.endswith("{") or '"""' in text or not all(_printable(c) for c in text)):
        return "{{ " + go_string(text) + " }}"
    return text


def go_template(shape: OllamaShape) -> str:
    lit = go_literal
    return (f"{{{{ if .System }}}}{lit(shape.system_open)}{{{{ .System }}}}{lit(shape.system_close)}{{{{ end }}}}"
            f"{lit(shape.user_open)}{{{{ .Prompt }}}}{lit(shape.generation)}{{{{ .Response }}}}{lit(shape.after)}")


def _quoted(value: str) -> str:
    if '"""' in value or not all(_printable(c) for c in value):
        raise LoraCliError(f"The text {value[:60]!r} cannot be written into a Modelfile (it holds '\"\"\"' or "
                           "characters Ollama's Modelfile parser drops).", "Use --format gguf.")
    return f'"""{value}"""' if ("\n" in value or '"' in value or value != value.strip()) else f'"{value}"'


def modelfile_text(gguf_name: str, shape: OllamaShape, stops: list[str], notes: list[str]) -> str:
    """The Modelfile: FROM the GGUF beside it, TEMPLATE, SYSTEM (a default system text), stops, greedy."""
    lines = [f"# Modelfile written by lora-cli {__version__} (lora-cli export --format ollama)."]
    lines += [f"# {note}" for note in notes]
    lines += [f"FROM ./{gguf_name}", f'TEMPLATE """{go_template(shape)}"""']
    if shape.default_system is not None:
        lines.append(f"SYSTEM {_quoted(shape.default_system)}")
    lines += [f"PARAMETER stop {_quoted(s)}" for s in stops]
    lines += [f"PARAMETER {name} {value}" for name, value in GREEDY_PARAMETERS]
    return "\n".join(lines) + "\n"
