"""Find duplicate records among any number of them in a fixed amount of memory.

validate-data reports "line N: duplicate of line M". Each record contributes an 8-byte
digest and its line number. Up to `budget` records are kept in memory (12 bytes each); past
that they are written to a temporary SQLite table, and SQLite's sorter, which spills to disk
past its page cache (2 MB), finds each digest's first line. Memory stays near a few MB however
long the file; the disk holds about 20 bytes per record until the scan ends.
"""

from __future__ import annotations

import shutil
import sqlite3
import tempfile
from array import array
from pathlib import Path
from typing import Iterator

BUDGET = 1 << 16  # records held in memory before the rest go to disk
_SIGN = 1 << 63  # SQLite integers are signed 64-bit: digests are stored shifted by this

# every line whose digest an earlier line already had, with that first line, by line
_PAIRS = ("SELECT line, orig FROM (SELECT line, MIN(line) OVER (PARTITION BY digest) AS orig FROM records) "
          "WHERE line != orig ORDER BY line")


class DuplicateFinder:
    """Feed (digest, line) in file order with `add`; `pairs()` then yields (dup, orig) by dup line."""

    def __init__(self, budget: int = BUDGET):
        self.budget = max(16, budget)
        self._d, self._l = array("q"), array("I")
        self._dir: Path | None = None
        self._db: sqlite3.Connection | None = None
        self.spilled = 0  # records written to disk (0: everything fitted in memory)

    def add(self, digest: int, line: int) -> None:
        self._d.append(digest - _SIGN)
        self._l.append(line)
        if len(self._d) >= self.budget:
            self._spill()

    def _spill(self) -> None:
        if self._db is None:
            self._dir = Path(tempfile.mkdtemp(prefix="lora-cli-duplicates-"))
            self._db = sqlite3.connect(self._dir / "records.sqlite")
            self._db.executescript("PRAGMA journal_mode = OFF; PRAGMA synchronous = OFF; PRAGMA temp_store = FILE;"
                                   "CREATE TABLE records (digest INTEGER, line INTEGER)")
        self._db.executemany("INSERT INTO records VALUES (?, ?)", zip(self._d, self._l))
        self.spilled += len(self._d)
        self._d, self._l = array("q"), array("I")

    def pairs(self) -> Iterator[tuple[int, int]]:
        try:
            if self._db is None:
                first: dict[int, int] = {}
                for digest, line in zip(self._d, self._l):
                    orig = first.setdefault(digest, line)
                    if orig != line:
                        yield line, orig
                return
            if len(self._d):
                self._spill()
            yield from self._db.execute(_PAIRS)
        finally:
            self.close()

    def close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None
