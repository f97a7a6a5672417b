"""Did the adapter learn? Response loss, perplexity and stop rate on held-out records.

The loss is scored on exactly the tokens training puts labels on by default: the response
tokens plus the eos that closes each response, under the adapter's own template, through the
same `encode_batch`. It is always scored that way, whatever the adapter was trained with, so
a reference-recipe adapter (labels on the prompt, no eos) and a lora-cli adapter are measured
on the same targets. `loss_text` leaves the closing eos out, for a comparison that ignores
stopping altogether. The stop rate is the share of prompts whose greedy answer ends with a
stop token within `max_new_tokens`: a model that never learned to stop rambles until the cap.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path

from lora_cli.data.records import Example, error_lines, iter_examples
from lora_cli.errors import DataError, LoraCliError
from lora_cli.infer.generation import LoadedModel, Sampling, generate
from lora_cli.progress import NULL_REPORTER

TOKEN_BUDGET = 4096  # padded tokens per loss micro-batch


@dataclass
class LossSums:
    total: float = 0.0
    n: int = 0
    text_total: float = 0.0  # the same without the eos targets
    text_n: int = 0
    truncated: int = 0
    left_out: list[int] = field(default_factory=list)  # lines of examples truncation leaves no target token


@dataclass
class EvalResult:
    data: str
    model: str
    examples: int
    response_tokens: int
    loss: float | None
    perplexity: float | None
    loss_text: float | None
    truncated: int
    stop_rate: float | None
    stopped: int
    max_new_tokens: int
    seconds: float
    answers: list[dict] = field(default_factory=list)
    sampling: dict = field(default_factory=dict)  # how the answers were picked (Sampling.to_dict); not the loss
    left_out: int = 0  # examples not scored: the prompt fills max length
    left_out_lines: list[int] = field(default_factory=list)
    generate_seconds: float = 0.0  # of `seconds`: generating the answers (warm-up included)


def read_examples(path: str | Path, answers: bool = True) -> list[Example]:
    """Every valid record, or a DataError listing each defect with its line number. answers=False
    (prompts to answer, as generate reads them): a record's 'output' may be absent; eval scores
    against it, so it keeps the default."""
    issues = []
    examples = list(iter_examples(path, on_issue=issues.append, answers=answers))
    errors = [i for i in issues if i.severity == "error"]
    if errors:
        raise DataError(f"{path} has {len(error_lines(errors))} invalid record(s); fix them first "
                        "(lora-cli validate-data).",
                        errors)
    if not examples:
        raise LoraCliError(f"{path} holds no records.")
    return examples


def _batches(lengths: list[int], budget: int) -> list[list[int]]:
    """Indices sorted by length, grouped so that each padded batch stays within `budget` tokens."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    out, cur = [], []
    for i in order:
        if cur and lengths[i] * (len(cur) + 1) > budget:
            out.append(cur)
            cur = []
        cur.append(i)
    return out + ([cur] if cur else [])


def response_loss(loaded: LoadedModel, examples: list[Example], use_adapter: bool = True,
                  budget: int = TOKEN_BUDGET, on_batch=None) -> LossSums:
    """Summed loss over response tokens (+ eos), with the adapter on or switched off."""
    import contextlib

    import torch

    from lora_cli.data.batching import collate_padded
    from lora_cli.data.tokenization import LabelPolicy, encode_batch
    from lora_cli.model.loss import token_losses

    tok, info = loaded.tokenizer, loaded.info
    base = loaded.model.get_base_model() if loaded.has_adapter else loaded.model
    encoded = encode_batch(examples, tok, loaded.template, LabelPolicy(info.max_length, False, True))
    sums = LossSums(truncated=sum(e.truncated for e in encoded), left_out=[e.line for e in encoded if e.n_targets == 0])
    switch = loaded.model.disable_adapter() if (loaded.has_adapter and not use_adapter) else contextlib.nullcontext()
    with switch, torch.inference_mode():
        for idx in _batches([len(e.input_ids) for e in encoded], budget):
            rows = [{"input_ids": encoded[i].input_ids, "labels": encoded[i].labels} for i in idx]
            mb = collate_padded(rows, tok.pad_token_id).to(loaded.device)
            losses, targets = token_losses(base, mb.input_ids, mb.attention_mask, mb.targets)
            text = targets != tok.eos_token_id
            sums.total += float(losses.sum())
            sums.n += int(losses.numel())
            sums.text_total += float(losses[text].sum())
            sums.text_n += int(text.sum())
            if on_batch is not None:
                on_batch(len(idx))
    return sums


def _answer_rows(examples: list[Example], answers) -> list[dict]:
    from lora_cli.data.tokenization import reference_answer

    rows = []
    for ex, ans in zip(examples, answers):
        users = [m["content"] for m in (ex.messages or [])[:-1] if m["role"] == "user"]
        prompt = (users[-1] if users else "") if ex.is_chat else ex.instruction
        rows.append({"line": ex.line, "prompt": prompt, "input": ex.input, "reference": reference_answer(ex),
                     "answer": ans.text, "stopped": ans.stopped, "new_tokens": len(ans.token_ids)})
    return rows


def evaluate(loaded: LoadedModel, examples: list[Example], data_name: str, max_new_tokens: int = 128,
             batch_size: int = 8, use_adapter: bool = True, stop_rate: bool = True,
             reporter=NULL_REPORTER, sampling: Sampling | None = None) -> EvalResult:
    """Loss and perplexity on response tokens, then (unless `stop_rate=False`) answers: greedy, or as
    `sampling` says (its max_new_tokens wins). The loss is teacher-forced: no sampling option changes it."""
    t0 = time.time()
    loaded.check_records(examples, data_name)
    sampling = sampling or Sampling(max_new_tokens=max_new_tokens)
    max_new_tokens = sampling.max_new_tokens
    label = str(loaded.info.path) if (use_adapter and loaded.has_adapter) else f"{loaded.info.base_model} (base)"
    with reporter.stage("Scoring responses", total=len(examples), unit="records") as bar:
        sums = response_loss(loaded, examples, use_adapter, on_batch=bar.update)
    if sums.left_out:
        from lora_cli.data.tokenization import left_out_note

        reporter.message(left_out_note(len(sums.left_out), sums.left_out, loaded.info.max_length, purpose="score"))
    loss = sums.total / sums.n if sums.n else None
    answers, stopped, t_gen = [], 0, time.time()
    if stop_rate:
        prompts = [loaded.example_prompt(ex) for ex in examples]
        how = "greedy" if sampling.greedy else "sampled"
        with reporter.stage(f"Generating ({how}, up to {max_new_tokens} tokens)", total=len(examples),
                            unit="answers") as bar:
            gen = generate(loaded, prompts, sampling, batch_size, use_adapter=use_adapter, on_batch=bar.update)
        stopped = sum(a.stopped for a in gen)
        answers = _answer_rows(examples, gen)
    return EvalResult(
        data=data_name, model=label, examples=len(examples), response_tokens=sums.n, loss=loss,
        perplexity=math.exp(loss) if loss is not None and loss < 700 else None,
        loss_text=sums.text_total / sums.text_n if sums.text_n else None, truncated=sums.truncated,
        stop_rate=stopped / len(examples) if stop_rate else None, stopped=stopped, max_new_tokens=max_new_tokens,
        seconds=round(time.time() - t0, 2), answers=answers, sampling=sampling.to_dict() if stop_rate else {},
        left_out=len(sums.left_out), left_out_lines=sums.left_out[:100],
        generate_seconds=round(time.time() - t_gen, 2) if stop_rate else 0.0)
