"""The fast decoding path: a static KV cache, one decode step replayed as a CUDA graph, early exit.

Eager `model.generate` pays, at every token, Python and kernel-launch work that dwarfs the
arithmetic of a small model (a 135M model's step reads ~270 MB: ~0.1 ms of GPU memory traffic,
yet costs ~100 ms on the 4-bit model). Here a batch of left-padded prompts is prefilled once,
then every new token is one replay of a captured graph (CUDA) or one forward (CPU), on a model
whose cache never grows: transformers' StaticCache, its length the prompt plus the token cap
rounded up, so batches of similar shapes reuse one capture. On the CPU, where nothing is
captured and shapes may change, attention sees only the filled part of the cache, finished
rows leave the batch (greedy, no logits processors), prompts are prefilled packed without
padding, and the thread count is measured (cpu_decode.py).

Same answers as eager `generate`: the same positions (left padding counted out), the same
logits processors and sampling warpers (transformers' own classes, in its order), pad fed to
finished rows, a row finishing at its first stop token (per-sequence eos), the loop ending at
the token cap or once every row has finished. The attention mask is built here as a 4-D
additive mask over the whole static cache (transformers uses such a mask as given), so no
mask logic runs inside the captured step.
"""

from __future__ import annotations

from dataclasses import dataclass

CHECK_EVERY = 8  # decode steps between checks that every row has finished, on a GPU (a check waits for it)
MAX_SLOTS = 4  # captured (batch, cache length) shapes kept at once


def cache_length(prompt_width: int, max_new_tokens: int, step: int = 64) -> int:
    """Static cache length: prompt plus cap, rounded up so that nearby shapes share a capture."""
    return -(-(prompt_width + max_new_tokens) // step) * step


@dataclass
class _Slot:
    """Static tensors of one (batch, cache length) shape and, on CUDA, the graph that reads them."""
    cache: object
    tok: object  # (batch, 1) token fed at this step
    pos: object  # (batch, 1) its position (left padding not counted)
    cache_pos: object  # (1,) where its key and value land in the cache
    mask: object  # (batch, 1, 1, cache length) additive: 0 where a key may be attended, dtype min elsewhere
    logits: object  # (batch, vocab) float32: the step's output
    graph: object = None
    filled: bool = False  # CPU: attention sees only the cache's filled part (cpu_decode.FilledLayer)
    fused: bool = False  # the step is fused_step's (a plain cache, a Llama-family copy), else transformers' forward


def processors_for(sampling, prompt_pad_lengths):
    """transformers' logits processors and sampling warpers for `sampling`, in `generate`'s order."""
    from transformers.generation.logits_process import (LogitsProcessorList, NoRepeatNGramLogitsProcessor,
                                                        RepetitionPenaltyLogitsProcessor, TemperatureLogitsWarper,
                                                        TopKLogitsWarper, TopPLogitsWarper)

    procs = LogitsProcessorList()
    if sampling.repetition_penalty != 1.0:
        procs.append(RepetitionPenaltyLogitsProcessor(sampling.repetition_penalty,
                                                      prompt_ignore_length=prompt_pad_lengths))
    if sampling.no_repeat_ngram_size > 0:
        procs.append(NoRepeatNGramLogitsProcessor(sampling.no_repeat_ngram_size))
    if not sampling.greedy:
        if sampling.temperature != 1.0:
            procs.append(TemperatureLogitsWarper(sampling.temperature))
        if sampling.top_k:
            procs.append(TopKLogitsWarper(top_k=sampling.top_k, min_tokens_to_keep=1))
        if sampling.top_p < 1.0:
            procs.append(TopPLogitsWarper(top_p=sampling.top_p, min_tokens_to_keep=1))
    return procs


class Decoder:
    """Static-cache decoding on one plain model (see plain_copy); each decoding step a CUDA graph on CUDA.

    `notes` collects one line per capture that failed (that shape then decodes without a graph).
    """

    def __init__(self, model, device):
        self.model, self.device = model, device
        self.graphs = device.type == "cuda"  # False once a capture failed
        self.dtype = next(model.parameters()).dtype
        self.slots: dict[tuple[int, int], _Slot] = {}
        self.notes: list[str] = []
        self.warmup_seconds = 0.0  # building the copy and capturing decode steps, so far
        self.cpu_threads: int | None = None  # CPU: the thread count the last run found faster (its next prefill)
        self.process_threads = 1  # the process's own intra-op thread count, put back after each run
        self.unpadded_prefill = device.type == "cpu"  # prompts prefilled without padding (cpu_decode.packed_prefill)
        self.row_steps = 0  # rows decoded in the last run, summed over its steps (finished rows dropped on the CPU)
        self.fused = model.__dict__.get("fused_step")  # fused_step.FusedStep, or None: transformers' forward
        if self.fused is None:
            why = model.__dict__.get("fused_note") or "not a plain copy (plain_copy.build_copy)"
            self.notes.append(f"decoding step: transformers' forward ({why})")

    def take_notes(self) -> list[str]:
        """The notes not said yet, to be said once each (the callers pass them to their reporter)."""
        notes, self.notes = self.notes, []
        return notes

    @property
    def step_kind(self) -> str:
        """Which decoding step runs: "fused" (fused_step.py) or "transformers" (the model's own forward)."""
        return "fused" if self.fused is not None else "transformers"

    def _slot(self, batch: int, length: int) -> _Slot:
        """The static tensors of this shape: kept for reuse on CUDA (a captured graph reads them); on the CPU,
        where nothing is captured, fresh for each run, attending only to the filled cache, rows droppable."""
        from lora_cli.infer.cpu_decode import attend_filled_only, plain_static

        if self.device.type == "cpu":
            slot = self._new_slot(batch, length)
            slot.filled = attend_filled_only(slot.cache)
        else:
            key = (batch, length)
            if key not in self.slots:
                while len(self.slots) >= MAX_SLOTS:
                    self.slots.pop(next(iter(self.slots)))
                self.slots[key] = self._new_slot(batch, length)
            slot = self.slots[key]
        slot.fused = self.fused is not None and plain_static(slot.cache)
        return slot

    def _new_slot(self, batch: int, length: int) -> _Slot:
        import torch
        from transformers import StaticCache

        dev = self.device
        return _Slot(cache=StaticCache(config=self.model.config, max_cache_len=length),
                     tok=torch.zeros((batch, 1), dtype=torch.long, device=dev),
                     pos=torch.zeros((batch, 1), dtype=torch.long, device=dev),
                     cache_pos=torch.zeros((1,), dtype=torch.long, device=dev),
                     mask=torch.zeros((batch, 1, 1, length), dtype=self.dtype, device=dev),
                     logits=torch.zeros((batch, self.model.config.get_text_config().vocab_size), dtype=torch.float32,
                                        device=dev))

    def _forward(self, slot: _Slot) -> None:
        if slot.fused:
            return self.fused(slot)
        # a FilledLayer hands attention the keys up to and with this step's: the mask covers as many
        mask = slot.mask[..., :int(slot.cache_pos) + 1] if slot.filled else slot.mask
        out = self.model(input_ids=slot.tok, position_ids=slot.pos, cache_position=slot.cache_pos,
                         attention_mask=mask, past_key_values=slot.cache, use_cache=True)
        slot.logits.copy_(out.logits[:, -1, :])

    def _capture(self, slot: _Slot, filled: int) -> None:
        """Record the decode step once (after two warm-up steps on a side stream, as CUDA graphs need)."""
        import time

        import torch

        t0 = time.perf_counter()
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        try:
            with torch.cuda.stream(stream):
                for _ in range(2):
                    self._forward(slot)
            torch.cuda.current_stream(self.device).wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                self._forward(slot)
            slot.graph = graph
        except Exception as exc:  # noqa: BLE001 - an architecture whose step cannot be captured still decodes
            self.graphs = False
            self.notes.append(f"decoding without CUDA graphs: the step could not be captured ({exc})"[:300])
            torch.cuda.synchronize(self.device)
        # the warm-up steps advanced the cache's write position: put it back at the end of the prompt
        for layer in slot.cache.layers:
            layer.cumulative_length.fill_(filled)
        self.warmup_seconds += time.perf_counter() - t0

    def _prefill(self, slot: _Slot, ids, valid):
        """Run the prompts through the model, filling the cache; the last position's logits (float32)."""
        import torch

        from lora_cli.infer.cpu_decode import packed_prefill, plain_static

        batch, width = ids.shape
        length = slot.mask.shape[-1]
        slot.cache.reset()
        keys = torch.zeros((batch, length), dtype=torch.bool, device=self.device)
        keys[:, :width] = valid
        causal = torch.ones((width, length), dtype=torch.bool, device=self.device).tril()
        allowed = keys[:, None, None, :] & causal[None, None]
        low = torch.finfo(self.dtype).min
        mask = torch.zeros(allowed.shape, dtype=self.dtype, device=self.device).masked_fill_(~allowed, low)
        pos = (valid.long().cumsum(-1) - 1).masked_fill_(~valid, 1)
        if self.unpadded_prefill and plain_static(slot.cache):
            logits = packed_prefill(self.model, slot.cache, ids, valid, self.dtype)
        else:
            logits = self.model(input_ids=ids, position_ids=pos, cache_position=torch.arange(width, device=self.device),
                                attention_mask=mask[..., :width] if slot.filled else mask, past_key_values=slot.cache,
                                use_cache=True, logits_to_keep=1).logits[:, -1, :]
        slot.mask.copy_(torch.zeros_like(slot.mask).masked_fill_(~keys[:, None, None, :], low))
        slot.pos.copy_(valid.long().sum(-1, keepdim=True))
        slot.cache_pos.fill_(width)
        return logits.to(dtype=torch.float32)

    def run(self, ids, valid, sampling, stop_ids: list[int], pad_id: int, caps=None, on_token=None):
        """New tokens for a left-padded batch: (batch, steps) long, pad after each row's end.

        ids, valid: (batch, width) prompt ids and bool mask (False on left padding), on the device.
        caps: optional (batch,) long, each row's own token cap (<= sampling.max_new_tokens).
        on_token: called with each step's (batch,) tokens (waits for every step: for streaming).
        """
        import torch

        threads = self.process_threads = torch.get_num_threads()
        try:
            if self.device.type == "cpu" and self.cpu_threads is not None:
                torch.set_num_threads(self.cpu_threads)
            # CPU: inference mode spares every op its autograd bookkeeping (~5% of a step, measured); what it
            # creates stays in the run, and the copy's refresh also runs in it (plain_copy.refresh)
            with torch.inference_mode() if self.device.type == "cpu" else torch.no_grad():
                return self._run(ids, valid, sampling, stop_ids, pad_id, caps, on_token)
        finally:
            torch.set_num_threads(threads)  # training goes on with its own count

    def _run(self, ids, valid, sampling, stop_ids, pad_id, caps, on_token):
        import torch

        from lora_cli.infer.cpu_decode import ThreadTrial, drop_rows

        batch, width = ids.shape
        cap = sampling.max_new_tokens
        # a sampled batch must end exactly where eager generate ends (later batches draw from the same generator);
        # on the CPU a check costs nothing
        every = CHECK_EVERY if sampling.greedy and on_token is None and self.device.type == "cuda" else 1
        slot = self._slot(batch, cache_length(width, cap))
        seq = torch.cat([ids, torch.full((batch, cap), pad_id, dtype=torch.long, device=self.device)], 1)
        procs = processors_for(sampling, (~valid).long().sum(-1))
        stops = torch.tensor(stop_ids, dtype=torch.long, device=self.device)
        done = torch.zeros(batch, dtype=torch.bool, device=self.device)
        logits = self._prefill(slot, ids, valid)
        if self.graphs and slot.graph is None:
            self._capture(slot, width)
        trial = ThreadTrial(self) if self.device.type == "cpu" else None
        # the rows still decoding: all (a slice) or, where finished rows are dropped, their indices
        rows = slice(None)
        if self.device.type == "cpu" and sampling.greedy and not procs and on_token is None:
            rows = torch.arange(batch, device=self.device)
        self.row_steps = 0
        for k in range(cap):
            if k:
                slot.tok.copy_(seq[rows, width + k - 1:width + k])
                self._step(slot, trial)
                logits = slot.logits
            nxt = self._pick(procs(seq[rows, :width + k], logits), sampling.greedy)
            nxt = torch.where(done[rows], pad_id, nxt)
            seq[rows, width + k] = nxt
            self.row_steps += nxt.shape[0]
            if isinstance(rows, slice):  # every row (always on a GPU): in place, no write-back through an index
                done |= torch.isin(nxt, stops)
            else:
                done[rows] |= torch.isin(nxt, stops)
            if caps is not None:
                done |= caps <= k + 1
            if on_token is not None:
                on_token(nxt)
            if (k + 1) % every == 0 and bool(done.all()):
                return seq[:, width:width + k + 1]
            if not isinstance(rows, slice) and bool(done[rows].any()):
                keep = ~done[rows]
                rows = rows[keep]
                drop_rows(slot, keep)
        return seq[:, width:]

    def _step(self, slot: _Slot, trial) -> None:
        """One decoding step: slot.tok in, slot.logits out, the cache one position further."""
        slot.mask.index_fill_(-1, slot.cache_pos, 0.0)  # the fed token attends to itself
        if trial is not None:
            trial.step(lambda: self._forward(slot))
        else:
            slot.graph.replay() if slot.graph is not None else self._forward(slot)
        slot.pos.add_(1)
        slot.cache_pos.add_(1)

    @staticmethod
    def _pick(scores, greedy: bool):
        import torch

        if greedy:
            return scores.argmax(-1)
        return torch.multinomial(torch.softmax(scores, dim=-1), num_samples=1).squeeze(1)


def build_decoder(model, device, dtype) -> tuple["Decoder | None", str | None]:
    """A Decoder on a plain copy of `model` (dequantized, adapter beside it), or None and the reason to decode eagerly.

    The copy needs memory (about 2 bytes a parameter in bf16, 4 in fp32): on CUDA it must fit in
    the free memory with 1 GiB to spare, on the CPU in half the free memory. LORA_CLI_EAGER_GENERATE=1
    asks for eager decoding (for comparisons).
    """
    import os
    import time

    import torch

    from lora_cli.infer.plain_copy import build_copy, copy_bytes, why_not_copyable

    if os.environ.get("LORA_CLI_EAGER_GENERATE") == "1":
        return None, "LORA_CLI_EAGER_GENERATE=1 is set"
    reason = why_not_copyable(model)
    if reason:
        return None, reason
    need = copy_bytes(model, dtype)
    if device.type == "cuda":
        free = torch.cuda.mem_get_info(device)[0]
        if need + (1 << 30) > free:
            return None, (f"a {need / 2**30:.1f} GiB {str(dtype).split('.')[-1]} copy of the model does not fit "
                          f"in the {free / 2**30:.1f} GiB free on the GPU")
    elif hasattr(os, "sysconf") and "SC_AVPHYS_PAGES" in os.sysconf_names:
        free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        if 2 * need > free:
            return None, (f"a {need / 2**30:.1f} GiB copy of the model would take over half of the "
                          f"{free / 2**30:.1f} GiB of free memory")
    try:
        t0 = time.perf_counter()
        decoder = Decoder(build_copy(model, dtype, device), device)
        decoder.warmup_seconds = time.perf_counter() - t0
        return decoder, None
    except (ValueError, TypeError, RuntimeError, ImportError, AttributeError, KeyError) as exc:
        return None, f"the model could not be copied for fast decoding ({type(exc).__name__}: {exc})"[:300]
