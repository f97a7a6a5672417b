"""Does the exported model behave, in the runtime it is for, as the trained model did? A measurement.

The trained model (base + adapter, loaded as `lora-cli eval` loads it) and the export (an
Artifact in a Runtime) are compared on held-out records, three ways:
(a) prompt tokens: the ids the runtime gets from the prompt its template renders (the GGUF's
    chat template, or the Modelfile's TEMPLATE) against the ids training put before the answer,
    exactly. A difference is named: "BOS" (the same ids but for a lost or doubled BOS),
    "tokenizer" (the same text, other ids) or "template" (other text);
(b) teacher-forced next-token agreement: both models read training's own ids (prompt, reference
    answer, eos) and the argmax of their logits is compared at every position; also the largest
    logit difference relative to the largest reference logit. This isolates numerics (dtype,
    quantization, the adapter on another base) from prompting;
(c) greedy answers (argmax, up to max_new_tokens) from each side's own prompt ids, and the stop
    rate: the share of answers that end on a stop (an end-of-generation token, or a Modelfile
    stop text) in time. The check also reads the stop configuration: the eos the model was
    trained to end with must stop generation ("eos").
The verdict is pass, warn or fail, with each reason's kind: template, BOS, tokenizer, eos, numerics;
agreement is held to AGREEMENT by weight type (WARN_MARGIN below it warns), the stop rates to STOP_SLACK.

Runtime-independent: a Runtime (check_runtimes.py) is anything with tokenize, detokenize, logits,
greedy, stop_ids, add_bos and bos_text.
"""

from __future__ import annotations

import itertools
import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np

from lora_cli.atomic import write_text
from lora_cli.data.chat_template import user_content
from lora_cli.data.tokenization import LabelPolicy, encode_batch, encode_example_prompt, special_prefix
from lora_cli.progress import NULL_REPORTER

AGREEMENT = {"F32": 0.99, "F16": 0.99, "BF16": 0.99, "Q8_0": 0.97}
OTHER_AGREEMENT, WARN_MARGIN, STOP_SLACK = 0.90, 0.05, 2


class Runtime(Protocol):
    name: str
    stop_ids: list[int]  # ids generation ends on
    add_bos: bool  # the runtime puts a BOS before a tokenized prompt
    bos_id: int | None
    bos_text: str

    def tokenize(self, text: str) -> list[int]: ...  # a prompt: BOS if add_bos, special tokens parsed

    def detokenize(self, ids: list[int]) -> str: ...  # special tokens as text

    def logits(self, ids: list[int]): ...  # [len(ids), vocab] numpy: next-token logits at each position

    def greedy(self, ids: list[int], max_new_tokens: int, stop_texts: list[str]): ...  # check_runtimes.Generation


@dataclass
class Reason:
    level: str  # warn | fail
    kind: str  # template | BOS | tokenizer | eos | numerics
    message: str


@dataclass
class RecordResult:
    line: int
    prompt_identical: bool
    prompt_fault: str  # "" or template | BOS | tokenizer
    agree: int
    positions: int
    trained_answer: str
    export_answer: str
    trained_stopped: bool
    export_stopped: bool
    answers_identical: bool
    shared_prefix: float  # share of the longer answer's text before the first difference


@dataclass
class CheckReport:
    artifact: str
    kind: str
    weight_type: str
    runtime: str
    reference: str
    data: str
    records: int = 0
    prompts_identical: int = 0
    agree: int = 0
    positions: int = 0
    max_logit_diff: float = 0.0  # largest |export - trained| logit over the largest |trained| logit
    answers_identical: int = 0
    mean_shared_prefix: float = 0.0
    trained_stopped: int = 0
    export_stopped: int = 0
    max_new_tokens: int = 0
    agreement_target: float = 0.0
    verdict: str = "pass"
    reasons: list[Reason] = field(default_factory=list)
    rows: list[RecordResult] = field(default_factory=list)
    seconds: float = 0.0
    report_file: str = ""  # where write_report put the JSON

    @property
    def agreement(self) -> float:
        return self.agree / self.positions if self.positions else 0.0

    def to_dict(self) -> dict:
        return dict(asdict(self), agreement=self.agreement)


def _messages(example, template) -> list[dict]:
    """The conversation sent to the export for a record: user messages mapped as the export maps them."""
    if not example.is_chat:
        return [{"role": "user", "content": user_content(template, example.instruction, example.input)}]
    out: list[dict] = []
    for role, turn in itertools.groupby(list(example.messages or [])[:-1], key=lambda m: m["role"]):
        contents = [m["content"] for m in turn]  # consecutive user messages joined first, as training joins them
        out += [{"role": role, "content": user_content(template, "\n\n".join(contents), "")}] if role == "user" \
            else [{"role": role, "content": content} for content in contents]
    return out


def export_prompt(artifact, runtime: Runtime, example, template, trained_text: str) -> list[int]:
    """The ids the runtime gets for a record's prompt. gguf-lora carries no template: the training prompt's text."""
    if artifact.kind == "gguf-lora":
        return runtime.tokenize(trained_text)
    text = artifact.render(_messages(example, template))
    if artifact.strip_bos_text and runtime.add_bos and runtime.bos_text and text.startswith(runtime.bos_text):
        text = text[len(runtime.bos_text):]
    return runtime.tokenize(text)


def prompt_fault(trained: list[int], export: list[int], bos_id, trained_text, export_text) -> str:
    """Why two prompts' ids differ: BOS, tokenizer or template ("" when they are identical)."""
    if trained == export:
        return ""

    def strip(ids):
        return list(itertools.dropwhile(lambda i: i == bos_id, ids))

    if bos_id is not None and strip(trained) == strip(export):
        return "BOS"
    return "tokenizer" if trained_text(strip(trained)) == export_text(strip(export)) else "template"


def _shared_prefix(a: str, b: str) -> float:
    return len(os.path.commonprefix([a, b])) / max(len(a), len(b)) if a or b else 1.0


def _teacher_forced(runtime: Runtime, reference: Runtime, ids: list[int]) -> tuple[int, float]:
    got, ref = runtime.logits(ids), reference.logits(ids)
    vocab = min(got.shape[-1], ref.shape[-1])  # a GGUF may pad the vocabulary to the embedding rows
    got, ref = got[:, :vocab], ref[:, :vocab]
    agree = int((got.argmax(-1) == ref.argmax(-1)).sum())
    return agree, float(np.abs(got - ref).max() / max(float(np.abs(ref).max()), 1e-9))


def check_export(artifact, runtime: Runtime, reference: Runtime, tokenizer, template, examples, *,
                 add_eos: bool = True, max_length: int = 512, max_new_tokens: int = 64, data: str = "",
                 reporter=NULL_REPORTER) -> CheckReport:
    """Compare `runtime` running `artifact` with `reference` (the trained model) on `examples`.

    tokenizer, template, add_eos, max_length: the trained model's, as training used them (they
    give the prompt ids and the teacher-forced sequences). Returns the report with its verdict.
    """
    t0 = time.time()
    report = CheckReport(str(artifact.path), artifact.kind, artifact.weight_type, runtime.name, reference.name, data,
                         max_new_tokens=max_new_tokens,
                         agreement_target=AGREEMENT.get(artifact.weight_type.upper(), OTHER_AGREEMENT))
    sequences = encode_batch(examples, tokenizer, template, LabelPolicy(max_length, False, add_eos))
    prefix = len(special_prefix(tokenizer))

    def trained_text(ids):
        return tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)

    with reporter.stage(f"Comparing {artifact.kind} in {runtime.name} with the trained model", total=len(examples),
                        unit="records") as bar:
        for example, encoded in zip(examples, sequences):
            trained = encode_example_prompt(example, tokenizer, template, add_eos)
            exported = export_prompt(artifact, runtime, example, template, trained_text(trained[prefix:]))
            fault = prompt_fault(trained, exported, runtime.bos_id, trained_text, runtime.detokenize)
            agree, diff = _teacher_forced(runtime, reference, encoded.input_ids)
            mine = reference.greedy(trained, max_new_tokens, [])
            theirs = runtime.greedy(exported, max_new_tokens, artifact.stop_texts)
            report.rows.append(RecordResult(example.line, not fault, fault, agree, len(encoded.input_ids), mine.text,
                                            theirs.text, mine.stopped, theirs.stopped, mine.text == theirs.text,
                                            _shared_prefix(mine.text, theirs.text)))
            report.max_logit_diff = max(report.max_logit_diff, diff)
            bar.update(1)
    _totals(report)
    report.reasons = verdict_reasons(report, artifact, runtime, reference, tokenizer)
    report.verdict = "fail" if any(r.level == "fail" for r in report.reasons) else \
        "warn" if report.reasons else "pass"
    report.seconds = round(time.time() - t0, 2)
    return report


def _totals(report: CheckReport) -> None:
    rows = report.rows
    report.records = len(rows)
    report.prompts_identical = sum(r.prompt_identical for r in rows)
    report.agree, report.positions = sum(r.agree for r in rows), sum(r.positions for r in rows)
    report.answers_identical = sum(r.answers_identical for r in rows)
    report.mean_shared_prefix = sum(r.shared_prefix for r in rows) / len(rows) if rows else 0.0
    report.trained_stopped = sum(r.trained_stopped for r in rows)
    report.export_stopped = sum(r.export_stopped for r in rows)


def eos_reasons(artifact, runtime: Runtime, reference: Runtime, tokenizer) -> list[Reason]:
    """Each end token the trained model stops on must stop the export too (the Modelfile's stops, for Ollama)."""
    out = []
    for token_id in reference.stop_ids:
        text = tokenizer.convert_ids_to_tokens(token_id)
        by_token = token_id in runtime.stop_ids
        if artifact.kind == "ollama" and text not in artifact.stop_texts:
            level = "warn" if by_token else "fail"
            tail = (" Ollama still stops on it as a GGUF end-of-generation token, a runtime that reads only the "
                    "stop parameters does not.") if by_token else " Nothing else stops generation on it either."
            out.append(Reason(level, "eos", f"The Modelfile's stop parameters lack {text!r}, the end token the "
                                            f"model was trained to close its answers with.{tail}"))
        elif artifact.kind != "ollama" and not by_token:
            out.append(Reason("fail", "eos", f"{runtime.name} does not end generation on {text!r} (id {token_id}), "
                                             "the end token the model was trained to close its answers with."))
    return out


def verdict_reasons(report: CheckReport, artifact, runtime: Runtime, reference: Runtime, tokenizer) -> list[Reason]:
    reasons = []
    for kind in ("template", "BOS", "tokenizer"):
        hit = [r.line for r in report.rows if r.prompt_fault == kind]
        if hit:
            what = {"template": "renders other text than the training prompt",
                    "BOS": "differs from the training prompt in its BOS (lost or doubled)",
                    "tokenizer": "renders the training prompt's text but tokenizes it into other ids"}[kind]
            reasons.append(Reason("fail", kind, f"The exported prompt {what} for {len(hit)} of {report.records} "
                                                f"records (lines {', '.join(map(str, hit[:5]))})."))
    reasons += eos_reasons(artifact, runtime, reference, tokenizer)
    target = report.agreement_target
    if report.positions and report.agreement < target:
        level = "warn" if report.agreement >= target - WARN_MARGIN else "fail"
        lora = (f" The adapter runs on the base GGUF's {artifact.weight_type} weights, not on the ones it was trained "
                "against; --format gguf merges it into those.") if artifact.kind == "gguf-lora" else ""
        reasons.append(Reason(level, "numerics", f"Teacher-forced next-token agreement {report.agreement:.1%} is "
                                                 f"below the {target:.0%} expected of {artifact.weight_type} weights."
                                                 + lora))
    gap = report.export_stopped - report.trained_stopped
    if abs(gap) > STOP_SLACK:
        kind = "eos" if any(r.kind == "eos" for r in reasons) else \
            next((r.kind for r in reasons), "numerics")
        reasons.append(Reason("fail", kind, f"The export stops on {report.export_stopped} of {report.records} "
                                            f"prompts, the trained model on {report.trained_stopped} (more than "
                                            f"{STOP_SLACK} apart)."))
    return reasons


def write_report(report: CheckReport) -> str:
    """Write the JSON report beside the artifact (model.gguf -> model.gguf.check.json); returns its path."""
    artifact = Path(report.artifact)
    path = artifact.parent / (artifact.name + ".check.json")
    write_text(path, json.dumps(report.to_dict(), indent=2, ensure_ascii=False) + "\n")
    return str(path)
