"""Examples -> input_ids and labels, in batches through the fast tokenizer.

Each template segment is tokenized on its own and the pieces are concatenated: the prompt
the model sees at generation time is then token-for-token the prompt it was trained on.
Labels are -100 on prompt segments unless `train_on_prompt`; an eos id closes every trained
segment (unless it already ends with one), decided by our own mask and never by comparing
with the pad id, since pad == eos on Qwen and SmolLM2. Every example opens with the tokenizer's
BOS exactly once: added in front, unless the template wrote it (`with_prefix`), so a chat record
is the token sequence of `apply_chat_template(messages, tokenize=True)`.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from lora_cli.data.records import Example, Issue
from lora_cli.errors import LoraCliError
from lora_cli.model.loss import IGNORE

if TYPE_CHECKING:
    from collections.abc import Callable

    from transformers import PreTrainedTokenizerBase

    from lora_cli.data.templates import ChatTemplate, TextTemplate


@dataclass(frozen=True)
class LabelPolicy:
    max_length: int = 512
    train_on_prompt: bool = False
    add_eos: bool = True


@dataclass
class Encoded:
    input_ids: list[int]
    labels: list[int]
    line: int
    truncated: bool

    @property
    def n_targets(self) -> int:
        # label[0] is never predicted (no token before it), as in the shifted loss
        return sum(1 for x in self.labels[1:] if x != IGNORE)


def special_prefix(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """Ids the tokenizer adds in front of a text (a BOS for Llama-style tokenizers, none for Qwen)."""
    with_special = tokenizer("x", add_special_tokens=True)["input_ids"]
    plain = tokenizer("x", add_special_tokens=False)["input_ids"]
    return list(with_special[: len(with_special) - len(plain)]) if with_special[-len(plain):] == plain else []


def with_prefix(prefix: list[int], ids: list[int]) -> list[int]:
    """`ids` opened by the tokenizer's special prefix exactly once: prepended, unless the rendered text
    already opens with it.

    Chat templates of Llama 3, Gemma, Mistral and DeepSeek write `{{ bos_token }}` themselves, and
    apply_chat_template(tokenize=True) does not add another; prepending the tokenizer's BOS there
    would train (and prompt) every example with two. Templates that leave the BOS to the tokenizer
    (TinyLlama's, a template file) still get the one the tokenizer adds to every text.
    """
    return list(ids) if prefix and ids[: len(prefix)] == prefix else [*prefix, *ids]


def _joined(segs: list[tuple[str, bool | None]], ids: list[list[int]], prefix: list[int], eos: int | None,
            policy: LabelPolicy) -> tuple[list[int], list[int]]:
    """(input_ids, labels) of segments whose texts tokenized to `ids`: each closed by its eos, labels
    on the trained ones (on all with train_on_prompt), the special prefix in front, untruncated.

    The eos closes a response (trained, or UNTRAINED: a turn of weight 0) unless it ends with one already:
    the one rule for training and for the prompts of generation."""
    input_ids, labels = [], []
    for (_, trainable), piece in zip(segs, ids):
        if trainable is not False and policy.add_eos and eos is not None and (not piece or piece[-1] != eos):
            piece = [*piece, eos]
        input_ids.extend(piece)
        labels.extend(piece if (trainable or policy.train_on_prompt) else [IGNORE] * len(piece))
    opened = with_prefix(prefix, input_ids)
    return opened, [IGNORE] * (len(opened) - len(input_ids)) + labels


def encode_batch(examples: list[Example], tokenizer: PreTrainedTokenizerBase, template: TextTemplate | ChatTemplate,
                 policy: LabelPolicy) -> list[Encoded]:
    """Encode many examples with one tokenizer call over all of their segments."""
    per_example = [template.segments(ex, tokenizer) for ex in examples]
    texts = [text for segs in per_example for text, _ in segs]
    ids = iter(tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else [])
    prefix, eos, n = special_prefix(tokenizer), tokenizer.eos_token_id, policy.max_length
    joined = (_joined(segs, [next(ids) for _ in segs], prefix, eos, policy) for segs in per_example)
    return [Encoded(input_ids[:n], labels[:n], example.line, truncated=len(input_ids) > n)
            for example, (input_ids, labels) in zip(examples, joined)]


def encode_prompt(messages: list[dict], tokenizer: PreTrainedTokenizerBase, template: TextTemplate | ChatTemplate,
                  add_eos: bool = True) -> list[int]:
    """Token ids of the prompt for the next assistant turn, exactly as training renders it."""
    return encode_example_prompt(Example(0, messages=[*messages, {"role": "assistant", "content": ""}]), tokenizer,
                                 template, add_eos)


def encode_example_prompt(example: Example, tokenizer: PreTrainedTokenizerBase, template: TextTemplate | ChatTemplate,
                          add_eos: bool = True) -> list[int]:
    """Token ids of the prompt for a record's last response: training's input_ids up to that response.

    What generation and the stop rate start from; an instruction record keeps its Input block,
    system prompt and history.
    """
    last = {"role": "assistant", "content": ""}  # the response left blank: only the prompt before it is kept
    blank = (replace(example, messages=[*(example.messages or [])[:-1], last]) if example.is_chat else
             replace(example, output=""))
    segs = template.segments(blank, tokenizer)[:-1]
    ids = tokenizer([text for text, _ in segs], add_special_tokens=False)["input_ids"] if segs else []
    return _joined(segs, ids, special_prefix(tokenizer), tokenizer.eos_token_id, LabelPolicy(add_eos=add_eos))[0]


def template_issues(examples: list[Example], tokenizer: PreTrainedTokenizerBase, template: TextTemplate | ChatTemplate,
                    file: str) -> list[Issue]:
    """An Issue for each record the template cannot render, as training and as a prompt (a model's
    chat template refuses a conversation that opens with the assistant, say); [] when all render.

    What generation and scoring check before they use records that training never filtered."""
    return apply_or_reject(examples, lambda batch: [(template.segments(ex, tokenizer), encode_example_prompt(
        ex, tokenizer, template)) for ex in batch], file)[1]


def check_system_message(system: str, tokenizer: PreTrainedTokenizerBase, template: TextTemplate | ChatTemplate,
                         flag: str = "--system") -> None:
    """LoraCliError (one line naming `flag`) when the template cannot render a conversation that opens
    with this system message, as Gemma's chat template refuses any; asked before a model loads."""
    conversation = [{"role": "system", "content": system}, {"role": "user", "content": "hello"}]
    try:
        encode_prompt(conversation, tokenizer, template)
    except LoraCliError:
        raise
    except Exception as exc:  # the template's own raise_exception (jinja2 TemplateError), whatever its words
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        which = "this model's chat template" if template.name == "chat" else f"the template {template.name}"
        raise LoraCliError(f"{flag}: {which} cannot render a system message ({reason}).",
                           f"Leave out {flag} and put the instruction in your first message.") from None


def reference_answer(example: Example) -> str:
    """The record's own answer (its output, or its last assistant message)."""
    return (example.messages or [{}])[-1].get("content", "") if example.is_chat else example.output


@dataclass(frozen=True)
class TokenCount:
    """One example's untruncated token count and where its first trained token sits."""

    line: int
    length: int
    first_target: int  # index of the first labelled token that is predicted (len(input_ids) if none)

    def left_out(self, max_length: int) -> bool:
        """True when truncation at max_length keeps no trained token: the example is left out."""
        return self.first_target >= max_length

    def loses_eos(self, max_length: int) -> bool:
        """True when truncation at max_length keeps a trained token but cuts the end, the eos with it."""
        return self.length > max_length and not self.left_out(max_length)


def token_counts(examples: list[Example], tokenizer: PreTrainedTokenizerBase, template: TextTemplate | ChatTemplate,
                 policy: LabelPolicy = LabelPolicy()) -> list[TokenCount]:
    """TokenCount per example under `policy`'s labels (untruncated: prompt + response + eos), for
    validate-data's statistics and the context an export check needs."""
    untruncated = LabelPolicy(2**31 - 1, policy.train_on_prompt, policy.add_eos)
    return [TokenCount(enc.line, len(enc.input_ids),
                       next((i for i in range(1, len(enc.labels)) if enc.labels[i] != IGNORE), len(enc.labels)))
            for enc in encode_batch(examples, tokenizer, template, untruncated)]


def _where(count: int, lines: list[int]) -> str:
    """' (lines 3, 9 and 12 more)': the first ten of `lines`, of `count` examples ('' without lines)."""
    more = f" and {count - len(lines[:10]):,} more" if count > len(lines[:10]) else ""
    return f" (line{'s' if count > 1 else ''} {', '.join(str(n) for n in lines[:10])}{more})" if lines else ""


def left_out_note(count: int, lines: list[int], max_length: int, split: str = "", purpose: str = "train on") -> str:
    """The one sentence every command that tokenizes says about examples truncation leaves empty."""
    return (f"{count:,} {split + ' ' if split else ''}example(s) left out: the prompt fills --max-length "
            f"({max_length} tokens), so no response token is left to {purpose}{_where(count, lines)}. "
            "Raise --max-length or shorten those prompts.")


def lost_eos_note(count: int, lines: list[int], max_length: int, split: str = "") -> str:
    """The sentence tokenize and train say about examples whose answer --max-length cut before its eos."""
    return (f"{count:,} {split + ' ' if split else ''}example(s) cut by --max-length ({max_length} tokens) before "
            f"the end of the answer{_where(count, lines)}: they train without their eos, teaching the model not to "
            "stop there. Raise --max-length or shorten those answers.")


def apply_or_reject(examples: list[Example], fn: Callable[[list[Example]], list],
                    file: str) -> tuple[list, list[Issue]]:
    """`fn(examples)` for a batch; if it fails, retry one record at a time and turn each record it
    fails on into an Issue, so one bad record never stops the batch with a traceback.

    A model's chat template can refuse records that are valid JSON (many raise "roles must
    alternate user/assistant"); that is a defect of the record under this template, reported on
    its line. A LoraCliError is about the setup, not a record, and propagates as it is.
    """
    try:
        return list(fn(examples)), []
    except LoraCliError:
        raise
    except Exception:
        pass
    results, issues = [], []
    for example in examples:
        try:
            results.extend(fn([example]))
        except LoraCliError:
            raise
        except Exception as exc:
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            issues.append(Issue(file, example.line, "", f"the template cannot render this record: {reason}"))
    return results, issues
