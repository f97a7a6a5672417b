"""The stop rate during training: greedy answers for the first K val prompts at each evaluation.

The eval loss does not show whether the model has learned to stop; generating does (docs/TRAINING.md).
The first K valid val records are prompted as `generate` prompts them, all in one batch; each answer
is capped at CAP_FACTOR times its reference answer (with its eos), at least 16 and at most --max-length:
an answer still going that far past the real one is counted as not stopping. The answers come from
the fast decoding path (infer/decode.py: a plain copy of the model, refreshed in place at each
evaluation, its warm-up paid once per command and said; docs/PERFORMANCE.md); where no copy can be
made, eagerly on the peft model in eval mode, said once. Training's RNG state is put back, so a run
trains identically with and without the probe. Only the main process generates (the others wait at
a barrier); under FSDP the probe is off.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from lora_cli.config import RunConfig
from lora_cli.progress import NULL_REPORTER

if TYPE_CHECKING:
    from peft import PeftModel
    from transformers import PreTrainedTokenizerBase

    from lora_cli.infer.decode import Decoder
    from lora_cli.infer.generation import Answer
    from lora_cli.progress import Reporter
    from lora_cli.train.runtime import Placement

MIN_NEW_TOKENS = 16
CAP_FACTOR = 1.5  # an answer's cap, in multiples of its reference answer (see the module docstring)
GPU_MEMORY_SHARE = 3  # the copy may take at most 1/3 of the GPU memory free when it is built: training needs the rest


@dataclass(frozen=True)
class ProbeResult:
    stopped: int
    prompts: int
    max_new_tokens: int
    sample: str  # the answer to the first prompt
    sample_stopped: bool
    seconds: float
    warmup_seconds: float = 0.0  # of `seconds`: building the copy and capturing the decode step (first evaluation)

    def row(self) -> dict:
        """The fields it adds to the evaluation's line of metrics.jsonl."""
        return {"stop_rate": self.stopped / self.prompts if self.prompts else 0.0, "stopped": self.stopped, "generated": self.prompts,
                "max_new_tokens": self.max_new_tokens, "generate_s": round(self.seconds, 2),
                "generate_warmup_s": round(self.warmup_seconds, 4), "sample": self.sample,
                "sample_stopped": self.sample_stopped}

    def line(self, limit: int = 160) -> str:
        sample = " ".join(self.sample.split())
        sample = sample if len(sample) <= limit else sample[:limit].rstrip() + " [...]"
        ending = "eos" if self.sample_stopped else "no eos"
        warm = f", of which {self.warmup_seconds:.1f} s warm-up" if self.warmup_seconds >= 0.05 else ""
        return (f"stop rate {self.stopped}/{self.prompts} (greedy, up to {self.max_new_tokens} new tokens, "
                f"probe {self.seconds:.1f} s{warm}); first answer ({ending}): {sample}")


def answer_cap(reference_tokens: int, max_length: int) -> int:
    """New-token cap of one probe answer: CAP_FACTOR x (reference + its eos), at least 16, at most max_length."""
    return min(max_length, max(MIN_NEW_TOKENS, math.ceil(CAP_FACTOR * (reference_tokens + 1))))


def _eager() -> contextlib.AbstractContextManager[None]:
    """Run compiled layers eagerly for a while (torch >= 2.6), so generation does not recompile them."""
    import torch

    set_stance = getattr(torch.compiler, "set_stance", None)
    return set_stance("force_eager") if set_stance is not None else contextlib.nullcontext()


class StopProbe:
    """Greedy answers for fixed val prompts, at each evaluation (see the module docstring)."""

    def __init__(self, prompts: list[list[int]], caps: list[int], tokenizer: PreTrainedTokenizerBase,
                 reporter: Reporter = NULL_REPORTER) -> None:
        self.prompts, self.caps, self.tokenizer, self.reporter = prompts, caps, tokenizer, reporter
        self.max_new_tokens = max(caps)
        self.decoder: Decoder | Literal[False] | None = None  # decode.Decoder on a plain copy; False once the probe generates eagerly
        self.seconds = 0.0  # spent probing in this command, warm-up included

    @classmethod
    def build(cls, cfg: RunConfig, tokenizer: PreTrainedTokenizerBase, fsdp: bool = False,
              reporter: Reporter = NULL_REPORTER) -> StopProbe | None:
        """The probe of a run: None when --eval-generate is 0, there is no --val, or FSDP shards the model."""
        from lora_cli.data.records import iter_examples
        from lora_cli.data.templates import get_template
        from lora_cli.data.tokenization import encode_example_prompt, reference_answer, template_issues

        k = cfg.train.eval_generate
        if not k or not cfg.data.val:
            return None
        if fsdp:
            reporter.message("--eval-generate is off under --fsdp: the weights are sharded over the processes, and "
                             "generating needs them whole. Run lora-cli eval on the adapter instead.")
            return None
        template = get_template(cfg.data.template)
        # a record training left out (--skip-invalid) because the template refuses it: not asked either
        asked = (ex for ex in iter_examples(cfg.data.val, on_issue=lambda issue: None)
                 if not template_issues([ex], tokenizer, template, cfg.data.val))
        examples = list(itertools.islice(asked, k))
        if not examples:
            return None
        prompts = [encode_example_prompt(ex, tokenizer, template, cfg.data.add_eos) for ex in examples]
        answers = tokenizer([reference_answer(ex) for ex in examples], add_special_tokens=False)["input_ids"]
        caps = [answer_cap(len(ids), cfg.data.max_length) for ids in answers]
        return cls(prompts, caps, tokenizer, reporter)

    def _decoder(self, peft_model: PeftModel, placement: Placement) -> Decoder | None:
        """The fast path's Decoder, its copy holding the current weights; None: generate eagerly."""
        import torch

        from lora_cli.infer.decode import build_decoder
        from lora_cli.infer.plain_copy import copy_bytes, refresh
        from lora_cli.model.device import torch_dtype

        dtype = torch_dtype(placement.precision)
        if self.decoder:
            refresh(self.decoder.model, peft_model)
        elif self.decoder is None:
            reason = None
            if placement.on_cuda:
                free = torch.cuda.mem_get_info(placement.device)[0]
                need = copy_bytes(peft_model, dtype)
                if need * GPU_MEMORY_SHARE > free:
                    reason = (f"a {need / 2**30:.1f} GiB copy of the model would take over 1/{GPU_MEMORY_SHARE} "
                              f"of the {free / 2**30:.1f} GiB free on the GPU")
            if reason is None:
                self.decoder, reason = build_decoder(peft_model, placement.device, dtype)
            if reason:
                self.decoder = False
                self.reporter.message(f"The stop-rate probe generates eagerly (slower): {reason}.")
        return self.decoder or None

    def run(self, peft_model: PeftModel, placement: Placement) -> ProbeResult | None:
        """Answer the prompts with the model being trained (main process; None elsewhere)."""
        import torch

        result = None
        if placement.is_main:
            t0, first = time.time(), self.decoder is None
            with torch.random.fork_rng(devices=range(torch.cuda.device_count()) if placement.on_cuda else []):
                decoder = self._decoder(peft_model, placement)
                answers = self._answers(peft_model, placement, decoder)
            seconds = time.time() - t0
            self.seconds += seconds
            warmup = decoder.warmup_seconds if (first and decoder is not None) else 0.0
            for note in decoder.take_notes() if decoder is not None else []:  # a slower step or a failed capture
                self.reporter.message(f"The stop-rate probe: {note}.")
            result = ProbeResult(sum(a.stopped for a in answers), len(answers), self.max_new_tokens,
                                 answers[0].text, answers[0].stopped, seconds, warmup)
        placement.accelerator.wait_for_everyone()
        if placement.world_size > 1:  # every process decides early stopping (--select-by stop-rate) alike
            from accelerate.utils import broadcast_object_list

            result = broadcast_object_list([result], from_process=0)[0]
        return result

    def _answers(self, peft_model: PeftModel, placement: Placement, decoder: Decoder | None) -> list[Answer]:
        from lora_cli.infer.generation import Sampling, generate_with

        sampling = Sampling(max_new_tokens=self.max_new_tokens)
        if decoder is not None:
            return generate_with(decoder.model, self.tokenizer, placement.device, self.prompts, sampling,
                                 batch_size=len(self.prompts), decoder=decoder, caps=self.caps)
        was_training = peft_model.training
        peft_model.eval()
        try:
            with _eager(), placement.accelerator.autocast():
                return generate_with(peft_model, self.tokenizer, placement.device, self.prompts, sampling,
                                     batch_size=len(self.prompts), inference_mode=False, caps=self.caps)
        finally:
            peft_model.train(was_training)
