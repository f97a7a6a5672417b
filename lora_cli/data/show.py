"""Which tokens are trained: tokenized examples as the model sees them, cut into spans.

`tokenize --show N` renders the first N examples of the tokenized training split (the cache
entry, truncation included) so a user can check that the labels sit on the response only and
that the eos is where they expect it. A span is a run of consecutive tokens that are all trained
or all not; an eos token is a span of its own, so it can be marked wherever it is (the one closing
a response is trained; a chat template's turn ends inside the prompt are not).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from lora_cli.model.loss import IGNORE

if TYPE_CHECKING:
    from datasets import Dataset
    from transformers import PreTrainedTokenizerBase


@dataclass(frozen=True)
class Span:
    text: str  # the tokens decoded (special tokens written out)
    trained: bool  # the tokens carry labels: the loss is computed on them
    eos: bool  # the span is the eos token


@dataclass(frozen=True)
class ShownExample:
    line: int  # line of the record in the data file
    tokens: int
    trained_tokens: int
    spans: list[Span]


def spans_of(input_ids: list[int], labels: list[int], tokenizer: PreTrainedTokenizerBase) -> list[Span]:
    """Consecutive tokens grouped by (trained, eos). The first token is never trained: nothing predicts it."""
    eos = tokenizer.eos_token_id
    groups: list[tuple[bool, bool, list[int]]] = []
    for i, (token, label) in enumerate(zip(input_ids, labels)):
        key = (i > 0 and label != IGNORE, token == eos)
        if groups and groups[-1][:2] == key and not key[1]:
            groups[-1][2].append(token)
        else:
            groups.append((key[0], key[1], [token]))
    return [Span(tokenizer.decode(ids, skip_special_tokens=False), trained, is_eos) for trained, is_eos, ids in groups]


def show_examples(dataset: Dataset, tokenizer: PreTrainedTokenizerBase, n: int) -> list[ShownExample]:
    """The first `n` rows of a tokenized split (datasets.Dataset with input_ids, labels, line) as spans."""
    return [ShownExample(int(row["line"]), len(row["input_ids"]),
                         sum(label != IGNORE for label in row["labels"][1:]),  # the first token is never trained
                         spans_of(row["input_ids"], row["labels"], tokenizer))
            for row in dataset.select(range(min(n, len(dataset))))]
