"""Records that two files share: validation records that are also training records.

A validation record that training also saw measures memory, not generalisation: its eval loss
falls with the training loss whatever the adapter learned. validate-data names the records of a
file that an earlier file on its command line also holds; tokenize and train say how many
validation records are in the training file.

Each record is an 8-byte digest of its identity (Example.identity, what duplicate detection
compares) with its line: 12 bytes a record, saved beside a tokenize cache entry so that a cache
hit answers without reading the files again.
"""

from __future__ import annotations

import hashlib
from array import array
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from lora_cli.data.records import Example

DIGESTS_FILE = "digests.npz"


def digest(example: Example) -> int:
    """The record's identity as a 64-bit integer (equal records, equal digests)."""
    return int.from_bytes(hashlib.blake2b(example.identity().encode("utf-8"), digest_size=8).digest(), "little")


class RecordDigests:
    """The digests and line numbers of a file's records, in file order."""

    def __init__(self, digests: Iterable[int] = (), lines: Iterable[int] = ()) -> None:
        self._d, self._l = array("Q", digests), array("I", lines)

    def add(self, example: Example) -> None:
        self._d.append(digest(example))
        self._l.append(example.line)

    def arrays(self) -> tuple[np.ndarray, np.ndarray]:
        return np.frombuffer(self._d, dtype=np.uint64), np.frombuffer(self._l, dtype=np.uint32)

    def __len__(self) -> int:
        return len(self._d)

    def save(self, folder: Path) -> None:
        digests, lines = self.arrays()
        with open(folder / DIGESTS_FILE, "wb") as fh:
            np.savez(fh, digests=digests, lines=lines)

    @classmethod
    def load(cls, folder: Path) -> "RecordDigests | None":
        """The digests saved in `folder`; None when there are none (an entry of an older lora-cli) or unreadable."""
        try:
            with np.load(folder / DIGESTS_FILE) as saved:
                return cls(saved["digests"].tolist(), saved["lines"].tolist())
        except (OSError, ValueError, KeyError):
            return None


def shared(later: RecordDigests, earlier: RecordDigests) -> list[tuple[int, int]]:
    """(line in `later`, first line in `earlier` holding the same record) for each record of `later`
    that `earlier` also holds, in `later`'s order."""
    d_new, l_new = later.arrays()
    d_old, l_old = earlier.arrays()
    if not len(d_new) or not len(d_old):
        return []
    order = np.lexsort((l_old, d_old))  # by digest, then line: the first occurrence first
    sorted_d = d_old[order]
    at = np.searchsorted(sorted_d, d_new)
    found = (at < len(sorted_d)) & (sorted_d[np.minimum(at, len(sorted_d) - 1)] == d_new)
    return [(int(line), int(l_old[order[i]])) for line, i, hit in zip(l_new, at, found) if hit]


def val_overlap_note(pairs: list[tuple[int, int]], val_records: int, val_file: str, train_file: str) -> str:
    """The one sentence tokenize and train say about validation records also in the training file."""
    shown = ", ".join(str(line) for line, _ in pairs[:10]) + (f" and {len(pairs) - 10:,} more" if len(pairs) > 10 else "")
    return (f"{len(pairs):,} of {val_records:,} val records also in train ({Path(val_file).name} line"
            f"{'s' if len(pairs) > 1 else ''} {shown} are records of {Path(train_file).name}): the eval loss on them "
            "measures memory, not generalisation. Remove them from one of the files.")
