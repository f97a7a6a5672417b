"""What the fast decoding path does differently on a CPU, where no step is captured and shapes may change.

A CPU decoding step of a small model is a few hundred small matmuls over weights read from
memory; what else a step costs there, and what removes it (measured on a 2-core AVX-512 CPU,
the embedded 135M model in bf16; docs/PERFORMANCE.md):

- Attention over the whole static cache (PyTorch's CPU kernel costs in proportion to the keys it
  is given, masked or not): the fused step attends only to the filled part (`FusedStep.attended`);
  transformers' forward, the step of other architectures, through `FilledLayer`.
- Finished rows, fed pad until the whole batch ends, still cost a row of every matmul and of
  attention: `drop_rows` takes them out (greedy decoding without logits processors only: sampling
  must draw for every row as `generate` does, and the repetition processors keep per-row state).
- Left padding makes the prefill compute batch x the longest prompt, and prompts prefilled one by
  one run small, slow matmuls: `packed_prefill` packs them without padding.
- Each small matmul is a barrier for every intra-op thread; on cores other work also uses, one
  thread has measured 5-11x faster than two: `ThreadTrial` keeps the faster count.
"""

from __future__ import annotations

import functools

TRIAL_STEPS = 2  # decode steps timed at each thread count before the faster one is kept
PACK_TOKENS = 256  # prompt tokens per packed prefill forward: larger packs attend across more masked-out pairs


def faster_threads(timings: dict[int, list[float]]) -> int:
    """The thread count whose decode steps took least (its fastest step, seconds), fewer threads on a tie."""
    return min(timings, key=lambda n: (min(timings[n]), n))


@functools.cache
def filled_layer_class():
    from transformers.cache_utils import StaticLayer

    class FilledLayer(StaticLayer):
        """A StaticLayer whose update returns only the positions written so far: (batch, heads, filled, dim)."""

        def update(self, key_states, value_states, *args, **kwargs):
            keys, values = super().update(key_states, value_states, *args, **kwargs)
            filled = int(self.cumulative_length)
            return keys[:, :, :filled], values[:, :, :filled]

    return FilledLayer


def plain_static(cache) -> bool:
    """Whether every layer of a StaticCache is a plain one (no sliding window), whose rows can be written directly."""
    from transformers.cache_utils import StaticLayer

    return all(type(layer) in (StaticLayer, filled_layer_class()) for layer in cache.layers)


def attend_filled_only(cache) -> bool:
    """Swap the plain layers of a fresh StaticCache for FilledLayers; False (unchanged) if any layer is not plain."""
    if not plain_static(cache):
        return False
    filled = filled_layer_class()
    cache.layers = [filled(max_cache_len=layer.max_cache_len) for layer in cache.layers]
    return True


def packs(lengths: list[int], budget: int | None = None) -> list[list[int]]:
    """Row indices grouped in order into packs of at most `budget` (PACK_TOKENS) tokens, a longer prompt alone."""
    budget = PACK_TOKENS if budget is None else budget
    out: list[list[int]] = []
    total = budget + 1
    for i, n in enumerate(lengths):
        if total + n > budget:
            out.append([])
            total = 0
        out[-1].append(i)
        total += n
    return out


def packed_prefill(model, cache, ids, valid, dtype):
    """Prefill left-padded prompts without their padding, several per forward; each row's keys and values land
    in its row of `cache` (a plain StaticCache), at the positions the left-padded batch would give them.

    ids, valid: (batch, width) long and bool. Returns the last prompt token's logits, (batch, vocab).
    """
    import torch
    from transformers import DynamicCache

    batch, width = ids.shape
    lengths = valid.sum(-1).tolist()
    rows: list = [None] * batch
    for group in packs(lengths):
        tokens = torch.cat([ids[i, width - lengths[i]:] for i in group])[None]
        positions = torch.cat([torch.arange(lengths[i]) for i in group])[None]
        segment = torch.cat([torch.full((lengths[i],), j) for j, i in enumerate(group)])
        causal = torch.ones(len(segment), len(segment), dtype=torch.bool).tril()
        allowed = (segment[:, None] == segment[None, :]) & causal  # each prompt attends to itself only
        mask = torch.zeros(allowed.shape, dtype=dtype).masked_fill_(~allowed, torch.finfo(dtype).min)[None, None]
        ends = torch.tensor(lengths)[group].cumsum(0)
        own = DynamicCache(config=model.config)
        out = model(input_ids=tokens, position_ids=positions, attention_mask=mask, past_key_values=own,
                    use_cache=True, logits_to_keep=ends - 1)
        for j, i in enumerate(group):
            rows[i] = out.logits[0, j]
        _write_rows(cache, own, group, [int(e) for e in ends], lengths, batch, width)
    for layer in cache.layers:
        layer.cumulative_length.fill_(width)
    return torch.stack(rows)


def _write_rows(cache, own, group, ends, lengths, batch, width) -> None:
    """Each prompt's keys and values (segments of the packed sequence) into its row, right-aligned at `width`."""
    for layer, got in zip(cache.layers, own.layers):
        if not layer.is_initialized:
            layer.lazy_initialization(got.keys[:, :, :1].expand(batch, -1, -1, -1),
                                      got.values[:, :, :1].expand(batch, -1, -1, -1))
        for i, end in zip(group, ends):
            n = lengths[i]
            layer.keys[i, :, width - n:width].copy_(got.keys[0, :, end - n:end])
            layer.values[i, :, width - n:width].copy_(got.values[0, :, end - n:end])


def drop_rows(slot, keep) -> None:
    """Keep only the rows `keep` (bool, (batch,)) of a slot: its step inputs, its logits and its cache."""
    slot.tok, slot.pos, slot.mask, slot.logits = slot.tok[keep], slot.pos[keep], slot.mask[keep], slot.logits[keep]
    for layer in slot.cache.layers:
        layer.keys, layer.values = layer.keys[keep], layer.values[keep]
        layer.batch_size = int(keep.sum())


class ThreadTrial:
    """The first decode steps timed at the process's thread count and at one thread; the rest run at the
    faster (kept in decoder.cpu_threads for the next run's prefill). Thread counts change only the speed."""

    def __init__(self, decoder):
        self.decoder = decoder
        most = decoder.process_threads
        self.plan = [n for n in ([most, 1] if most > 1 else []) for _ in range(TRIAL_STEPS)]
        self.timings: dict[int, list[float]] = {}

    def step(self, forward) -> None:
        import time

        import torch

        if not self.plan:
            return forward()
        n = self.plan.pop(0)
        torch.set_num_threads(n)
        t0 = time.perf_counter()
        forward()
        self.timings.setdefault(n, []).append(time.perf_counter() - t0)
        if not self.plan:
            self.decoder.cpu_threads = faster_threads(self.timings)
            torch.set_num_threads(self.decoder.cpu_threads)
