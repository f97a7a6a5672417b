"""The stop rate during training: greedy answers for the first K val prompts at each evaluation.

The eval loss does not show whether the model has learned to stop; generating does. At each
evaluation the model being trained answers the first K valid records of the val file, greedily,
prompted exactly as `generate` and `eval` prompt them. The stop rate is the share of answers that
end with eos within the cap; the first answer is kept as a sample.

The cap (max new tokens) is twice the longest of those K reference answers, in tokens with the
eos, at least 16 and at most --max-length (training never sees a longer response): an answer
still going at twice the length of the longest real one is counted as one that does not stop.

The model is the training model itself (peft, maybe compiled and wrapped for several
processes): generation runs on the unwrapped peft model, in eval mode (no dropout, no NEFTune
noise), without gradients, eagerly (compiled layers would recompile for every new length), and
train mode is restored after. The RNG state is put back too, so a run with and without the probe
trains identically. With several processes only the main process generates; the others wait at
a barrier. Under FSDP the weights are sharded over the processes and the probe is off.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass

from lora_cli.config import RunConfig
from lora_cli.progress import NULL_REPORTER

MIN_NEW_TOKENS = 16


@dataclass(frozen=True)
class ProbeResult:
    stopped: int
    prompts: int
    max_new_tokens: int
    sample: str  # the answer to the first prompt
    sample_stopped: bool
    seconds: float

    @property
    def stop_rate(self) -> float:
        return self.stopped / self.prompts if self.prompts else 0.0

    def row(self) -> dict:
        """The fields it adds to the evaluation's line of metrics.jsonl."""
        return {"stop_rate": self.stop_rate, "stopped": self.stopped, "generated": self.prompts,
                "max_new_tokens": self.max_new_tokens, "generate_s": round(self.seconds, 2), "sample": self.sample,
                "sample_stopped": self.sample_stopped}

    def line(self, limit: int = 160) -> str:
        sample = " ".join(self.sample.split())
        sample = sample if len(sample) <= limit else sample[:limit].rstrip() + " [...]"
        ending = "eos" if self.sample_stopped else "no eos"
        return (f"stop rate {self.stopped}/{self.prompts} (greedy, up to {self.max_new_tokens} new tokens, "
                f"{self.seconds:.1f} s); first answer ({ending}): {sample}")


def _eager():
    """Run compiled layers eagerly for a while (torch >= 2.6), so generation does not recompile them."""
    import torch

    set_stance = getattr(torch.compiler, "set_stance", None)
    return set_stance("force_eager") if set_stance is not None else contextlib.nullcontext()


class StopProbe:
    """Greedy answers for fixed val prompts, at each evaluation (see the module docstring)."""

    def __init__(self, prompts: list[list[int]], max_new_tokens: int, tokenizer):
        self.prompts, self.max_new_tokens, self.tokenizer = prompts, max_new_tokens, tokenizer

    @classmethod
    def build(cls, cfg: RunConfig, tokenizer, fsdp: bool = False, reporter=NULL_REPORTER) -> "StopProbe | None":
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
        examples, template = [], get_template(cfg.data.template)
        for example in iter_examples(cfg.data.val, on_issue=lambda issue: None):
            # a record training left out (--skip-invalid) because the template refuses it: not asked either
            if not template_issues([example], tokenizer, template, cfg.data.val):
                examples.append(example)
            if len(examples) == k:
                break
        if not examples:
            return None
        prompts = [encode_example_prompt(ex, tokenizer, template, cfg.data.add_eos) for ex in examples]
        answers = tokenizer([reference_answer(ex) for ex in examples], add_special_tokens=False)["input_ids"]
        longest = max(len(ids) + 1 for ids in answers)  # + the eos that closes a response
        cap = min(cfg.data.max_length, max(MIN_NEW_TOKENS, 2 * longest))
        return cls(prompts, cap, tokenizer)

    def run(self, peft_model, placement) -> ProbeResult | None:
        """Answer the prompts with the model being trained (main process; None elsewhere)."""
        import torch

        from lora_cli.infer.generation import Sampling, generate_with

        result = None
        if placement.is_main:
            t0 = time.time()
            rng = torch.get_rng_state()
            cuda_rng = torch.cuda.get_rng_state_all() if placement.on_cuda else None
            was_training = peft_model.training
            peft_model.eval()
            try:
                with _eager(), placement.accelerator.autocast():
                    answers = generate_with(peft_model, self.tokenizer, placement.device, self.prompts,
                                            Sampling(max_new_tokens=self.max_new_tokens),
                                            batch_size=len(self.prompts), inference_mode=False)
            finally:
                peft_model.train(was_training)
                torch.set_rng_state(rng)
                if cuda_rng is not None:
                    torch.cuda.set_rng_state_all(cuda_rng)
            result = ProbeResult(sum(a.stopped for a in answers), len(answers), self.max_new_tokens,
                                 answers[0].text, answers[0].stopped, time.time() - t0)
        placement.accelerator.wait_for_everyone()
        return result
