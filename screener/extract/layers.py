"""The layer report: how well each layer's vector separates trait-expressing from neutral responses.

For each layer L, the held-out positive and negative responses are projected onto the unit vector at L,
and two numbers summarise the separation:

- AUROC: P(projection of a random positive > that of a random negative), ties counting half
  (Mann-Whitney U from average ranks). 0.5 = no separation, 1.0 = perfect.
- effect size: Cohen's d, (mean_pos − mean_neg) / pooled standard deviation (ddof=1).

When the positives and negatives are pairs (two answers to one question), two paired numbers too:

- share ranked right: the fraction of pairs whose positive projects above its negative (a tie counts
  half). 0.5 = chance, 1.0 = every pair in the right order.
- paired effect size: mean of the per-pair differences / their standard deviation (ddof=1).

Specificity: a vector should measure its trait and only its trait. `cross_trait` scores it on every other
trait's held-out pairs, layer by layer; there the share ranked should stay near 0.5. The same function
scores it on every style control (controls.py: pairs that differ in a nuisance such as hedging or length
and in no trait), where "share ranked" is the share of pairs whose side a projects above side b.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

# Written into every sidecar, so a reader knows how `chosen_layer` was picked.
CHOICE_RULE = (
    "the layer with the highest AUROC (rounded to 0.01) on the held-out evaluation pairs, ties broken by "
    "the larger effect size, among the middle layers round(n/4)..round(3n/4); the persona-vectors paper "
    "found middle layers steer best, and the first and last layers (embeddings, final norm) are excluded"
)


# A layer keeps another trait "near chance" when the vector ranks that trait's positive answer above its
# negative one in this share of its held-out pairs (on 20 pairs, chance alone leaves 0.5 ± 0.11).
NEAR_CHANCE = (0.25, 0.75)

SPECIFIC_CHOICE_RULE = (
    "among the middle layers round(n/4)..round(3n/4), those where the vector ranks every other trait's "
    "held-out pairs{controls} near chance (share ranked right within {lo:g}..{hi:g}{exempt}); of these, "
    "the layer with the highest share ranked right on its own trait's held-out pairs (rounded to 0.01), "
    "ties broken by the larger paired effect size (AUROC and Cohen's d when the held-out examples are not "
    "paired). If no middle layer keeps every other trait{controls_fb} near chance, the layer with the "
    "largest margin: own share ranked minus the worst other trait's{controls_or} max(share, 1 - share), "
    "ties broken by the paired effect size"
)


@dataclass(frozen=True)
class LayerStats:
    layer: int
    auroc: float
    effect_size: float
    pos_mean: float
    neg_mean: float
    share_ranked: float | None = None  # paired held-out examples only
    paired_d: float | None = None

    def separation(self) -> tuple[float, float]:
        """(share ranked right, paired d) for paired examples, else (AUROC, Cohen's d)."""
        if self.share_ranked is not None:
            return self.share_ranked, _finite(self.paired_d)
        return self.auroc, _finite(self.effect_size)


def _finite(x: float | None) -> float:
    return x if x is not None and np.isfinite(x) else -np.inf


def average_ranks(values: np.ndarray) -> np.ndarray:
    """1-based ranks, ties sharing their average rank."""
    order = np.argsort(values, kind="mergesort")
    ranks = np.empty(len(values))
    sorted_vals = values[order]
    i = 0
    while i < len(values):
        j = i
        while j + 1 < len(values) and sorted_vals[j + 1] == sorted_vals[i]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def auroc(pos: np.ndarray, neg: np.ndarray) -> float:
    """P(pos > neg) + P(pos == neg) / 2, from the rank sum of the positives."""
    n_pos, n_neg = len(pos), len(neg)
    if not n_pos or not n_neg:
        return float("nan")
    ranks = average_ranks(np.concatenate([pos, neg]).astype(np.float64))
    u = ranks[:n_pos].sum() - n_pos * (n_pos + 1) / 2
    return float(u / (n_pos * n_neg))


def cohens_d(pos: np.ndarray, neg: np.ndarray) -> float:
    n_pos, n_neg = len(pos), len(neg)
    if n_pos < 2 or n_neg < 2:
        return float("nan")
    pooled = ((n_pos - 1) * pos.var(ddof=1) + (n_neg - 1) * neg.var(ddof=1)) / (n_pos + n_neg - 2)
    diff = float(pos.mean() - neg.mean())
    if pooled == 0:
        return 0.0 if diff == 0 else float(np.sign(diff) * np.inf)
    return diff / float(np.sqrt(pooled))


def share_ranked(pos: np.ndarray, neg: np.ndarray) -> float:
    """Fraction of pairs (pos[i], neg[i]) in the right order, ties counting half."""
    diff = np.asarray(pos, np.float64) - np.asarray(neg, np.float64)
    return float(((diff > 0) + 0.5 * (diff == 0)).mean()) if len(diff) else float("nan")


def paired_d(pos: np.ndarray, neg: np.ndarray) -> float:
    """Mean of the pairs' differences over their standard deviation (ddof=1)."""
    diff = np.asarray(pos, np.float64) - np.asarray(neg, np.float64)
    if len(diff) < 2:
        return float("nan")
    sd, mean = float(diff.std(ddof=1)), float(diff.mean())
    if sd == 0:
        return 0.0 if mean == 0 else float(np.sign(mean) * np.inf)
    return mean / sd


def layer_report(pos: np.ndarray, neg: np.ndarray, paired: bool = False) -> list[LayerStats]:
    """`pos`, `neg`: `[samples, num_layers+1]` projections; one row of stats per layer. With `paired`,
    row i of `pos` and of `neg` are the two answers of one pair, and the paired numbers are filled in."""
    if not len(pos) or not len(neg):
        return []
    if paired and len(pos) != len(neg):
        raise ValueError(f"paired report: {len(pos)} positives but {len(neg)} negatives")
    return [
        LayerStats(
            layer,
            auroc(pos[:, layer], neg[:, layer]),
            cohens_d(pos[:, layer], neg[:, layer]),
            float(pos[:, layer].mean()),
            float(neg[:, layer].mean()),
            share_ranked(pos[:, layer], neg[:, layer]) if paired else None,
            paired_d(pos[:, layer], neg[:, layer]) if paired else None,
        )
        for layer in range(pos.shape[1])
    ]


def cross_trait(projections: dict[str, tuple[np.ndarray, np.ndarray]]) -> dict[str, dict[str, list[float]]]:
    """The specificity matrix of one vector: `{other trait: {"share_ranked": [per layer], "paired_d": [...]}}`
    from `{other trait: (pos, neg)}` paired `[pairs, num_layers+1]` projections of its held-out examples."""
    return {
        name: {
            "share_ranked": [round(share_ranked(pos[:, i], neg[:, i]), 4) for i in range(pos.shape[1])],
            "paired_d": [round(paired_d(pos[:, i], neg[:, i]), 4) for i in range(pos.shape[1])],
        }
        for name, (pos, neg) in projections.items()
    }


def _middle(num_layers: int) -> tuple[int, int]:
    return max(1, round(num_layers / 4)), min(num_layers - 1, round(3 * num_layers / 4))


def choose_layer(report: list[LayerStats], num_layers: int) -> int | None:
    """The default layer by `CHOICE_RULE`; None without a report (no evaluation pair kept)."""
    lo, hi = _middle(num_layers)
    band = [r for r in report if lo <= r.layer <= hi and np.isfinite(r.auroc)]
    if not band:
        return None

    def key(r: LayerStats) -> tuple[float, float]:
        return round(r.auroc, 2), r.effect_size if np.isfinite(r.effect_size) else -np.inf

    return max(band, key=key).layer


def specific_rule(
    band: tuple[float, float] = NEAR_CHANCE, exempt: dict[str, str] | None = None, controls: bool = False
) -> str:
    """`SPECIFIC_CHOICE_RULE` with its band, the traits it does not hold to chance and why, and whether the
    style controls are held to chance too."""
    why = "; ".join(f"{name}: {reason}" for name, reason in sorted((exempt or {}).items()))
    return SPECIFIC_CHOICE_RULE.format(
        lo=band[0],
        hi=band[1],
        exempt=f"; not held to chance, as related traits: {why}" if why else "",
        controls=" and every style control's pairs (side a above side b)" if controls else "",
        controls_fb=" and every control" if controls else "",
        controls_or=" or control's" if controls else "",
    )


def choose_specific_layer(
    report: list[LayerStats],
    others: dict[str, dict[str, list[float]]],
    num_layers: int,
    band: tuple[float, float] = NEAR_CHANCE,
    exempt: Sequence[str] = (),
    controls: dict[str, dict[str, list[float]]] | None = None,
) -> tuple[int | None, str]:
    """The default layer by `specific_rule`, and how it was reached: "specific" (every other trait and
    every control near chance there), "fallback" (no middle layer is), or "no report". `others` and
    `controls` are `cross_trait`'s matrices; traits in `exempt` are reported but not held to chance."""
    lo, hi = _middle(num_layers)
    rows = [r for r in report if lo <= r.layer <= hi and np.isfinite(r.separation()[0])]
    if not rows:
        return None, "no report"
    held = [m["share_ranked"] for name, m in others.items() if name not in exempt]
    held += [m["share_ranked"] for m in (controls or {}).values()]

    def worst(layer: int) -> float:  # the other trait farthest from chance, as a share on the high side
        return max((max(s[layer], 1 - s[layer]) for s in held), default=0.5)

    def key(r: LayerStats) -> tuple[float, float]:
        share, d = r.separation()
        return round(share, 2), d

    specific = [r for r in rows if all(band[0] <= s[r.layer] <= band[1] for s in held)]
    if specific:
        return max(specific, key=key).layer, "specific"
    best = max(rows, key=lambda r: (round(r.separation()[0] - worst(r.layer), 2), r.separation()[1]))
    return best.layer, "fallback"


def format_report(report: list[dict], chosen: int | None = None) -> str:
    """The layer table as text (rows are `LayerStats` as dicts, as stored in sidecars); the paired columns
    when the held-out examples were pairs."""
    paired = any(r.get("share_ranked") is not None for r in report)
    head = f"{'layer':>5}  {'AUROC':>6}  {'effect d':>8}"
    head += f"  {'ranked':>6}  {'paired d':>8}" if paired else ""
    lines = [head + f"  {'pos mean':>9}  {'neg mean':>9}"]
    for r in report:
        mark = "  <- chosen" if r["layer"] == chosen else ""
        line = f"{r['layer']:>5}  {r['auroc']:>6.3f}  {r['effect_size']:>8.2f}"
        if paired:
            line += f"  {r['share_ranked']:>6.3f}  {r['paired_d']:>8.2f}"
        lines.append(line + f"  {r['pos_mean']:>9.3f}  {r['neg_mean']:>9.3f}{mark}")
    return "\n".join(lines)


def format_cross_trait(
    own: dict | None,
    others: dict[str, dict[str, list[float]]],
    layer: int,
    band: tuple = NEAR_CHANCE,
    head: str = "trait",
) -> str:
    """The specificity table at one layer: the vector's own held-out figures, then each other trait's (or
    each control's, with `head` "control" and no `own`)."""
    width = max([16, *(len(n) for n in others)])
    lines = [f"{head:<{width}}  {'ranked':>6}  {'paired d':>8}"]
    if own is not None and own.get("share_ranked") is not None:
        lines.append(f"{'(own) ':<{width}}  {own['share_ranked']:>6.3f}  {own['paired_d']:>8.2f}")
    for name, m in sorted(others.items()):
        share, d = m["share_ranked"][layer], m["paired_d"][layer]
        flag = "" if band[0] <= share <= band[1] else "  outside " + f"{band[0]:g}..{band[1]:g}"
        lines.append(f"{name:<{width}}  {share:>6.3f}  {d:>8.2f}{flag}")
    return "\n".join(lines)


def format_cross_trait_layers(others: dict[str, dict[str, list[float]]], chosen: int | None = None) -> str:
    """Share ranked right on every other trait's held-out pairs, layer by layer."""
    names = sorted(others)
    lines = [f"{'layer':>5}  " + "  ".join(f"{n[:12]:>12}" for n in names)]
    layers = len(next(iter(others.values()))["share_ranked"]) if others else 0
    for layer in range(layers):
        mark = "  <- chosen" if layer == chosen else ""
        cells = "  ".join(f"{others[n]['share_ranked'][layer]:>12.3f}" for n in names)
        lines.append(f"{layer:>5}  {cells}{mark}")
    return "\n".join(lines)
