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

from dataclasses import dataclass

IGNORE = -100
PAD_MULTIPLE = 64  # packed rows are padded to a multiple of this: fewer distinct shapes for kernels


@dataclass
class MicroBatch:
    input_ids: object  # LongTensor [B, L]
    targets: object  # LongTensor [B, L], -100 where no loss
    attention_mask: object | None
    position_ids: object | None
    n_targets: int
    n_real: int  # tokens that belong to examples
    n_padded: int  # tokens processed, padding included

    def to(self, device) -> "MicroBatch":
        move = lambda t: None if t is None else t.to(device, non_blocking=True)  # noqa: E731
        return MicroBatch(move(self.input_ids), move(self.targets), move(self.attention_mask),
                          move(self.position_ids), self.n_targets, self.n_real, self.n_padded)

    def model_inputs(self) -> dict:
        out = {"input_ids": self.input_ids}
        if self.attention_mask is not None:
            out["attention_mask"] = self.attention_mask
        if self.position_ids is not None:
            out["position_ids"] = self.position_ids
        return out


def epoch_order(n: int, seed: int, epoch: int, shuffle: bool = True) -> list[int]:
    """A permutation that depends only on (seed, epoch): resuming reproduces it exactly."""
    import torch

    if not shuffle:
        return list(range(n))
    g = torch.Generator().manual_seed(seed * 1000003 + epoch)
    return torch.randperm(n, generator=g).tolist()


def plan_packed(order: list[int], lengths: list[int], max_tokens: int) -> list[list[int]]:
    """Greedy, order-preserving packing into rows of at most max_tokens tokens.

    An example longer than the budget gets a row of its own (it is never cut here: the
    tokenizer already truncated it at --max-length).
    """
    rows, row, used = [], [], 0
    for i in order:
        n = lengths[i]
        if row and used + n > max_tokens:
            rows.append(row)
            row, used = [], 0
        row.append(i)
        used += n
    if row:
        rows.append(row)
    return rows


def plan_padded(order: list[int], batch_size: int) -> list[list[int]]:
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


def _shifted(labels: list[int]) -> list[int]:
    return list(labels[1:]) + [IGNORE]


def collate_packed(rows: list[dict], pad_id: int, max_tokens: int) -> MicroBatch:
    import torch

    ids, tgt, pos = [], [], []
    for r in rows:
        x = list(r["input_ids"])
        ids.extend(x)
        tgt.extend(_shifted(list(r["labels"])))
        pos.extend(range(len(x)))
    n_real = len(ids)
    padded = max(min(-(-n_real // PAD_MULTIPLE) * PAD_MULTIPLE, max_tokens), n_real)
    extra = padded - n_real
    if extra:
        ids.extend([pad_id] * extra)
        tgt.extend([IGNORE] * extra)
        pos.extend(range(extra))  # a separate "sequence" of padding: attends only to itself
    n_targets = sum(1 for t in tgt if t != IGNORE)
    as_t = lambda v: torch.tensor(v, dtype=torch.long).unsqueeze(0)  # noqa: E731
    return MicroBatch(as_t(ids), as_t(tgt), None, as_t(pos), n_targets, n_real, padded)


def collate_padded(rows: list[dict], pad_id: int) -> MicroBatch:
    import torch

    width = max(len(r["input_ids"]) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    tgt = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    n_real = 0
    for b, r in enumerate(rows):
        x = list(r["input_ids"])
        ids[b, : len(x)] = torch.tensor(x)
        tgt[b, : len(x)] = torch.tensor(_shifted(list(r["labels"])))
        mask[b, : len(x)] = 1
        n_real += len(x)
    n_targets = int((tgt != IGNORE).sum())
    return MicroBatch(ids, tgt, mask, None, n_targets, n_real, len(rows) * width)


@dataclass
class Batcher:
    """Plans and collates micro-batches for one dataset split."""

    dataset: object  # datasets.Dataset with input_ids, labels
    packed: bool
    batch_size: int
    max_tokens: int
    pad_id: int
    seed: int = 0

    def __post_init__(self) -> None:
        self.lengths = list(self.dataset["length"])
        self.targets = list(self.dataset["n_targets"])

    def n_targets(self, indices: list[int]) -> int:
        return sum(self.targets[i] for i in indices)

    def plan(self, epoch: int, shuffle: bool = True) -> list[list[int]]:
        order = epoch_order(len(self.lengths), self.seed, epoch, shuffle)
        if self.packed:
            return plan_packed(order, self.lengths, self.max_tokens)
        return plan_padded(order, self.batch_size)

    def collate(self, indices: list[int]) -> MicroBatch:
        rows = self.dataset[indices]
        rows = [{"input_ids": a, "labels": b} for a, b in zip(rows["input_ids"], rows["labels"])]
        if self.packed:
            return collate_packed(rows, self.pad_id, self.max_tokens)
        return collate_padded(rows, self.pad_id)
