"""validate-data in constant memory: exact statistics and duplicates without per-record memory.

The full-size numbers (100k and 1M lines) are measured by hand and recorded in
docs/RELIABILITY.md; here a small pair of files shows that peak RSS does not follow length.
"""

import json
import subprocess
import sys
from collections import Counter

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from lora_cli.data.duplicates import DuplicateFinder
from lora_cli.data.report import LengthStats, validate_file

FAST = settings(max_examples=60, deadline=None, database=None)


def first_seen_pairs(rows):
    """The obvious (and memory-hungry) reference: a dict of every digest seen."""
    first, out = {}, []
    for line, digest in rows:
        if digest in first:
            out.append((line, first[digest]))
        else:
            first[digest] = line
    return out


@FAST
@given(st.lists(st.integers(0, 2**64 - 1) | st.sampled_from([0, 1, 2**63, 2**64 - 1, 12345]), max_size=400),
       st.sampled_from([16, 37, 10_000]))
def test_duplicate_finder_matches_a_dict_whatever_it_spills(digests, budget):
    rows = [(3 * i + 1, d) for i, d in enumerate(digests)]  # lines increase, with gaps (blank/invalid lines)
    finder = DuplicateFinder(budget=budget)
    for line, d in rows:
        finder.add(d, line)
    assert list(finder.pairs()) == first_seen_pairs(rows)
    assert (finder.spilled > 0) == (len(rows) >= budget)


def test_duplicate_finder_splits_buckets_down_to_single_digests():
    # equal high bits force a split at every level; 500 copies of one digest reach the bottom
    rows = [(i + 1, (0xABC << 40) | (i % 37)) for i in range(2000)] + [(3000 + i, 7) for i in range(500)]
    finder = DuplicateFinder(budget=16)
    for line, d in rows:
        finder.add(d, line)
    assert list(finder.pairs()) == first_seen_pairs(rows) and finder.spilled == len(rows)


@FAST
@given(st.lists(st.integers(0, 10**6) | st.integers(0, 5), min_size=1, max_size=300))
def test_length_statistics_from_a_histogram_equal_numpys(values):
    stats = LengthStats.from_counts(Counter(values), "chars")
    arr = np.array(values)
    assert (stats.count, stats.max) == (len(values), arr.max())
    assert (stats.p50, stats.p90) == (np.percentile(arr, 50), np.percentile(arr, 90))
    assert abs(stats.mean - arr.mean()) <= 1e-9 * max(1.0, arr.mean())


def test_duplicates_in_a_spilled_file_are_reported_by_line(tmp_path, monkeypatch):
    from lora_cli.data import duplicates

    monkeypatch.setattr(duplicates, "BUDGET", 16)
    rows = [{"instruction": f"q{i % 7}", "output": "a"} for i in range(100)]
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    report = validate_file(path)
    found = [(i.line, i.reason) for i in report.issues]
    assert found == [(n, f"duplicate of line {n % 7 or 7}") for n in range(8, 101)]
    assert report.warnings == 93 and report.chars.count == 100


RSS_PROBE = """
import resource, sys
from lora_cli.cli.app import app
try:
    app(["validate-data", "--json", sys.argv[1]], prog_name="lora-cli")
except SystemExit:
    pass
print("RSS_KB", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, file=sys.stderr)
"""


def peak_rss_mb(path) -> float:
    proc = subprocess.run([sys.executable, "-c", RSS_PROBE, str(path)], capture_output=True, text=True, timeout=300)
    line = [x for x in proc.stderr.splitlines() if x.startswith("RSS_KB")]
    assert line, proc.stderr[-2000:]
    return int(line[0].split()[1]) / 1024


def test_peak_memory_does_not_follow_the_number_of_lines(tmp_path):
    """300k lines peak within a few MB of 20k lines (the old per-record arrays added ~50 B/line: ~14 MB)."""
    def write(n):
        path = tmp_path / f"{n}.jsonl"
        with open(path, "w") as fh:
            fh.writelines(f'{{"instruction": "q {i}", "output": "a {i % 1000}"}}\n' for i in range(n))
        return path

    small, large = peak_rss_mb(write(20_000)), peak_rss_mb(write(300_000))
    assert large - small < 8, (small, large)
