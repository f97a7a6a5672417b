"""The decoder's forward and backward as one CUDA graph: a training micro-batch launches two graphs.

On one GPU a recipe-sized step of a 1.5B model is launch-bound: thousands of small kernels whose
launches, not their arithmetic, set the step time (docs/PERFORMANCE.md). Capturing the whole decoder
(embeddings, every layer with its LoRA, the final norm and the packed examples' attention mask) once,
with torch.cuda.make_graphed_callables, replays all of them as one forward and one backward graph.
Capture costs a few warm-up passes, not a compilation; compiled decoder layers (torch.compile,
inductor) can sit inside it for long runs.

Only micro-batches of the captured shape replay it (a run with static shapes has one shape); any other
call (evaluation, no gradient, another shape, an explicit attention mask) runs the decoder eagerly.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable

if TYPE_CHECKING:
    import torch


def block_causal_mask(position_ids: torch.Tensor) -> torch.Tensor:
    """[rows, 1, L, L] boolean mask: causal within each packed example, nothing across them.

    transformers derives the same mask from position_ids, but checks it with a host sync on
    every forward; building it here keeps the GPU queue full. Examples start at position 0.
    """
    import torch

    seq = (position_ids == 0).cumsum(-1)
    length = position_ids.shape[-1]
    causal = torch.ones(length, length, dtype=torch.bool, device=position_ids.device).tril_()
    return ((seq[:, :, None] == seq[:, None, :]) & causal)[:, None]


def backbone_function(decoder: torch.nn.Module, own_mask: bool) -> Callable[..., torch.Tensor]:
    """The decoder's forward as one plain function: f(input_ids [B, L], attention_mask or None,
    position_ids [B, L]) -> last hidden states [B, L, D].

    own_mask: with no attention mask given, the packed examples' block-causal mask is built from
    position_ids inside the function, so its kernels are captured too. The undecorated forward is
    used: transformers' output-capturing wrapper keeps its state in a ContextVar (untraceable by
    torch.compile) and returns through Python bookkeeping a graph does not need.
    """
    forward = type(decoder).forward
    while hasattr(forward, "__wrapped__"):
        forward = forward.__wrapped__

    def backbone(input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                 position_ids: torch.Tensor | None) -> torch.Tensor:
        if attention_mask is None and position_ids is not None and own_mask:
            attention_mask = block_causal_mask(position_ids)
        return forward(decoder, input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                       use_cache=False).last_hidden_state

    return backbone


class GraphedBackbone:
    """The decoder captured as one CUDA graph at its first training micro-batch, replayed after.

    Call as backbone_function's f. The graph's output and the gradients it returns live in its own
    static buffers: the hidden states are used before the next micro-batch replays it, and
    `detach_grads` (after every backward but a step's last) keeps accumulated gradients apart.
    """

    def __init__(self, decoder: torch.nn.Module, own_mask: bool) -> None:
        import torch

        self.eager = backbone_function(decoder, own_mask)
        self.decoder = decoder
        self.graphed: Any = None  # torch.cuda.make_graphed_callables' callable, once captured
        self.shape: tuple[int, ...] | None = None
        self.captures = 0
        self.failure = ""  # why the capture failed (the decoder then runs eagerly), for the user

        eager = self.eager

        class _Module(torch.nn.Module):  # make_graphed_callables takes a module's parameters as graph inputs
            def __init__(self) -> None:
                super().__init__()
                self.decoder = decoder

            def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
                return eager(input_ids, None, position_ids)

        self._module = _Module()

    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                 position_ids: torch.Tensor | None) -> torch.Tensor:
        import torch

        usable = attention_mask is None and position_ids is not None and self.replayable(input_ids)
        if not usable or self.failure or (self.shape is not None and tuple(input_ids.shape) != self.shape):
            return self.eager(input_ids, attention_mask, position_ids)
        if self.graphed is None:
            try:
                self._capture(input_ids, position_ids)
            except Exception as exc:  # noqa: BLE001 - a decoder whose step cannot be captured still trains
                self.failure = f"{type(exc).__name__}: {exc}".splitlines()[0][:200]
                if input_ids.is_cuda:
                    torch.cuda.synchronize(input_ids.device)
                return self.eager(input_ids, attention_mask, position_ids)
        return self.graphed(input_ids, position_ids)

    def replayable(self, input_ids: torch.Tensor) -> bool:
        """A training micro-batch on the GPU: gradients on, the decoder in training mode."""
        import torch

        return torch.is_grad_enabled() and self.decoder.training and input_ids.is_cuda

    def _capture(self, input_ids: torch.Tensor, position_ids: torch.Tensor) -> None:
        import torch

        # the warm-up passes draw dropout masks: put the generator back, so a resumed run (which
        # captures at a later step) draws the same masks as an uninterrupted one
        rng = torch.cuda.get_rng_state(input_ids.device)
        dtype = torch.get_autocast_dtype("cuda")
        # accelerate's mixed precision runs the forward under autocast, whose weight cache a graph
        # cannot hold: capture under the same autocast without it
        with torch.autocast("cuda", dtype=dtype, enabled=torch.is_autocast_enabled("cuda"), cache_enabled=False):
            self.graphed = torch.cuda.make_graphed_callables(self._module, (input_ids, position_ids))
        torch.cuda.set_rng_state(rng, input_ids.device)
        self.shape = tuple(input_ids.shape)
        self.captures += 1


def detach_grads(params: list[torch.nn.Parameter]) -> None:
    """Give each gradient its own memory. A graphed backward hands autograd views of its static
    buffers, which autograd may keep as .grad: the next micro-batch's replay would overwrite them,
    and accumulation would add that micro-batch's gradient to itself."""
    import torch

    grads = [p.grad for p in params if p.grad is not None]
    if grads:
        copies = torch._foreach_mul(grads, 1.0)
        for p, g in zip((p for p in params if p.grad is not None), copies):
            p.grad = g
