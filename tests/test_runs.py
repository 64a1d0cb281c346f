"""screener.runs: a run's identity (its id), its layers and traits, and how the read commands name it."""

from __future__ import annotations

import dataclasses
from datetime import datetime

import numpy as np
import pytest

from screener.errors import QueryError
from screener.runs import Run

VECTORS = {"evil": {"layer": 20}, "kind": {"layer": 10}, "odd": {"layer": 7}}  # 7 is not a run layer
RUN = Run("m", "ab" * 32, "d.jsonl", "proxy", (10, 20), ("evil", "kind", "odd"), {"vectors": VECTORS})


def test_the_id_is_the_hash_of_the_identity_and_not_of_the_state() -> None:
    assert len(RUN.run_id) == 16 and set(RUN.run_id) <= set("0123456789abcdef")
    same = Run("m", "ab" * 32, "d.jsonl", "proxy", [np.int64(10), 20], ["evil", "kind", "odd"],
               {"vectors": VECTORS, "runtime": {"workers": 4}})  # fmt: skip
    assert same.run_id == RUN.run_id and same.layers == (10, 20) and type(same.layers[0]) is int
    stored = dataclasses.replace(RUN, status="finished", n_scored=5, started_at=datetime(2026, 1, 1))
    assert stored.run_id == RUN.run_id and stored == RUN
    assert dataclasses.replace(RUN, mode="natural").run_id != RUN.run_id
    with pytest.raises(ValueError, match="mode must be one of"):
        dataclasses.replace(RUN, mode="other")


def test_each_trait_is_read_at_its_own_vector_layer() -> None:
    assert RUN.layer(None, "evil") == 20 and RUN.layer(None, "kind") == 10
    assert RUN.layer(None, "odd") == 10  # its layer is not the run's: the run's first
    assert RUN.layer(None) == 10 and RUN.layer(20, "kind") == 20
    with pytest.raises(QueryError, match=r"has layers \[10, 20\], not 3"):
        RUN.layer(3)
    assert RUN.by_layer() == {20: ["evil"], 10: ["kind", "odd"]}
    assert RUN.by_layer(["kind", "evil"], 20) == {20: ["kind", "evil"]}
    with pytest.raises(QueryError, match="not 'nice'"):
        RUN.by_layer(["nice"])


def test_metric_and_description() -> None:
    assert RUN.metric == "delta_p_proxy" and dataclasses.replace(RUN, mode="natural").metric == "delta_p"
    assert RUN.check_trait("evil") == "evil"
    finished = dataclasses.replace(
        RUN, status="finished", finished_at=datetime(2026, 12, 2, 14, 5), n_scored=1200, n_rejected=3
    )
    assert (
        finished.describe() == f"run {RUN.run_id} (finished 2026-12-02 14:05 UTC; 1,200 scored, 3 rejected)"
    )
    failed = dataclasses.replace(RUN, status="failed", error="interrupted", n_skipped=2, n_unreadable_files=1)
    assert failed.describe() == (
        f"run {RUN.run_id} (FAILED: interrupted; 0 scored, 0 rejected, 2 tool-call turns skipped, "
        "1 unreadable file)"
    )
    assert "NOT FINISHED" in RUN.describe()
