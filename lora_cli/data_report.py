"""The validate-data report: defects, duplicates and length statistics of one file.

Duplicates and percentiles need something per record; we keep 8-byte digests, 4-byte line
numbers and 4-byte lengths in flat arrays (16 bytes a record, ~16 MB per million lines)
rather than Python objects, so a multi-million-line file validates in a small, near-constant
footprint. Token lengths (with --model) are computed in batches through the fast tokenizer.
"""

from __future__ import annotations

import hashlib
from array import array
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from lora_cli.records import Example, Issue, ScanStats, iter_examples

MAX_KEPT_ISSUES = 1000  # kept for --json; the terminal stream shows every one


@dataclass
class LengthStats:
    unit: str
    count: int = 0
    mean: float = 0.0
    p50: float = 0.0
    p90: float = 0.0
    max: int = 0

    @classmethod
    def from_array(cls, values: array, unit: str) -> "LengthStats":
        import numpy as np

        if len(values) == 0:
            return cls(unit)
        arr = np.frombuffer(values, dtype=np.uint32)
        return cls(unit, int(arr.size), float(arr.mean()), float(np.percentile(arr, 50)),
                   float(np.percentile(arr, 90)), int(arr.max()))


@dataclass
class DataReport:
    file: str
    records: int = 0
    valid: int = 0
    chat: int = 0
    errors: int = 0
    warnings: int = 0
    issues: list[Issue] = field(default_factory=list)
    issues_dropped: int = 0
    chars: LengthStats | None = None
    tokens: LengthStats | None = None
    max_length: int | None = None
    truncated: int = 0

    @property
    def clean(self) -> bool:
        return self.errors == 0

    def to_dict(self) -> dict:
        def stats(s):
            return None if s is None else {k: getattr(s, k) for k in ("unit", "count", "mean", "p50", "p90", "max")}

        return {
            "file": self.file, "records": self.records, "valid": self.valid, "invalid": self.records - self.valid,
            "chat_records": self.chat, "errors": self.errors, "warnings": self.warnings,
            "issues": [i.to_dict() for i in self.issues], "issues_not_listed": self.issues_dropped,
            "length_chars": stats(self.chars), "length_tokens": stats(self.tokens),
            "max_length": self.max_length, "would_truncate": self.truncated if self.tokens else None,
        }


def _digest(example: Example) -> int:
    return int.from_bytes(hashlib.blake2b(example.identity().encode("utf-8"), digest_size=8).digest(), "little")


def _duplicate_issues(file: str, digests: array, lines: array) -> list[Issue]:
    import numpy as np

    if len(digests) < 2:
        return []
    d = np.frombuffer(digests, dtype=np.uint64)
    ln = np.frombuffer(lines, dtype=np.uint32)
    order = np.lexsort((ln, d))  # by digest, then by line
    sd, sl = d[order], ln[order]
    starts = np.ones(len(sd), dtype=bool)
    starts[1:] = sd[1:] != sd[:-1]
    group_first = np.maximum.accumulate(np.where(starts, np.arange(len(sd)), 0))
    dup = np.flatnonzero(~starts)
    found = list(zip(sl[dup].tolist(), sl[group_first[dup]].tolist()))
    found.sort()
    return [Issue(file, line, "", f"duplicate of line {orig}", "warning") for line, orig in found]


def validate_file(
    path: str | Path,
    on_issue: Callable[[Issue], None] | None = None,
    token_lengths: Callable[[list[Example]], list[int]] | None = None,
    max_length: int | None = None,
    on_progress: Callable[[int], None] | None = None,
) -> DataReport:
    """Stream `path` once; report every defect through `on_issue` as it is found."""
    path = Path(path)
    report = DataReport(str(path), max_length=max_length)
    stats = ScanStats(str(path))
    digests, lines, chars, tokens = array("Q"), array("I"), array("I"), array("I")
    pending: list[Example] = []

    def keep(issue: Issue) -> None:
        if len(report.issues) < MAX_KEPT_ISSUES:
            report.issues.append(issue)
        else:
            report.issues_dropped += 1
        if on_issue is not None:
            on_issue(issue)

    def flush() -> None:
        if pending and token_lengths is not None:
            tokens.extend(min(n, 2**32 - 1) for n in token_lengths(pending))
        pending.clear()

    for example in iter_examples(path, on_issue=keep, stats=stats):
        digests.append(_digest(example))
        lines.append(example.line)
        chars.append(min(example.char_length(), 2**32 - 1))
        if token_lengths is not None:
            pending.append(example)
            if len(pending) >= 512:
                flush()
        if on_progress is not None and stats.records % 10000 == 0:
            on_progress(stats.records)
    flush()
    for dup in _duplicate_issues(str(path), digests, lines):
        keep(dup)
        report.warnings += 1
    report.records, report.valid, report.chat, report.errors = stats.records, stats.valid, stats.chat, stats.errors
    report.chars = LengthStats.from_array(chars, "chars")
    if token_lengths is not None:
        report.tokens = LengthStats.from_array(tokens, "tokens")
        if max_length:
            import numpy as np

            report.truncated = int((np.frombuffer(tokens, dtype=np.uint32) > max_length).sum()) if len(tokens) else 0
    return report
