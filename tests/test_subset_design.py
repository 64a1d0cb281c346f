"""The subset experiment's matched design (benchmarks/subset_validation.py): strata of equal size over the
matched column, and top, bottom and random sets holding one sample of each."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

# appended, not prepended: the scripts' names (machine, bench, driver) must shadow nothing the suite imports
sys.path.append(str(Path(__file__).resolve().parent.parent / "benchmarks"))
from subset_validation import matched_ends, matched_random, strata


def pool(n: int) -> tuple[dict[str, float], dict[str, float]]:
    """n samples whose length rises with their index and whose score is unrelated to it."""
    length = {f"s{i:03d}": float(10 + i) for i in range(n)}
    score = {f"s{i:03d}": float((i * 7919) % 101) for i in range(n)}
    return length, score


def test_strata_cut_the_sorted_column_into_k_near_equal_runs():
    length, _ = pool(103)
    groups = strata(length, 10)
    assert len(groups) == 10
    assert sorted(len(g) for g in groups) == [10] * 7 + [11] * 3
    flat = [s for g in groups for s in g]
    assert flat == sorted(length, key=lambda s: length[s])  # consecutive runs of the sorted order
    assert max(length[s] for s in groups[0]) < min(length[s] for s in groups[1])


def test_strata_refuse_a_pool_smaller_than_two_k():
    length, _ = pool(7)
    with pytest.raises(ValueError, match="at least 2k = 8"):
        strata(length, 4)


def test_matched_ends_take_each_stratums_highest_and_lowest():
    length, score = pool(60)
    groups = strata(length, 6)
    top, bottom = matched_ends(score, groups)
    for g, t, b in zip(groups, top, bottom, strict=True):
        assert t in g and b in g
        assert score[t] == max(score[s] for s in g)
        assert score[b] == min(score[s] for s in g)
    # the same lengths on both sides, stratum by stratum, while the scores differ
    assert [groups.index(next(g for g in groups if s in g)) for s in top] == list(range(6))
    assert sum(score[s] for s in top) > sum(score[s] for s in bottom)


def test_matched_ends_break_ties_by_id_and_skip_unranked_samples():
    groups = [["a", "b", "c"], ["d", "e", "f"]]
    values = {"a": 1.0, "b": 1.0, "c": 0.0, "d": 2.0, "f": 2.0}  # e unranked (an empty natural answer)
    assert matched_ends(values, groups) == (["a", "d"], ["c", "f"])
    with pytest.raises(ValueError, match="fewer than two"):
        matched_ends({"a": 1.0, "d": 1.0, "e": 0.0}, groups)


def test_matched_random_is_one_seeded_sample_a_stratum():
    length, _ = pool(50)
    groups = strata(length, 5)
    draw = matched_random(groups, seed=3)
    assert [next(i for i, g in enumerate(groups) if s in g) for s in draw] == list(range(5))
    assert matched_random(groups, seed=3) == draw
    assert any(matched_random(groups, seed=s) != draw for s in range(4, 10))
