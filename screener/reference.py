"""A reference distribution's arithmetic (numpy only, so the read commands stay light): the 0th..100th
percentiles of a score on ordinary chat, and where a value falls among them. The `scored` view's
`ref_percentile` (sql/views.sql) is `percentile_of` in SQL."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

PERCENTILES = np.linspace(0, 100, 101)


def distribution(values: Sequence[float]) -> dict:
    """n, mean, std (ddof=1) and the 0th..100th percentiles of the values that are not NaN."""
    x = np.asarray([v for v in values if v is not None], dtype=np.float64)
    x = x[np.isfinite(x)]
    if not len(x):
        return {"n": 0, "mean": None, "std": None, "quantiles": []}
    return {
        "n": len(x),
        "mean": round(float(x.mean()), 6),
        "std": round(float(x.std(ddof=1)), 6) if len(x) > 1 else None,
        "quantiles": [round(float(q), 6) for q in np.percentile(x, PERCENTILES)],
    }


def percentile_of(value: float, quantiles: Sequence[float]) -> float:
    """Where `value` falls among the reference, 0..100: linear between the stored percentiles (as the
    `scored` view computes `ref_percentile`); below the minimum 0, above the maximum 100."""
    q = list(quantiles)
    k = sum(1 for x in q if x <= value)  # how many stored percentiles lie at or below the value
    if k == 0:
        return 0.0
    if k >= len(q):
        return 100.0
    lo, hi = q[k - 1], q[k]
    return 100.0 * ((k - 1) + (value - lo) / (hi - lo)) / (len(q) - 1)


def share_below(edges: Sequence[float], quantiles: Sequence[float]) -> np.ndarray:
    """The reference's share (0..1) at or below each edge: for drawing it over a dataset's histogram."""
    return np.array([percentile_of(e, quantiles) / 100 for e in edges])
