"""Find duplicate records among any number of them in a fixed amount of memory.

validate-data reports "line N: duplicate of line M". Each record contributes an 8-byte
digest and its line number. Up to `budget` records are kept in memory; past that they are
spilled to temporary bucket files by the digest's leading bits (equal digests always share
a bucket), and each bucket is examined alone, split again by the next bits while it is
larger than the budget. Memory stays near `budget` x 60 bytes (4 MB by default) however long
the file; the disk holds 12 bytes per record until the scan ends.
"""

from __future__ import annotations

import heapq
import os
import shutil
import tempfile
from array import array
from pathlib import Path
from typing import Iterator

import numpy as np

RECORD = np.dtype([("d", "<u8"), ("l", "<u4")])  # packed: 12 bytes a record
PAIR = np.dtype([("dup", "<u4"), ("orig", "<u4")])
BUDGET = 1 << 16  # records held in memory at once (peak ~60 bytes each while a bucket is sorted)
FANOUT_BITS = 4  # a spill or split makes 16 buckets
MERGE_WIDTH = 16  # pair files read at once (each holds a 1024-pair read buffer)
READ_CHUNK = 1024


def pairs_in_memory(digests: np.ndarray, lines: np.ndarray) -> np.ndarray:
    """(dup, orig) for every record whose digest an earlier line already had, ordered by dup.

    `lines` must be increasing (records in file order): a stable sort by digest then keeps
    each group's first line first.
    """
    out = np.empty(0, PAIR)
    if len(digests) < 2:
        return out
    order = np.argsort(digests, kind="stable")
    sd, sl = digests[order], lines[order]
    del order
    starts = np.ones(len(sd), dtype=bool)
    starts[1:] = sd[1:] != sd[:-1]
    first = np.maximum.accumulate(np.where(starts, np.arange(len(sd)), 0))
    dup = np.flatnonzero(~starts)
    out = np.empty(len(dup), PAIR)
    out["dup"], out["orig"] = sl[dup], sl[first[dup]]
    out.sort(order="dup")
    return out


class DuplicateFinder:
    """Feed (digest, line) in file order with `add`; `pairs()` then yields (dup, orig) by dup line."""

    def __init__(self, budget: int = BUDGET):
        self.budget = max(16, budget)
        self._d, self._l = array("Q"), array("I")
        self._dir: Path | None = None
        self._pair_files: list[Path] = []
        self.spilled = 0  # records written to disk (0: everything fitted in memory)

    def add(self, digest: int, line: int) -> None:
        self._d.append(digest)
        self._l.append(line)
        if len(self._d) >= self.budget:
            self._spill()

    def _buffer(self) -> np.ndarray:
        recs = np.empty(len(self._d), RECORD)
        recs["d"] = np.frombuffer(self._d, dtype=np.uint64) if len(self._d) else 0
        recs["l"] = np.frombuffer(self._l, dtype=np.uint32) if len(self._l) else 0
        return recs

    def _spill(self) -> None:
        if self._dir is None:
            self._dir = Path(tempfile.mkdtemp(prefix="lora-cli-duplicates-"))
        _partition(self._buffer(), 64 - FANOUT_BITS, self._dir / "b")
        self.spilled += len(self._d)
        self._d, self._l = array("Q"), array("I")

    def pairs(self) -> Iterator[tuple[int, int]]:
        try:
            if self._dir is None:
                recs = self._buffer()
                for dup, orig in pairs_in_memory(recs["d"], recs["l"]).tolist():
                    yield dup, orig
                return
            if len(self._d):
                self._spill()
            for bucket in sorted(self._dir.glob("b*")):
                self._examine(bucket, 64 - 2 * FANOUT_BITS)
            while len(self._pair_files) > MERGE_WIDTH:  # merge in rounds: memory stays fixed
                group, self._pair_files = self._pair_files[:MERGE_WIDTH], self._pair_files[MERGE_WIDTH:]
                self._merge_into_file(group)
            yield from heapq.merge(*(_read(p, PAIR) for p in self._pair_files))
        finally:
            self.close()

    def close(self) -> None:
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None

    def _examine(self, bucket: Path, shift: int) -> None:
        """Pairs of one bucket into a pair file; a bucket over budget is split by the next bits."""
        n = bucket.stat().st_size // RECORD.itemsize
        if n <= self.budget:
            recs = np.fromfile(bucket, dtype=RECORD)
            found = pairs_in_memory(recs["d"], recs["l"])
        elif shift < 0:  # every bit equal: one digest, many lines (records are in file order)
            found = None
            self._same_digest(bucket)
        else:
            for chunk in _chunks(bucket, RECORD, self.budget):
                _partition(chunk, shift, bucket.with_name(bucket.name + "-"))
            bucket.unlink()
            for sub in sorted(bucket.parent.glob(bucket.name + "-*")):
                self._examine(sub, shift - FANOUT_BITS)
            return
        bucket.unlink()
        if found is not None and len(found):
            self._add_pairs(found)

    def _same_digest(self, bucket: Path) -> None:
        orig = None
        for chunk in _chunks(bucket, RECORD, self.budget):
            lines = chunk["l"]
            if orig is None:
                orig, lines = int(lines[0]), lines[1:]
            pairs = np.empty(len(lines), PAIR)
            pairs["dup"], pairs["orig"] = lines, orig
            self._add_pairs(pairs)

    def _new_pair_file(self) -> Path:
        fd, name = tempfile.mkstemp(prefix="pairs-", dir=self._dir)
        os.close(fd)
        return Path(name)

    def _add_pairs(self, pairs: np.ndarray) -> None:
        path = self._new_pair_file()
        pairs.tofile(path)
        self._pair_files.append(path)

    def _merge_into_file(self, files: list[Path]) -> None:
        path = self._new_pair_file()
        with open(path, "wb") as fh:
            buf = []
            for pair in heapq.merge(*(_read(p, PAIR) for p in files)):
                buf.append(pair)
                if len(buf) >= READ_CHUNK:
                    np.array(buf, dtype=PAIR).tofile(fh)
                    buf.clear()
            if buf:
                np.array(buf, dtype=PAIR).tofile(fh)
        for p in files:
            p.unlink()
        self._pair_files.append(path)


def _partition(recs: np.ndarray, shift: int, prefix: Path) -> None:
    """Append each record to the bucket file named by its digest's bits [shift, shift+FANOUT_BITS)."""
    keys = (recs["d"] >> np.uint64(shift)) & np.uint64((1 << FANOUT_BITS) - 1)
    for k in np.unique(keys).tolist():
        with open(f"{prefix}{k:02d}", "ab") as fh:
            recs[keys == k].tofile(fh)


def _chunks(path: Path, dtype: np.dtype, size: int) -> Iterator[np.ndarray]:
    with open(path, "rb") as fh:
        while True:
            chunk = np.fromfile(fh, dtype=dtype, count=size)
            if not len(chunk):
                return
            yield chunk


def _read(path: Path, dtype: np.dtype) -> Iterator[tuple[int, int]]:
    for chunk in _chunks(path, dtype, READ_CHUNK):
        yield from chunk.tolist()
