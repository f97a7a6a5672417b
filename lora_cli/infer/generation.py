"""Load base + adapter for inference, and generate: greedy or sampled, streamed or batched.

The base is loaded as training loaded it (4-bit NF4 or not, from the adapter's run config)
unless the caller overrides it, so generate and eval see the model that was trained. Prompts
are built by `encode_example_prompt`/`encode_prompt`, token-for-token as in training.
Only lora-cli's own flags decide how tokens are picked: a model's generation_config sampling
defaults (Qwen's temperature 0.7, top_k 20, ...) are overridden, so greedy means greedy.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Callable

from lora_cli.adapter.folder import AdapterInfo, attach_adapter, load_template
from lora_cli.errors import LoraCliError
from lora_cli.progress import NULL_REPORTER


@dataclass(frozen=True)
class Sampling:
    max_new_tokens: int = 256
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    top_k: int = 0  # 0: no top-k filter
    seed: int | None = None
    repetition_penalty: float = 1.0  # > 1 makes tokens already in the prompt or answer less likely; 1 = off
    no_repeat_ngram_size: int = 0  # never repeat an n-gram of this many tokens; 0 = off

    def __post_init__(self) -> None:
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise LoraCliError(f"--max-new-tokens must be at least 1, not {self.max_new_tokens}.")
        if self.temperature < 0:
            raise LoraCliError(f"--temperature must be >= 0 (0 = greedy), not {self.temperature}.")
        if not 0 < self.top_p <= 1:
            raise LoraCliError(f"--top-p must be in (0, 1], not {self.top_p}.")
        if self.top_k < 0:
            raise LoraCliError(f"--top-k must be >= 0 (0 = off), not {self.top_k}.")
        if not self.repetition_penalty > 0:
            raise LoraCliError(f"--repetition-penalty must be > 0 (1 = off), not {self.repetition_penalty}.")
        if self.no_repeat_ngram_size < 0:
            raise LoraCliError(f"--no-repeat-ngram-size must be >= 0 (0 = off), not {self.no_repeat_ngram_size}.")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def generate_kwargs(self, stop_ids: list[int], pad_id: int) -> dict:
        """Every knob explicit, so nothing is filled in from the model's generation_config."""
        return dict(max_new_tokens=self.max_new_tokens, min_new_tokens=0, do_sample=not self.greedy,
                    temperature=self.temperature if not self.greedy else 1.0, top_p=self.top_p, top_k=self.top_k,
                    typical_p=1.0, repetition_penalty=self.repetition_penalty,
                    no_repeat_ngram_size=self.no_repeat_ngram_size, num_beams=1,
                    eos_token_id=stop_ids, pad_token_id=pad_id, use_cache=True)

    def to_dict(self) -> dict:
        """What eval records of how the answers were picked: every field, and whether that is greedy."""
        return {"greedy": self.greedy, **asdict(self)}


@dataclass
class Answer:
    text: str
    token_ids: list[int]  # generated ids, up to and without the stop token
    stopped: bool  # a stop token (eos) came within max_new_tokens


def stop_ids_of(model, tokenizer) -> list[int]:
    """The eos training appends, plus any other end token the model's generation config names."""
    ids = [tokenizer.eos_token_id]
    extra = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    for i in (extra if isinstance(extra, (list, tuple)) else [extra]):
        if isinstance(i, int) and i not in ids:
            ids.append(i)
    return ids


@dataclass
class LoadedModel:
    model: object  # a peft PeftModel (with an adapter) or the plain base model
    tokenizer: object
    template: object
    info: AdapterInfo
    device: object
    precision: str
    has_adapter: bool
    reporter: object = NULL_REPORTER
    _decoder: object = None  # decode.Decoder on a plain copy, built on first use; False: eager (reason said)
    _copy_of: bool | None = None  # whether the copy holds the adapter (True) or the base alone (False)

    @property
    def stop_ids(self) -> list[int]:
        return stop_ids_of(self.model, self.tokenizer)

    def decoder(self, with_adapter: bool):
        """The fast path's Decoder, its copy refreshed to the base alone or base + adapter (as the model is
        switched now); None when generation must be eager (the reason said once through the reporter)."""
        from lora_cli.infer.decode import build_decoder
        from lora_cli.infer.plain_copy import refresh
        from lora_cli.model.device import torch_dtype

        if self._decoder is None:
            self._decoder, reason = build_decoder(self.model, self.device, torch_dtype(self.precision))
            if reason:
                self._decoder = False
                self.reporter.message(f"Generating eagerly (slower): {reason}.")
            self._copy_of = with_adapter
        if self._decoder and self._copy_of != with_adapter:
            refresh(self._decoder.model, self.model)
            self._copy_of = with_adapter
        return self._decoder or None

    def check_records(self, examples: list, file: str) -> None:
        check_records(examples, self.tokenizer, self.template, file)

    def example_prompt(self, example) -> list[int]:
        from lora_cli.data.tokenization import encode_example_prompt

        return encode_example_prompt(example, self.tokenizer, self.template, self.info.add_eos)

    def chat_prompt(self, messages: list[dict]) -> list[int]:
        from lora_cli.data.tokenization import encode_prompt

        return encode_prompt(messages, self.tokenizer, self.template, self.info.add_eos)


def check_records(examples: list, tokenizer, template, file: str) -> None:
    """DataError listing each record of `file` the template cannot render (a chat template that
    refuses a conversation opening with the assistant, say): one message, not a traceback."""
    from lora_cli.data.tokenization import template_issues
    from lora_cli.errors import DataError

    refused = template_issues(examples, tokenizer, template, file)
    if refused:
        raise DataError(f"{file} has {len(refused)} record(s) that the template cannot render; fix or remove "
                        "them.", refused)


def load_for_inference(info: AdapterInfo, quantization: str | None = None, precision: str = "auto",
                       device: str = "auto", with_adapter: bool = True, reporter=NULL_REPORTER,
                       check: Callable | None = None) -> LoadedModel:
    """Base model (as trained: 4-bit or not) with the adapter on top, in eval mode.

    `check(tokenizer, template)`: what the caller's prompts need of the template (records of a file,
    a system message), asked once the tokenizer is loaded and before the model is: a refusal costs
    no model load."""
    from lora_cli.model.device import pick_device, resolve_precision
    from lora_cli.model.load import load_model, load_tokenizer, quiet_libraries
    from lora_cli.model.resolve import resolve_model

    quiet_libraries()
    quant = quantization or info.quantization
    if quant not in ("nf4", "none"):
        raise LoraCliError(f"--quantization must be nf4 or none, not {quant!r}.")
    template = load_template(info)
    dev = pick_device(device)
    prec = resolve_precision(precision, dev.type)
    resolved = None if info.tokenizer_dir else resolve_model(info.base_model, reporter)
    tokenizer = load_tokenizer(info.tokenizer_dir or resolved.path, info.trust_remote_code)
    template.check(tokenizer)  # e.g. --template chat with a tokenizer that has none: before the model loads
    if check is not None:
        check(tokenizer, template)
    resolved = resolved or resolve_model(info.base_model, reporter)
    what = "4-bit NF4" if quant == "nf4" else prec
    with reporter.stage(f"Loading {info.base_model} ({what})" + (" + adapter" if with_adapter else "")):
        model = load_model(resolved.path, quant, prec, dev, info.trust_remote_code)
        if with_adapter:
            model = attach_adapter(model, info)
    model.eval()
    return LoadedModel(model, tokenizer, template, info, dev, prec, with_adapter, reporter)


def check_batch_size(batch_size: int) -> None:
    if batch_size < 1:
        raise LoraCliError(f"--batch-size must be at least 1, not {batch_size}.")


def make_streamer(tokenizer, on_text: Callable[[str], None]):
    """transformers' TextStreamer (word-boundary buffering, prompt skipped), handing text to a callback."""
    from transformers import TextStreamer

    class CallbackStreamer(TextStreamer):
        def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
            if text:
                on_text(text)

    return CallbackStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)


def _left_padded(batch: list[list[int]], pad_id: int, device):
    import torch

    width = max(map(len, batch))
    ids = torch.tensor([[pad_id] * (width - len(x)) + x for x in batch], dtype=torch.long, device=device)
    mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in batch], dtype=torch.long, device=device)
    return ids, mask


def _cut(ids: list[int], stop_ids: list[int], tokenizer) -> Answer:
    """Generated ids up to the first stop token; padding after it (pad == eos) goes with it."""
    end = next((i for i, t in enumerate(ids) if t in stop_ids), None)
    kept = ids if end is None else ids[:end]
    return Answer(tokenizer.decode(kept, skip_special_tokens=True), kept, end is not None)


def generate(loaded: LoadedModel, prompts: list[list[int]], sampling: Sampling, batch_size: int = 8,
             on_text: Callable[[str], None] | None = None, use_adapter: bool = True,
             on_batch: Callable[[int], None] | None = None) -> list[Answer]:
    """Answers in the order of `prompts`, generated in left-padded batches of similar length.

    `on_text` streams a single prompt's text as it is produced; `use_adapter=False` answers
    with the base model alone (the adapter switched off, not unloaded). The fast path (see
    decode.py) is used unless the model cannot be copied for it; the reason is then said once.
    """
    import contextlib

    switch = loaded.model.disable_adapter() if (loaded.has_adapter and not use_adapter) else contextlib.nullcontext()
    with switch:
        decoder = loaded.decoder(use_adapter or not loaded.has_adapter)
        answers = generate_with(loaded.model, loaded.tokenizer, loaded.device, prompts, sampling, batch_size,
                                on_text=on_text, on_batch=on_batch, decoder=decoder)
    for note in decoder.take_notes() if decoder else []:  # a slower step or a failed capture, said once
        loaded.reporter.message(f"Generating: {note}.")
    return answers


def generate_with(model, tokenizer, device, prompts: list[list[int]], sampling: Sampling, batch_size: int = 8,
                  on_text: Callable[[str], None] | None = None, on_batch: Callable[[int], None] | None = None,
                  inference_mode: bool = True, decoder=None, caps: list[int] | None = None) -> list[Answer]:
    """`generate` for any causal LM (a loaded adapter, or the model being trained), in the order of `prompts`.

    decoder: a decode.Decoder holding a plain copy of `model` (the fast path); None decodes eagerly
    with `model.generate`. caps: each prompt's own token cap (<= max_new_tokens; fast path only).
    inference_mode=False runs under no_grad instead: a model that trains afterwards must not meet
    tensors created in inference mode.
    """
    import torch

    if on_text is not None and len(prompts) != 1:
        raise ValueError("streaming needs exactly one prompt")
    check_batch_size(batch_size)
    stop, pad = stop_ids_of(model, tokenizer), tokenizer.pad_token_id
    streamer = make_streamer(tokenizer, on_text) if on_text is not None else None
    if sampling.seed is not None:
        torch.manual_seed(sampling.seed)
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    answers: list[Answer | None] = [None] * len(prompts)
    with torch.inference_mode() if inference_mode and decoder is None else torch.no_grad():
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            ids, mask = _left_padded([prompts[i] for i in idx], pad, device)
            if decoder is None:
                kwargs = sampling.generate_kwargs(stop, pad) | ({"streamer": streamer} if streamer else {})
                new = model.generate(input_ids=ids, attention_mask=mask, **kwargs)[:, ids.shape[1]:]
            else:
                new = _fast_batch(decoder, ids, mask, sampling, stop, pad, streamer,
                                  [caps[i] for i in idx] if caps is not None else None)
            for row, i in enumerate(idx):
                answers[i] = _cut(new[row].tolist()[:caps[i] if caps is not None else None], stop, tokenizer)
            if on_batch is not None:
                on_batch(len(idx))
    return answers  # type: ignore[return-value]


def _fast_batch(decoder, ids, mask, sampling: Sampling, stop: list[int], pad: int, streamer, caps):
    import torch

    on_token = None
    if streamer is not None:
        streamer.put(ids[0].cpu())  # the prompt, which the streamer skips
        on_token = lambda tokens: streamer.put(tokens.cpu())  # noqa: E731
    cap_t = torch.tensor(caps, dtype=torch.long, device=ids.device) if caps is not None else None
    new = decoder.run(ids, mask.bool(), sampling, stop, pad, caps=cap_t, on_token=on_token)
    if streamer is not None:
        streamer.end()
    return new


def fit_history(loaded, history: list[dict], max_new_tokens: int) -> tuple[list[int], int]:
    """Prompt ids for the next answer and how many old turns were dropped to fit the context.

    System messages are kept; user/assistant exchanges go oldest first. The latest user
    message always stays, even if it alone is too long (the model then sees it truncated).
    """
    limit = getattr(loaded.model.config, "max_position_embeddings", None) or 4096
    budget = max(limit - max_new_tokens, 1)
    system = [m for m in history if m["role"] == "system"]
    turns = [m for m in history if m["role"] != "system"]
    dropped = 0
    ids = loaded.chat_prompt(system + turns)
    while len(ids) > budget and len(turns) > 1:
        cut = next((i for i in range(1, len(turns)) if turns[i]["role"] == "user"), len(turns) - 1)
        turns = turns[cut:]
        dropped += 1
        ids = loaded.chat_prompt(system + turns)
    if len(ids) > budget:
        ids = ids[-budget:]
    return ids, dropped
