"""The validate-data report: defects, duplicates and length statistics of one file.

Memory does not grow with the file. Lengths are counted in a histogram (one entry per
distinct length, not per record; percentiles from it are exact), and duplicates are found by
`DuplicateFinder`, which keeps a fixed number of 8-byte digests in memory and spills the rest
to disk. Token lengths (with --model) are computed in batches through the fast tokenizer, with
the examples that --max-length would leave without a trained token (the first line numbers kept).
A file that is not JSON Lines at all (compressed, binary, another encoding) is one error.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import asdict, dataclass, field
from itertools import accumulate
from pathlib import Path
from typing import Callable

from lora_cli.data.duplicates import DuplicateFinder
from lora_cli.data.file_kinds import NOT_JSONL, NotJsonLines
from lora_cli.data.overlap import RecordDigests, digest, shared
from lora_cli.data.records import Example, Issue, ScanStats, iter_examples
from lora_cli.data.tokenization import apply_or_reject

MAX_KEPT_ISSUES = 1000  # kept for --json; the terminal stream shows every one
MAX_LEFT_OUT_LINES = 100  # line numbers of left-out examples kept


@dataclass
class LengthStats:
    unit: str
    count: int = 0
    mean: float = 0.0
    p50: float = 0.0
    p90: float = 0.0
    max: int = 0

    @classmethod
    def from_counts(cls, counts: Counter, unit: str) -> "LengthStats":
        """Exact statistics from a histogram {length: records}; percentiles as numpy's default
        (linear interpolation between the two nearest ranks)."""
        n = sum(counts.values())
        if n == 0:
            return cls(unit)
        values = sorted(counts)
        cumulative = list(accumulate(counts[v] for v in values))
        mean = sum(v * c for v, c in counts.items()) / n
        return cls(unit, n, mean, _percentile(values, cumulative, n, 50), _percentile(values, cumulative, n, 90),
                   int(values[-1]))


def _percentile(values: list[int], cumulative: list[int], n: int, q: float) -> float:
    import bisect

    pos = (n - 1) * (q / 100)
    lo, hi = math.floor(pos), math.ceil(pos)
    at = lambda rank: values[bisect.bisect_right(cumulative, rank)]  # noqa: E731  (rank is 0-based)
    v_lo, v_hi, t = float(at(lo)), float(at(hi)), pos - lo
    # numpy's lerp, so the numbers match np.percentile's to the last bit
    return v_hi - (v_hi - v_lo) * (1 - t) if t >= 0.5 else v_lo + (v_hi - v_lo) * t


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
    left_out: int = 0
    left_out_lines: list[int] = field(default_factory=list)
    lost_eos: int = 0  # cut by max_length after their first trained token: they train without their eos
    lost_eos_lines: list[int] = field(default_factory=list)
    digests: RecordDigests = field(default_factory=RecordDigests, repr=False)  # for records shared across files

    def to_dict(self) -> dict:
        return {
            "file": self.file, "records": self.records, "valid": self.valid, "invalid": self.records - self.valid,
            "chat_records": self.chat, "errors": self.errors, "warnings": self.warnings,
            "issues": [asdict(i) for i in self.issues], "issues_not_listed": self.issues_dropped,
            "length_chars": self.chars and asdict(self.chars), "length_tokens": self.tokens and asdict(self.tokens),
            "max_length": self.max_length, "would_truncate": self.truncated if self.tokens else None,
            "would_leave_out": self.left_out if self.tokens else None,
            "left_out_lines": self.left_out_lines if self.tokens else None,
            "would_lose_eos": self.lost_eos if self.tokens else None,
            "lost_eos_lines": self.lost_eos_lines if self.tokens else None,
        }


def validate_file(
    path: str | Path,
    on_issue: Callable[[Issue], None] | None = None,
    token_counts: Callable[[list[Example]], list] | None = None,
    max_length: int | None = None,
) -> DataReport:
    """Stream `path` once; report every defect through `on_issue` as it is found.

    `token_counts` (tokenization.token_counts bound to a tokenizer and template) adds token
    statistics and the examples --max-length would leave out."""
    path = Path(path)
    report = DataReport(str(path), max_length=max_length)
    stats = ScanStats()
    finder, chars, tokens = DuplicateFinder(), Counter(), Counter()
    pending: list[Example] = []

    def keep(issue: Issue) -> None:
        if issue.severity == "error":
            report.errors += 1
        else:
            report.warnings += 1
        if len(report.issues) < MAX_KEPT_ISSUES:
            report.issues.append(issue)
        else:
            report.issues_dropped += 1
        if on_issue is not None:
            on_issue(issue)

    rejected = 0

    def flush() -> None:
        nonlocal rejected
        if pending:
            counts, refused = apply_or_reject(pending, token_counts, str(path))
            _tally(report, tokens, counts)
            for issue in refused:  # valid JSON the template cannot render: an error of that line
                keep(issue)
            rejected += len(refused)
        pending.clear()

    try:
        for example in iter_examples(path, on_issue=keep, stats=stats):
            finder.add(digest(example), example.line)
            report.digests.add(example)
            chars[example.char_length()] += 1
            if token_counts is not None:
                pending.append(example)
                if len(pending) >= 512:
                    flush()
        flush()
        for line, orig in finder.pairs():
            keep(Issue(str(path), line, "", f"duplicate of line {orig}", "warning"))
    except NotJsonLines as exc:  # the whole file: one error, and the other files are still checked
        keep(Issue(str(path), 0, "", f"this is {exc.what}, {NOT_JSONL}. {exc.hint}"))
    finally:
        finder.close()
    report.records, report.valid, report.chat = stats.records, stats.valid - rejected, stats.chat
    report.chars = LengthStats.from_counts(chars, "chars")
    if token_counts is not None:
        _token_summary(report, tokens, keep)
    return report


def _tally(report: DataReport, tokens: Counter, counts: list) -> None:
    """Token lengths into the histogram; the examples max_length would leave out into the report."""
    for count in counts:
        tokens[count.length] += 1
        if report.max_length and count.left_out(report.max_length):
            report.left_out += 1
            if len(report.left_out_lines) < MAX_LEFT_OUT_LINES:
                report.left_out_lines.append(count.line)
        elif report.max_length and count.loses_eos(report.max_length):
            report.lost_eos += 1
            if len(report.lost_eos_lines) < MAX_LEFT_OUT_LINES:
                report.lost_eos_lines.append(count.line)


def _token_summary(report: DataReport, tokens: Counter, keep: Callable[[Issue], None]) -> None:
    """Token statistics, the examples max_length would truncate, and a warning naming those it would leave
    out and one naming those it would cut before their eos (as tokenize and train warn)."""
    from lora_cli.data.tokenization import left_out_note, lost_eos_note

    report.tokens = LengthStats.from_counts(tokens, "tokens")
    if report.max_length:
        report.truncated = sum(c for n, c in tokens.items() if n > report.max_length)
    if report.left_out and report.max_length:
        keep(Issue(report.file, 0, "", left_out_note(report.left_out, report.left_out_lines, report.max_length),
                   "warning"))
    if report.lost_eos and report.max_length:
        keep(Issue(report.file, 0, "", lost_eos_note(report.lost_eos, report.lost_eos_lines, report.max_length),
                   "warning"))


def cross_file_issues(reports: list[DataReport]) -> list[Issue]:
    """A warning for each record of a file that an earlier file of `reports` also holds (a validation
    file repeating training records, say), counted in that file's warnings."""
    issues = []
    for j, later in enumerate(reports):
        seen: set[int] = set()
        for earlier in reports[:j]:
            for line, orig in shared(later.digests, earlier.digests):
                if line not in seen:
                    seen.add(line)
                    issues.append(Issue(later.file, line, "", f"also in {earlier.file} (line {orig})", "warning"))
        later.warnings += len(seen)
    return issues
