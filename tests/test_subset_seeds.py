"""The subset experiment judged on seed means (benchmarks/subset_seeds.py `seed_ordering`): exact figures on
hand-made shifts."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest

# appended, not prepended: the scripts' names (machine, bench, driver) must shadow nothing the suite imports
sys.path.append(str(Path(__file__).resolve().parent.parent / "benchmarks"))
from subset_seeds import seed_ordering

SHIFTS = {
    "top": [1.0, 1.2, 1.4],  # mean 1.2, sd 0.2
    "bottom": [-1.0, -1.1, -1.2],  # mean -1.1, sd 0.1
    "r1": [0.0, 0.2, 0.4],  # mean 0.2
    "r2": [-0.2, -0.4, 0.0],  # mean -0.2
}


def test_seed_ordering_uses_each_sets_seed_mean_and_error():
    o = seed_ordering(SHIFTS, "top", "bottom", ["r1", "r2"])
    assert o["top"] == pytest.approx([1.2, 0.2 / math.sqrt(3)])
    assert o["bottom"] == pytest.approx([-1.1, 0.1 / math.sqrt(3)])
    spread = math.sqrt(0.08)  # sd of the draws' means 0.2 and -0.2
    assert o["random"] == pytest.approx([0.0, spread])
    assert o["random_draws"] == pytest.approx([0.2, -0.2])
    assert o["ordered"] is True
    assert o["z"] == pytest.approx(2.3 / math.hypot(0.2 / math.sqrt(3), 0.1 / math.sqrt(3)))
    assert o["z_draws"] == pytest.approx(2.3 / (math.sqrt(2) * spread))
    r_se = spread / math.sqrt(2)
    assert o["z_top_random"] == pytest.approx(1.2 / math.hypot(0.2 / math.sqrt(3), r_se))
    assert o["z_random_bottom"] == pytest.approx(1.1 / math.hypot(r_se, 0.1 / math.sqrt(3)))


def test_seed_ordering_reports_a_bottom_above_the_random_level_as_unordered():
    shifts = SHIFTS | {"bottom": [0.5, 0.6, 0.7]}
    o = seed_ordering(shifts, "top", "bottom", ["r1", "r2"])
    assert o["ordered"] is False
    assert o["z_random_bottom"] < 0


def test_seed_ordering_refuses_one_draw_or_one_seed():
    with pytest.raises(ValueError, match="two draws"):
        seed_ordering(SHIFTS, "top", "bottom", ["r1"])
    with pytest.raises(ValueError, match="two seeds"):
        seed_ordering(SHIFTS | {"top": [1.0]}, "top", "bottom", ["r1", "r2"])
