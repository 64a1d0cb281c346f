"""`IdSet`: a set of sample ids in about 8 bytes an id, kept as their 8-byte digests (`digests`).

Two holders keep every id of a long read or run, so a set of Python objects would grow the process with
the input: the reader's ids given so far (`datasets.reader.Rebuild`: a false hit would rename an id) and
the store's ids stored for a run (`store.Store`: a false hit costs a lookup). A set of Python ints took
~75 bytes an id, ~140 MB at 1.89M samples (LMSYS-Chat-1M scale; benchmarks/RESULTS.md, 2026-12-03).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from hashlib import blake2b

import numpy as np

__all__ = ["IdSet", "digests"]


def digests(ids: Iterable[str]) -> np.ndarray:
    """The ids' 8-byte blake2b digests, as uint64. Keyed by nothing: the same digest in every process (a
    renamed sample id must be the same on every read, which `hash()`'s per-process seed would not give), and
    two ids share one with odds of ~2**-64 a pair (the set is exact on digests). ~0.45 µs an id."""
    raw = b"".join([blake2b(i.encode("utf-8", "surrogatepass"), digest_size=8).digest() for i in ids])
    return np.frombuffer(raw, "<u8")


class IdSet:
    """A set of ids, held as their digests in ~8 bytes each: a sorted uint64 array, and a Python set of the
    recent ones merged into it every `MERGE` (each digest kept once). Membership is exact on digests
    (`holds`, `isdisjoint`), a searchsorted of the array and a lookup in the recent set."""

    MERGE = 65_536

    def __init__(self) -> None:
        self._sorted = np.empty(0, np.uint64)
        self._recent: set[int] = set()

    def __len__(self) -> int:
        return len(self._sorted) + len(self._recent)

    def holds(self, ids: Sequence[str]) -> np.ndarray:
        """Whether each id is in the set (a bool array, one per id)."""
        return self._holds(digests(ids))

    def isdisjoint(self, ids: Sequence[str]) -> bool:
        """Whether none of the ids is in the set."""
        return not np.any(self.holds(ids))

    def add(self, ids: Iterable[str]) -> None:
        self._add(digests(ids).tolist())

    def add_if_disjoint(self, ids: Sequence[str]) -> bool:
        """Add the ids if none of them is in the set (each digested once); whether they were added."""
        new = digests(ids)
        listed = new.tolist()
        if not self._recent.isdisjoint(listed) or self._in_sorted(new).any():
            return False
        self._add(listed)
        return True

    def _holds(self, new: np.ndarray) -> np.ndarray:
        hit = self._in_sorted(new)
        if self._recent:
            hit |= np.fromiter(map(self._recent.__contains__, new.tolist()), bool, len(new))
        return hit

    def _add(self, new: list[int]) -> None:
        self._recent.update(new)
        if len(self._recent) >= self.MERGE:
            old = self._sorted
            recent = np.sort(np.fromiter(self._recent, np.uint64, len(self._recent)))
            if len(old):  # a digest added again (a finished row's ids, a rewritten sample) is kept once
                recent = recent[~self._in_sorted(recent)]
            # both runs sorted: a stable sort of the two is a merge, O(n)
            self._sorted, self._recent = np.sort(np.concatenate([old, recent]), kind="stable"), set()

    def _in_sorted(self, new: np.ndarray) -> np.ndarray:
        held = self._sorted
        if not len(held):
            return np.zeros(len(new), bool)
        return held.take(held.searchsorted(new), mode="clip") == new  # clipped: past the end is a miss
