"""Prompt templates: how a record becomes text, and which parts of it the loss sees.

A template turns an example into *segments*, `(text, trainable)` pairs. Tokenization
tokenizes each segment and masks the labels of non-trainable ones, so "loss on the response
only" is a property of the segments, not of string offsets. Generation renders the same
prompt text, so an adapter is always prompted exactly as it was trained.

Built in: `alpaca` (the reference template; the Input block left out when the input is
empty, as the original Alpaca release does), `alpaca-seed` (the reference recipe verbatim,
empty Input block kept), `chat` (the tokenizer's own chat template). Anything else is read as
a template file with {instruction}, {input} and {output} placeholders.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from lora_cli.data.records import Example
from lora_cli.errors import LoraCliError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

ALPACA_WITH_INPUT = "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
ALPACA_NO_INPUT = "### Instruction:\n{instruction}\n\n### Response:\n"
TURN_SEPARATOR = "\n\n"
PLACEHOLDER = re.compile(r"\{(instruction|input|output)\}")  # a text template's placeholders

# (text, trained): True for an answer the loss sees, False for prompt text, UNTRAINED for an answer
# the loss leaves out ("weight": 0), which is still closed by the eos like every answer
UNTRAINED = None
Segments = list[tuple[str, "bool | None"]]


def trained(message: dict) -> bool:
    """Whether an assistant message is trained on: all are, but one marked `"weight": 0` (axolotl's
    "do not train this turn"; records.py accepts only 0 or 1)."""
    return message.get("weight", 1) != 0


def _turns(example: Example) -> tuple[str, list[tuple[tuple[str, str], str, bool]]]:
    """(system text, [((user, input), assistant, trained), ...]) for either record shape. An
    instruction record's `history` turns come first, as a chat record's earlier turns would."""
    if not example.is_chat:
        earlier = [((user, ""), answer, True) for user, answer in example.history]
        return example.system, [*earlier, ((example.instruction, example.input), example.output, True)]
    system, turns, pending = [], [], []
    for msg in example.messages or []:
        if msg["role"] == "system":
            system.append(msg["content"])
        elif msg["role"] == "user":
            pending.append(msg["content"])
        else:
            turns.append(((TURN_SEPARATOR.join(pending), ""), msg["content"], trained(msg)))
            pending = []
    return TURN_SEPARATOR.join(system), turns


@dataclass
class TextTemplate:
    """An instruction template given as text: alpaca, alpaca-seed or a user's file."""

    name: str
    with_input: str
    without_input: str | None  # None: always use `with_input`, even for an empty input
    suffix: str = ""  # text after {output} (trained on, like the response)
    source: str | None = None  # a template file's whole text, as read (saved with the adapter)

    def identity(self) -> str:
        return f"text:{self.name}\n{self.with_input}\n--\n{self.without_input}\n--\n{self.suffix}"

    def check(self, tokenizer: PreTrainedTokenizerBase | None) -> None:
        """Whether this template can render with `tokenizer` (a text template always can)."""

    def prompt_text(self, instruction: str, input: str = "") -> str:
        use = self.with_input if (input.strip() or self.without_input is None) else self.without_input
        values = {"instruction": instruction, "input": input}
        return PLACEHOLDER.sub(lambda m: values.get(m.group(1), ""), use)  # one pass: braces in the data stay as they are

    def segments(self, example: Example, tokenizer: PreTrainedTokenizerBase | None = None) -> Segments:
        system, turns = _turns(example)
        out: Segments = []
        for i, ((instruction, input), answer, learn) in enumerate(turns):
            opener = TURN_SEPARATOR if i else (system + TURN_SEPARATOR if system else "")
            out.append((opener + self.prompt_text(instruction, input), False))
            out.append((answer + self.suffix, True if learn else UNTRAINED))
        return out


class ChatTemplate:
    """The tokenizer's own chat template; the loss sees assistant turns only."""

    name: str = "chat"

    def identity(self) -> str:
        return "chat"  # the template text itself is part of the tokenizer files' hash

    @staticmethod
    def check(tokenizer: PreTrainedTokenizerBase | None) -> None:
        """LoraCliError when `tokenizer` has no chat template (asked before any model loads)."""
        if tokenizer is None or not getattr(tokenizer, "chat_template", None):
            raise LoraCliError(
                "--template chat needs a tokenizer with a chat template, and this model's tokenizer has none.",
                "Use --template alpaca instead, or a template file.",
            )

    @staticmethod
    def opens_with(tokenizer: PreTrainedTokenizerBase, text: str) -> bool:
        """Whether the chat template itself writes `text` (a BOS) before a conversation."""
        try:
            rendered = tokenizer.apply_chat_template([{"role": "user", "content": "x"}], tokenize=False,
                                                     add_generation_prompt=True)
        except Exception:  # a template that refuses this conversation says so where it is used
            return False
        return isinstance(rendered, str) and rendered.startswith(text)

    @staticmethod
    def _messages(example: Example) -> list[dict]:
        """A chat record's messages; for an instruction record, the conversation it stands for."""
        if example.is_chat:
            return list(example.messages or [])
        messages = [{"role": "system", "content": example.system}] if example.system else []
        for user, answer in example.history:
            messages += [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]
        user = example.instruction + (TURN_SEPARATOR + example.input if example.input.strip() else "")
        return [*messages, {"role": "user", "content": user}, {"role": "assistant", "content": example.output}]

    def segments(self, example: Example, tokenizer: PreTrainedTokenizerBase | None = None) -> Segments:
        """Split the rendered conversation at each assistant turn by rendering its prefixes."""
        self.check(tokenizer)
        messages = self._messages(example)
        out: Segments = []
        done = ""
        for i, msg in enumerate(messages):
            if msg["role"] != "assistant":
                continue
            prompt = tokenizer.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True)
            full = tokenizer.apply_chat_template(messages[: i + 1], tokenize=False)
            if not (prompt.startswith(done) and full.startswith(prompt)):
                raise LoraCliError(
                    "This tokenizer's chat template does not render conversations incrementally, so assistant "
                    "turns cannot be located for response-only labels.",
                    "Use --template alpaca, or --train-on-prompt.",
                )
            answer = full[len(prompt):]
            trailing = answer[len(answer.rstrip()):]  # newline after the end-of-turn token: not learned
            out.append((prompt[len(done):], False))
            out.append((answer[: len(answer) - len(trailing)], True if trained(msg) else UNTRAINED))
            done = full[: len(full) - len(trailing)]
        return out


def template_from_text(text: str, name: str) -> TextTemplate:
    """A template file's text as a template; `name` (its path) names it in messages and the cache key."""
    found = PLACEHOLDER.findall(text)
    if found.count("output") != 1 or "instruction" not in found:
        raise LoraCliError(
            f"Template file {name} must contain {{instruction}} and exactly one {{output}} "
            "(and may contain {input}); the prompt is the text before {output}."
        )
    head, _, tail = text.partition("{output}")
    return TextTemplate(name=name, with_input=head, without_input=None, suffix=tail, source=text)


BUILTIN = {
    "alpaca": lambda: TextTemplate("alpaca", ALPACA_WITH_INPUT, ALPACA_NO_INPUT),
    "alpaca-seed": lambda: TextTemplate("alpaca-seed", ALPACA_WITH_INPUT, None),
    "chat": ChatTemplate,
}


def get_template(name: str) -> TextTemplate | ChatTemplate:
    """A built-in template by name, or a template file (LoraCliError for neither)."""
    if name in BUILTIN:
        return BUILTIN[name]()
    path = Path(name)
    if path.is_file():
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise LoraCliError(f"Cannot read template file {path}: {exc}.") from None
        return template_from_text(text, str(path))
    import difflib

    close = difflib.get_close_matches(name, list(BUILTIN), n=1)
    raise LoraCliError(
        f"Unknown template '{name}': not one of {', '.join(BUILTIN)} and not a file."
        + (f" Did you mean --template {close[0]}?" if close else ""),
        "A template file holds the prompt text with {instruction}, {input} and {output} placeholders.",
    )
