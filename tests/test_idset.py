"""Tests for screener.idset: the set of sample ids the reader (ids given) and the store (ids stored) keep."""

from __future__ import annotations

import hashlib
import tracemalloc

import numpy as np

import screener.idset
from screener.idset import IdSet, digests


def test_digests_are_8_byte_blake2b_the_same_in_every_process() -> None:
    """Not `hash()`: its seed is per process, and a renamed sample id must be the same on every read."""
    ids = ["r0#0", "r0#1", "", "\ud800 lone surrogate", "ü" * 300]
    got = digests(ids)
    assert got.dtype == np.uint64 and len(set(got.tolist())) == len(ids)
    want = [
        int.from_bytes(hashlib.blake2b(i.encode("utf-8", "surrogatepass"), digest_size=8).digest(), "little")
        for i in ids
    ]
    assert got.tolist() == want
    assert digests([]).dtype == np.uint64 and len(digests([])) == 0
    assert digests(iter(ids)).tolist() == want  # any iterable


def test_an_idset_answers_as_a_set_across_its_merges_for_digests_up_to_2_64_minus_1(monkeypatch) -> None:
    """`holds`, `isdisjoint` and `add_if_disjoint` answer as a Python set does, whether a digest sits in the
    recent set or the sorted array, down to 0 and up to 2**64 - 1; a digest added again is kept once."""
    # an id is its digest written in decimal, so the test chooses the digests
    monkeypatch.setattr(screener.idset, "digests", lambda ids: np.array([int(i) for i in ids], np.uint64))
    monkeypatch.setattr(IdSet, "MERGE", 7)  # many merges
    rng = np.random.default_rng(0)
    given: set[str] = set()
    ids = IdSet()
    assert ids.isdisjoint([]) and ids.isdisjoint(["0"]) and ids.holds(["0"]).tolist() == [False]
    for step in range(300):
        batch = [str(d) for d in rng.integers(0, 2**64 - 1, size=int(rng.integers(1, 5)), dtype=np.uint64)]
        probe = [*batch[:1], str(rng.choice(sorted(given))) if given else "0", str(2**64 - 1), "0"]
        if step % 4 == 1 and given:  # one held already: recent or merged
            batch.append(str(rng.choice(sorted(given))))
        assert ids.isdisjoint(probe) == given.isdisjoint(probe)
        assert ids.holds(probe).tolist() == [p in given for p in probe]
        assert ids.isdisjoint(batch) == given.isdisjoint(batch)
        if step % 2:
            assert ids.add_if_disjoint(batch) == given.isdisjoint(batch)
            if given.isdisjoint(batch):
                given.update(batch)
        else:
            given.update(batch)
            ids.add(batch)
        assert len(ids) == len(given)
    assert not ids.isdisjoint([max(given, key=int)]) and ids.isdisjoint([])
    ids.add(list(given)[:10])  # given again (a finished row's ids): still a set
    assert len(ids) == len(given)
    edges = IdSet()
    edges.add([str(2**64 - 1), "0"])
    for _ in range(3):  # in the recent set, then in the sorted array
        assert edges.holds(["0", "1", str(2**64 - 2), str(2**64 - 1)]).tolist() == [True, False, False, True]
        edges.add([str(2**64 - 1), "0", *map(str, range(10, 10 + IdSet.MERGE))])
    assert len(edges) == 9 and not edges.add_if_disjoint(["5", "0"]) and len(edges) == 9


def test_an_idset_keeps_8_bytes_an_id() -> None:
    """The reader keeps every sample id it gave, over the whole read: as a set of Python ints that was
    ~100 bytes a sample id (the driver's memory grew with the input); an `IdSet` keeps ~8."""
    n, ids = 200_000, [f"r{i}#0" for i in range(200_000)]
    tracemalloc.start()
    held = IdSet()
    for i in range(0, n, 2):  # two turns a row, as the reader adds them
        assert held.add_if_disjoint(ids[i : i + 2])
    size = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    assert len(held) == n and not held.isdisjoint(ids[-1:]) and held.isdisjoint(["x"])
    assert size < 40 * n, f"{size / n:.0f} bytes an id"  # the sorted array's 8 and the recent set's


def test_an_idset_never_misses_an_id_it_holds() -> None:
    """The store's use: an id missed is not stored (so no lookup); past the recent set's size too."""
    ids = IdSet()
    stored = [f"id{i}" for i in range(70_000)]  # past the set's size: some merged into the sorted array
    ids.add(stored[:40_000])
    ids.add(stored[40_000:])
    assert len(ids) == 70_000 and len(ids._sorted) == 70_000  # merged, each once
    assert ids.holds(stored).all()
    assert sum(ids.holds([f"other{i}" for i in range(1000)])) <= 1
