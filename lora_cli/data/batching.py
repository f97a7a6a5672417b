"""Turn tokenized examples into micro-batches: packed (the fast default) or padded (the seed's).

Packed: examples in shuffled order are laid end to end in one row of at most `max_tokens`
tokens, each with its own position_ids starting at 0. With no attention mask, transformers
builds a block-causal mask from those position_ids, so every example attends only to itself
and sees the same loss it would alone; no compute is spent on padding.
Padded: `batch_size` examples per micro-batch, right-padded to the longest, as the reference
recipe's collator does.

Targets are shifted per example here (targets[t] = labels[t+1], -100 at each example's last
token), so the loss needs no shift and never predicts one example's first token from the
previous example's last.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from lora_cli.model.loss import IGNORE

if TYPE_CHECKING:
    import torch
    from datasets import Dataset

PAD_MULTIPLE = 64  # packed rows are padded to a multiple of this: fewer distinct shapes for kernels


@dataclass
class MicroBatch:
    input_ids: torch.Tensor  # LongTensor [B, L]
    targets: torch.Tensor  # LongTensor [B, L], -100 where no loss
    attention_mask: torch.Tensor | None
    position_ids: torch.Tensor | None
    n_targets: int
    n_real: int  # tokens that belong to examples
    target_index: torch.Tensor | None = None  # flat positions with a target: the loss needs no device sync to find them

    def __post_init__(self) -> None:
        if self.target_index is None:
            self.target_index = (self.targets.reshape(-1) != IGNORE).nonzero().squeeze(1)

    def to(self, device: torch.device | str) -> MicroBatch:
        cuda = getattr(device, "type", str(device)).startswith("cuda")

        def move(t: torch.Tensor | None) -> torch.Tensor | None:
            return t if t is None else t.pin_memory().to(device, non_blocking=True) if cuda else t.to(device)

        return MicroBatch(move(self.input_ids), move(self.targets), move(self.attention_mask), move(self.position_ids),
                          self.n_targets, self.n_real, move(self.target_index))

    def loss_args(self) -> tuple[Any, ...]:
        """Arguments of the loss module (see loss.make_loss_module)."""
        return (self.input_ids, self.targets, self.attention_mask, self.position_ids, self.target_index,
                self.n_targets)


def epoch_order(n: int, seed: int, epoch: int, shuffle: bool = True) -> list[int]:
    """A permutation that depends only on (seed, epoch): resuming reproduces it exactly."""
    import torch

    if not shuffle:
        return list(range(n))
    g = torch.Generator().manual_seed(seed * 1000003 + epoch)
    return torch.randperm(n, generator=g).tolist()


def _first_fit(lengths: list[int], order: list[int], max_tokens: int, row_tokens: int = 0
               ) -> Iterator[tuple[list[int], list[list[int]]]]:
    """Yield (micro-batch, its rows): examples placed in the first row they fit, in order.

    A micro-batch is at most max_tokens // row_tokens rows of at most `row_tokens` tokens (0: one
    row of max_tokens), and at most `max_tokens` tokens in all (rows may be longer than that when
    an example is: a micro-batch of ~4 examples in one row as long as the longest example).
    Deterministic, so collate can rebuild the rows of a planned micro-batch exactly.
    """
    row_tokens = row_tokens or max_tokens
    rows = max(1, max_tokens // row_tokens)
    batch, placed, total = [], [], 0  # placed: [[indices], used]
    for i in order:
        n = lengths[i]
        target = next((r for r in placed if r[1] + n <= row_tokens), None)
        if batch and ((target is None and len(placed) >= rows) or total + n > max_tokens):
            yield batch, [r[0] for r in placed]
            batch, placed, total = [], [], 0
            target = None
        if target is None:
            target = [[], 0]
            placed.append(target)
        target[0].append(i)
        target[1] += n
        total += n
        batch.append(i)
    if batch:
        yield batch, [r[0] for r in placed]


def plan_packed(order: list[int], lengths: list[int], max_tokens: int, row_tokens: int = 0) -> list[list[int]]:
    """Micro-batches of about max_tokens tokens, in rows of row_tokens (0: one row).

    An example longer than a row gets a row of its own (it is never cut here: the tokenizer
    already truncated it at --max-length).
    """
    return [batch for batch, _ in _first_fit(lengths, order, max_tokens, row_tokens)]


def _shifted(labels: list[int]) -> list[int]:
    return list(labels[1:]) + [IGNORE]


def collate_packed(rows: list[dict] | list[list[dict]], pad_id: int, max_tokens: int, static_rows: int = 0) -> MicroBatch:
    """One micro-batch of packed rows; `rows` is a list of examples (one row) or a list of rows.

    static_rows > 0: always that many rows of exactly max_tokens tokens (empty rows are padding),
    so a compiled model sees one shape for the whole run and never recompiles.
    """
    import torch

    built = [([t for r in row for t in r["input_ids"]], [t for r in row for t in _shifted(list(r["labels"]))],
              [p for r in row for p in range(len(r["input_ids"]))])  # (ids, targets, positions) of a row, unpadded
             for row in (rows if rows and isinstance(rows[0], list) else [rows])]
    built += [([], [], [])] * max(0, static_rows - len(built))
    longest = max(len(b[0]) for b in built)
    width = max(max_tokens if static_rows else min(-(-longest // PAD_MULTIPLE) * PAD_MULTIPLE, max_tokens), longest)
    # padding is a separate "sequence" with its own positions: it attends only to itself
    padded = [(ids + [pad_id] * extra, tgt + [IGNORE] * extra, pos + list(range(extra)))
              for ids, tgt, pos in built for extra in [width - len(ids)]]
    ids_t, tgt_t, pos_t = (torch.tensor(v, dtype=torch.long) for v in zip(*padded))
    return MicroBatch(ids_t, tgt_t, None, pos_t, int((tgt_t != IGNORE).sum()), sum(len(b[0]) for b in built))


def collate_padded(rows: list[dict], pad_id: int, static_rows: int = 0) -> MicroBatch:
    """Right-padded rows and an attention mask, as the reference recipe's collator makes them.

    static_rows > 0: that many rows (the last micro-batch filled with padding rows) and a width
    rounded up to a multiple of PAD_MULTIPLE, so a compiled model sees a few shapes only.
    """
    import torch

    width = max(len(r["input_ids"]) for r in rows)
    n_rows = max(len(rows), static_rows)
    if static_rows:
        width = -(-width // PAD_MULTIPLE) * PAD_MULTIPLE
    ids = torch.full((n_rows, width), pad_id, dtype=torch.long)
    tgt = torch.full((n_rows, width), IGNORE, dtype=torch.long)
    mask = torch.zeros((n_rows, width), dtype=torch.long)
    for b, r in enumerate(rows):
        x = list(r["input_ids"])
        ids[b, : len(x)] = torch.tensor(x)
        tgt[b, : len(x)] = torch.tensor(_shifted(list(r["labels"])))
        mask[b, : len(x)] = 1
    return MicroBatch(ids, tgt, mask, None, int((tgt != IGNORE).sum()), int(mask.sum()))


@dataclass
class Batcher:
    """Plans and collates micro-batches for one dataset split."""

    dataset: Dataset  # with input_ids, labels, length, n_targets
    packed: bool
    batch_size: int
    max_tokens: int
    pad_id: int
    seed: int = 0
    row_tokens: int = 0  # packed row length; 0: one row of max_tokens
    static: bool = False  # every micro-batch of one shape (compiled models): see collate_packed / collate_padded

    def __post_init__(self) -> None:
        self.lengths = list(self.dataset["length"])
        self.targets = list(self.dataset["n_targets"])

    def n_targets(self, indices: list[int]) -> int:
        return sum(self.targets[i] for i in indices)

    def plan(self, epoch: int, shuffle: bool = True) -> list[list[int]]:
        order = epoch_order(len(self.lengths), self.seed, epoch, shuffle)
        if self.packed:
            return plan_packed(order, self.lengths, self.max_tokens, self.row_tokens)
        return [order[i:i + self.batch_size] for i in range(0, len(order), self.batch_size)]

    def collate(self, indices: list[int]) -> MicroBatch:
        data = self.dataset[indices]
        by_index = {i: {"input_ids": a, "labels": b} for i, a, b in zip(indices, data["input_ids"], data["labels"])}
        if self.packed:
            row_len = self.row_tokens or self.max_tokens
            (_, rows), = _first_fit(self.lengths, indices, self.max_tokens, row_len)  # the planned micro-batch
            static_rows = max(1, self.max_tokens // row_len) if self.static else 0
            return collate_packed([[by_index[i] for i in row] for row in rows], self.pad_id, row_len, static_rows)
        return collate_padded([by_index[i] for i in indices], self.pad_id, self.batch_size if self.static else 0)


class StepPlan:
    """A split's micro-batches per epoch, grouped into optimizer steps of `per_step` micro-batches.

    Each epoch has its own shuffled (and so its own packed) plan. Counting the run's steps plans
    every epoch once and keeps the first two; training walks the epochs in order and drops the
    plans behind it, so memory does not grow with the number of epochs.
    """

    KEEP: int = 2

    def __init__(self, batcher: Batcher, per_step: int):
        self.batcher, self.per_step = batcher, per_step
        self._plans: dict[int, list[list[int]]] = {}
        self._counts: dict[int, int] = {}

    def _plan(self, epoch: int) -> list[list[int]]:
        plan = self.batcher.plan(epoch)
        self._counts[epoch] = len(plan)
        return plan

    def micro_batches(self, epoch: int) -> list[list[int]]:
        if epoch not in self._plans:
            self._plans[epoch] = self._plan(epoch)
        for old in [e for e in self._plans if e < epoch]:
            del self._plans[old]
        return self._plans[epoch]

    def steps_in(self, epoch: int) -> int:
        if epoch not in self._counts:
            plan = self._plan(epoch)
            if len(self._plans) < self.KEEP:
                self._plans[epoch] = plan
        return -(-self._counts[epoch] // self.per_step)

    def step(self, epoch: int, index: int) -> list[list[int]]:
        """The micro-batches of optimizer step `index` (0-based) of `epoch`, over all processes."""
        return self.micro_batches(epoch)[index * self.per_step:(index + 1) * self.per_step]
