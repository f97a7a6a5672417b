"""The tokenized dataset, cached on disk and reused while nothing that changes it changed.

The key hashes every input of tokenization: the data file's bytes, the tokenizer's files,
the template, max length, label policy and this module's format version. One entry per
split, so editing the validation file does not re-tokenize the training file. An entry is
an Arrow dataset (datasets.save_to_disk) plus meta.json, built in a temporary folder and
renamed into place: a killed run leaves nothing that a later run would trust. meta.json also
keeps what a later run that reuses the entry must say again: the examples truncation left without
a trained token (count and first line numbers) and the data's warnings.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lora_cli import faults
from lora_cli.atomic import atomic_dir, is_disk_full, remove_stale_temporaries, sha256_of, write_text
from lora_cli.data.records import Issue, ScanStats, error_lines, iter_examples, open_data_file
from lora_cli.data.tokenization import LabelPolicy, apply_or_reject, encode_batch, left_out_note, lost_eos_note
from lora_cli.errors import DataError, LoraCliError
from lora_cli.lock import exclusive
from lora_cli.progress import NULL_REPORTER, Reporter
from lora_cli.writable import check_writable

if TYPE_CHECKING:
    from collections.abc import Iterator

    from datasets import Dataset, Features
    from transformers import PreTrainedTokenizerBase

    from lora_cli.data.overlap import RecordDigests
    from lora_cli.data.templates import ChatTemplate, TextTemplate
    from lora_cli.progress import Stage

# 2: instruction records' system/history fields rendered; meta.json has left_out_lines and warnings
# 3: a BOS the template writes itself is not added a second time (tokenization.with_prefix)
FORMAT_VERSION = 3
BATCH = 1000
KEPT_LINES = 100  # left-out line numbers kept in meta.json
KEPT_WARNINGS = 20
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
    "vocab.json", "merges.txt", "tokenizer.model", "chat_template.jinja", "chat_template.json",
)


def file_digest(path: Path) -> tuple[str, int]:
    """(sha256 of the bytes, number of lines)."""
    newlines: list[int] = []  # of each chunk read
    with open_data_file(path) as fh:
        try:
            digest = sha256_of(fh, lambda chunk: newlines.append(chunk.count(b"\n")))
        except OSError as exc:
            raise LoraCliError(f"Cannot read data file {path}: {exc.strerror or exc}.") from None
    return digest, sum(newlines)


def tokenizer_digest(tokenizer_dir: Path) -> str:
    h = hashlib.sha256()
    for name in TOKENIZER_FILES:
        path = Path(tokenizer_dir) / name
        if path.is_file():
            h.update(name.encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()


@dataclass(frozen=True)
class CacheParts:
    """Every input of tokenization: the entry's key hashes exactly these (as JSON, keys sorted)."""

    format: int  # FORMAT_VERSION
    data_sha256: str  # of the data file's bytes
    tokenizer: str  # tokenizer_digest of the tokenizer's files
    tokenizer_class: str
    template: str  # the template's identity()
    max_length: int
    train_on_prompt: bool
    add_eos: bool
    skip_invalid: bool


@dataclass
class TokenCounts:
    """What tokenizing a file found, in records, examples and tokens."""

    records: int = 0
    invalid: int = 0
    examples: int = 0
    tokens: int = 0
    targets: int = 0  # tokens that carry a label (the response loss is taken over them)
    truncated: int = 0
    no_target: int = 0  # examples left out: truncation left them no trained token
    lost_eos: int = 0  # examples whose closing eos truncation cut


@dataclass
class CacheMeta:
    """An entry's meta.json: its key and inputs, and what a run reusing it must say again."""

    key: str
    split: str
    source: str  # the data file
    parts: CacheParts
    counts: TokenCounts
    skipped_lines: list[int] = field(default_factory=list)  # invalid records skipped (--skip-invalid)
    left_out_lines: list[int] = field(default_factory=list)  # the first KEPT_LINES left out
    lost_eos_lines: list[int] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)  # the first KEPT_WARNINGS
    seconds: float = 0.0  # spent tokenizing
    created: str = ""  # local time, ISO 8601 to the second

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> CacheMeta:
        """From meta.json (TypeError or KeyError when it is not one of this format's)."""
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in raw.items() if k in known} | {
            "parts": CacheParts(**raw["parts"]), "counts": TokenCounts(**raw["counts"])})


@dataclass
class CacheEntry:
    split: str
    key: str
    path: Path
    hit: bool
    meta: CacheMeta

    def notes(self) -> list[str]:
        """What a run using this entry tells the user about its data, on a cache hit as when built."""
        meta = self.meta
        out = [f"warning {w}" for w in meta.warnings]
        counts, max_length = meta.counts, meta.parts.max_length
        if counts.no_target:
            out.append(left_out_note(counts.no_target, meta.left_out_lines, max_length, self.split))
        if counts.lost_eos:
            out.append("warning " + lost_eos_note(counts.lost_eos, meta.lost_eos_lines, max_length, self.split))
        skipped = meta.skipped_lines
        if counts.invalid and meta.parts.skip_invalid:
            shown = ", ".join(str(n) for n in skipped[:10]) + (" ..." if counts.invalid > 10 else "")
            out.append(f"--skip-invalid: {counts.invalid:,} invalid {self.split} record(s) skipped"
                       + (f" (line{'s' if len(skipped) > 1 else ''} {shown})" if skipped else "") + ".")
        return out

    def load(self) -> Dataset:
        from datasets import load_from_disk

        try:
            return load_from_disk(str(self.path / "data"))
        except Exception as exc:  # damaged after it was written (disk error, a hand edit): say which entry
            raise LoraCliError(f"The tokenize cache entry {self.path} cannot be read ({type(exc).__name__}: {exc}).",
                               "Rebuild it with lora-cli tokenize --force (or delete the folder).") from None


def _key(parts: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:20]


def _rows(path: Path, tokenizer: PreTrainedTokenizerBase, template: TextTemplate | ChatTemplate, policy: LabelPolicy,
          skip_invalid: bool, counts: TokenCounts, issues: list[Issue], left_out: list[int], lost_eos: list[int],
          digests: RecordDigests, progress: Stage) -> Iterator[dict[str, Any]]:
    """Generator of dataset rows; stops tokenizing (but keeps scanning) once an error rules out a result.

    What it finds goes into `counts`, `issues`, the first KEPT_LINES lines of `left_out` and
    `lost_eos`, and `digests` (datasets calls it with these through gen_kwargs)."""
    stats, pending = ScanStats(), []

    def failed() -> bool:  # the run will fail: find every defect, tokenize nothing more
        return not skip_invalid and any(i.severity == "error" for i in issues)  # warnings: one per field at most

    def flush() -> Iterator[dict[str, Any]]:
        encoded, refused = apply_or_reject(pending, lambda exs: encode_batch(exs, tokenizer, template, policy),
                                           str(path))
        issues.extend(refused)
        counts.invalid += len(refused)
        for enc in encoded:
            counts.truncated += enc.truncated
            if enc.truncated and enc.n_targets and policy.add_eos:  # the cut took the eos: it never learns to stop there
                counts.lost_eos += 1
                if len(lost_eos) < KEPT_LINES:
                    lost_eos.append(enc.line)
            if enc.n_targets == 0:
                counts.no_target += 1
                if len(left_out) < KEPT_LINES:
                    left_out.append(enc.line)
                continue
            counts.examples += 1
            counts.tokens += len(enc.input_ids)
            counts.targets += enc.n_targets
            yield {"input_ids": enc.input_ids, "labels": enc.labels, "line": enc.line,
                   "length": len(enc.input_ids), "n_targets": enc.n_targets}
        progress.update(len(pending))
        pending.clear()

    for example in iter_examples(path, on_issue=issues.append, stats=stats):
        digests.add(example)
        if failed():
            continue
        pending.append(example)
        if len(pending) >= BATCH:
            yield from flush()
            faults.point("tokenize:rows")
    if not failed():
        yield from flush()
    counts.records, counts.invalid = stats.records, counts.invalid + stats.records - stats.valid


def build_or_load(split: str, path: str | Path, tokenizer: PreTrainedTokenizerBase, tokenizer_dir: Path,
                  template: TextTemplate | ChatTemplate, policy: LabelPolicy, cache_dir: str | Path,
                  skip_invalid: bool = False, force: bool = False, reporter: Reporter = NULL_REPORTER,
                  reason: str | None = None) -> CacheEntry:
    """Return the cache entry for one split, tokenizing only when no valid entry exists.

    `reason`: why this split might need tokenizing again (a changed file), told to `reporter` only
    when the entry is in fact built."""
    path = Path(path)
    digest, n_lines = file_digest(path)
    parts = CacheParts(FORMAT_VERSION, digest, tokenizer_digest(tokenizer_dir), type(tokenizer).__name__,
                       template.identity(), policy.max_length, policy.train_on_prompt, policy.add_eos, skip_invalid)
    key = _key(asdict(parts))
    entry_dir = Path(cache_dir) / "tokenized" / key
    hit = None if force else _hit(split, key, entry_dir)
    if hit is not None:
        return hit
    check_writable(cache_dir, "folder", "--cache-dir", inside=True)
    # one process builds an entry; another that needs it waits, then reads what the first built
    with exclusive(entry_dir, f"Tokenize cache entry {entry_dir}", reporter=reporter, wait=True):
        hit = None if force else _hit(split, key, entry_dir)
        if hit is not None:
            return hit
        remove_stale_temporaries(entry_dir.parent)  # entries whose writer was killed
        if reason:
            reporter.message(reason)
        return _build(split, path, tokenizer, template, policy, skip_invalid, parts, key, entry_dir, n_lines, reporter)


def _hit(split: str, key: str, entry_dir: Path) -> CacheEntry | None:
    """The complete entry `key` in entry_dir, or None (absent, incomplete or unreadable: built again)."""
    try:
        meta = CacheMeta.from_dict(json.loads((entry_dir / "meta.json").read_text()))
        if meta.key == key and (entry_dir / "data" / "dataset_info.json").is_file():
            return CacheEntry(split, key, entry_dir, True, meta)
    except (OSError, ValueError, TypeError, KeyError):  # none, or not this format's meta.json
        pass
    return None


def _generate(gen_kwargs: dict[str, Any], features: Features, key: str, build_dir: Path) -> Dataset:
    """Dataset.from_generator over `_rows`, with the real error instead of datasets' wrapper.

    datasets wraps whatever the generator (or its Arrow writer) raises in a
    DatasetGenerationError; a message for the user (LoraCliError) or a full disk (OSError) must
    come through as itself so that the CLI can say what happened.
    """
    from datasets import Dataset
    from datasets.exceptions import DatasetGenerationError

    try:
        return Dataset.from_generator(_rows, gen_kwargs=gen_kwargs, features=features, fingerprint=key,
                                      cache_dir=str(build_dir), keep_in_memory=False)
    except DatasetGenerationError as exc:
        cause = exc.__cause__ or exc.__context__
        if isinstance(cause, (LoraCliError, OSError)) or (cause is not None and is_disk_full(cause)):
            raise cause from None
        raise


def _build(split: str, path: Path, tokenizer: PreTrainedTokenizerBase, template: TextTemplate | ChatTemplate,
           policy: LabelPolicy, skip_invalid: bool, parts: CacheParts, key: str, entry_dir: Path, n_lines: int,
           reporter: Reporter) -> CacheEntry:
    from datasets import Features, Sequence, Value
    from datasets.utils.logging import disable_progress_bar

    from lora_cli.data.overlap import RecordDigests

    disable_progress_bar()
    counts, digests = TokenCounts(), RecordDigests()
    issues, left_out, lost_eos = [], [], []  # filled by _rows: defects, lines of left-out and of eos-less examples
    features = Features({"input_ids": Sequence(Value("int32")), "labels": Sequence(Value("int32")),
                         "line": Value("int64"), "length": Value("int32"), "n_targets": Value("int32")})
    t0 = time.time()
    with reporter.stage(f"Tokenizing {path.name}", total=n_lines or None, unit="records") as progress:
        with atomic_dir(entry_dir, replace=True) as tmp:
            gen_kwargs = dict(path=path, tokenizer=tokenizer, template=template, policy=policy, skip_invalid=skip_invalid,
                              counts=counts, issues=issues, left_out=left_out, lost_eos=lost_eos, digests=digests,
                              progress=progress)
            try:
                ds = _generate(gen_kwargs, features, key, tmp / "build")
            except ValueError:
                if counts.examples:  # not the "generator yielded nothing" case
                    raise
                ds = None
            errors = [i for i in issues if i.severity == "error"]
            if errors and not skip_invalid:
                raise DataError(f"{path} has {len(error_lines(errors))} invalid line(s); nothing was tokenized.",
                                errors,
                                hint="Fix them (lora-cli validate-data lists every one) or pass --skip-invalid.")
            if counts.examples == 0:
                raise _no_examples(path, counts, left_out, policy, errors)
            ds.save_to_disk(str(tmp / "data"))
            digests.save(tmp)
            del ds
            shutil.rmtree(tmp / "build", ignore_errors=True)
            warnings = [str(i) for i in issues if i.severity == "warning"]
            meta = CacheMeta(key, split, str(path), parts, counts, error_lines(errors)[:1000],
                             left_out, lost_eos, warnings[:KEPT_WARNINGS], round(time.time() - t0, 3),
                             time.strftime("%Y-%m-%dT%H:%M:%S"))
            write_text(tmp / "meta.json", json.dumps(asdict(meta), indent=2))
    return CacheEntry(split, key, entry_dir, False, meta)



def _no_examples(path: Path, counts: TokenCounts, left_out: list[int], policy: LabelPolicy, errors: list) -> DataError:
    """Why a file gave no example to train on: no records at all, only invalid ones, or truncation."""
    if counts.no_target:
        note = left_out_note(counts.no_target, left_out, policy.max_length)
        return DataError(f"{path} has no usable examples. {note}", errors)
    if not counts.records:
        return DataError(f"{path} holds no records.", errors,
                         hint="It needs one JSON object a line, e.g. {\"instruction\": ..., \"input\": ..., "
                              "\"output\": ...} (or a JSON array of them).")
    if counts.invalid >= counts.records:
        return DataError(f"{path} has no usable examples: all {counts.records} record(s) are invalid.", errors,
                         hint="Fix them (lora-cli validate-data lists every one).")
    return DataError(f"{path} has no usable examples.", errors,
                     hint="Every example needs a response that survives truncation at --max-length.")
