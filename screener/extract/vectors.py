"""Mean-difference vectors: mean(positive activations) − mean(negative activations) per method and layer.

Reads (prompt ids, response ids) go to `ActivationStage` on the workers, which reads them with the
screen's teacher-forced reader (`Scorer.means`) and returns sums (for the means: memory does not grow with
the data) or projections on unit vectors (for the evaluation). `specific_vectors` can take out, per layer,
the directions of other traits' written examples (`orthogonalize`), or whiten it against nuisance
contrasts (`whiten`: other traits' examples and the fit half of the style controls).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from screener.choices import WHITEN_SHRINKAGE, WHITEN_WEIGHT
from screener.distributed import Resources, run_stage
from screener.extract.examples import ExampleSet, from_trait, tokenized
from screener.extract.settings import CONTROL, NEG, POS, ExtractSettings, Read, batched
from screener.extract.traits import Trait
from screener.models import ModelRef
from screener.scoring import Scorer, ScoreSettings


@dataclass
class ActBatch:
    """Teacher-forced reads of one group (a polarity, or another trait's polarity), starting at `start` in
    it; with `units` the stage returns projections, else sums."""

    key: str
    start: int
    prompts: list[list[int]]
    responses: list[list[int]]
    units: torch.Tensor | None = None  # [3, L+1, H] unit vectors
    raw: bool = False  # return the reads' activations themselves `[B, 3, L+1, H]` (for covariances)


def act_batches(
    groups: dict[str, list[Read]], units: torch.Tensor | None = None, size: int = 64, raw: bool = False
) -> list[ActBatch]:
    """Batches of each group's (prompt, response) ids, for `ActivationStage`."""
    return [
        ActBatch(key, start, [p for p, _ in part], [r for _, r in part], units, raw)
        for key, reads in groups.items()
        for start, part in zip(range(0, len(reads), size), batched(reads, size), strict=True)
    ]


class ActivationStage:
    """Sums activations (extraction: only means are needed, so memory does not grow with the data) or
    projects them onto unit vectors (evaluation: one scalar per sample, method and layer), as read by the
    screen's teacher-forced reader (`Scorer.means`) at every layer."""

    def __init__(self, model: ModelRef, settings: ExtractSettings, memo: dict | None = None):
        self.ref, self.settings, self.work = model, settings, settings.work()
        self.scorer: Scorer | None = None
        # in-process only: reads already made (by this trait's steps or, in a multi-trait run, another's)
        self.memo = memo

    def setup(self) -> None:
        layers = tuple(range(self.ref.num_layers + 1))
        reads = ScoreSettings(layers=layers, batch_tokens=self.settings.batch_tokens, max_batch_size=64)
        self.scorer = self.work.scorer(self.ref, None, reads)

    def read(self, prompts: list[list[int]], responses: list[list[int]]) -> torch.Tensor:
        """`[reads, 3, L+1, H]` activations (`METHODS` order) in the reads' order."""
        assert self.scorer is not None, "setup() first"
        if self.memo is None:
            return self.scorer.means(prompts, responses)
        keys = [(tuple(p), tuple(r)) for p, r in zip(prompts, responses, strict=True)]
        todo = [i for i, k in enumerate(keys) if k not in self.memo]
        if todo:
            got = self.scorer.means([prompts[i] for i in todo], [responses[i] for i in todo])
            self.memo.update((keys[i], got[j].clone()) for j, i in enumerate(todo))
        return torch.stack([self.memo[k] for k in keys])

    def process(self, batch: ActBatch, report=None) -> torch.Tensor:
        acts = self.read(batch.prompts, batch.responses)
        if batch.raw:
            return acts.float()  # [B, 3, L+1, H]
        if batch.units is None:
            return acts.double().sum(dim=0)  # [3, L+1, H]
        return (acts * batch.units).sum(dim=-1)  # [B, 3, L+1]


def keyed(
    positives: list[Read], negatives: list[Read], others: dict[str, tuple[list[Read], list[Read]]]
) -> dict[str, list[Read]]:
    """Groups for one pass: `pos`, `neg`, then each other trait's as `<trait>/pos`, `<trait>/neg`."""
    groups = {POS: positives, NEG: negatives}
    for name, (pos, neg) in others.items():
        groups[f"{name}/{POS}"], groups[f"{name}/{NEG}"] = pos, neg
    return groups


def group_means(
    groups: dict[str, list[Read]], stage: ActivationStage, resources: Resources
) -> dict[str, torch.Tensor]:
    """`{group: [3, L+1, H]}` float64 mean activations of each group's reads, from one pass over all."""
    sums: dict[str, torch.Tensor | int] = dict.fromkeys(groups, 0)
    for batch, total in run_stage(stage, act_batches(groups), resources):
        sums[batch.key] = sums[batch.key] + total
    return {key: sums[key] / len(reads) for key, reads in groups.items()}


def mean_difference(
    positives: list[Read],
    negatives: list[Read],
    stage: ActivationStage,
    resources: Resources,
    contrasts: dict[str, tuple[list[Read], list[Read]]] | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Step 4: `[3, L+1, H]` float32 vectors, mean(positive) − mean(negative) per method and layer, and
    the same float64 difference for each of `contrasts` (other traits' examples, to orthogonalise against),
    all from one pass."""
    means = group_means(keyed(positives, negatives, contrasts or {}), stage, resources)
    others = {name: means[f"{name}/{POS}"] - means[f"{name}/{NEG}"] for name in contrasts or {}}
    return (means[POS] - means[NEG]).float(), others


def orthogonalize(vector: torch.Tensor, others: Sequence[torch.Tensor], rtol: float = 1e-6) -> torch.Tensor:
    """`vector` `[L+1, H]` less, at each layer, its component in the span of the `others` (each `[L+1, H]`):
    modified Gram-Schmidt in float64; a direction already (numerically) in the span adds nothing."""
    out = vector.double().clone()
    for layer in range(out.shape[0]):
        basis: list[torch.Tensor] = []
        for o in others:
            b = o[layer].double().clone()
            scale = b.norm()
            for q in basis:
                b -= (b @ q) * q
            if scale > 0 and b.norm() > rtol * scale:
                basis.append(b / b.norm())
        for q in basis:
            out[layer] -= (out[layer] @ q) * q
    return out.float()


def raw_activations(
    groups: dict[str, list[Read]], stage: ActivationStage, resources: Resources, whole: Sequence[str] = ()
) -> dict[str, torch.Tensor]:
    """`{group: activations}` in each group's order: every method's `[reads, 3, L+1, H]` for the groups in
    `whole`, response_avg's `[reads, L+1, H]` for the others (only it is whitened against)."""
    parts: dict[str, dict[int, torch.Tensor]] = {key: {} for key in groups}
    for batch, acts in run_stage(stage, act_batches(groups, raw=True), resources):
        parts[batch.key][batch.start] = acts if batch.key in whole else acts[:, 0].clone()
    return {key: torch.cat([got[start] for start in sorted(got)]) for key, got in parts.items() if got}


@dataclass(frozen=True)
class Whitening:
    """How `whiten` weighs the nuisance contrasts and shrinks the covariance (chosen on the trait files'
    held-out pairs and the controls' check halves: benchmarks/RESULTS.md, "Whitened vectors")."""

    shrinkage: float = WHITEN_SHRINKAGE  # ridge, as a share of the covariance's mean eigenvalue
    weight: float = WHITEN_WEIGHT  # of the nuisance contrasts' second moment against the trait's own spread

    HOW = (
        "the response_avg vector is, at each layer, the mean difference mu whitened against what varies "
        "besides the trait: w = (C + weight * N + shrinkage * tr(C + weight * N) / H * I)^-1 mu, where C is "
        "the covariance of the trait's own pair differences (pooled within-class covariance times 2 when "
        "unpaired) and N the uncentred second moment of the nuisance pair differences; w is then scaled "
        "to mu's component along it, so the file keeps activation units"
    )


def whiten(
    positives: torch.Tensor,
    negatives: torch.Tensor,
    paired: bool,
    nuisance: Sequence[torch.Tensor],
    how: Whitening,
) -> torch.Tensor:
    """`[L+1, H]` whitened direction from the trait's `[n, L+1, H]` response_avg activations and the
    nuisance pair differences (each `[m, L+1, H]`), per layer in float64 (`Whitening.HOW`)."""
    pos, neg = positives.double(), negatives.double()
    mu = pos.mean(0) - neg.mean(0)
    if paired:
        own = (pos - neg) - mu
        own_n = len(own)
    else:
        own = torch.cat([pos - pos.mean(0), neg - neg.mean(0)])
        own_n = len(own) / 2  # the covariance of a difference of two independent draws is 2x
    noise = torch.cat([d.double() for d in nuisance]) if nuisance else None
    out = torch.empty_like(mu)
    eye = torch.eye(mu.shape[-1], dtype=torch.float64)
    for layer in range(mu.shape[0]):
        cov = own[:, layer].T @ own[:, layer] / max(own_n, 1)
        if noise is not None:
            cov = cov + how.weight * (noise[:, layer].T @ noise[:, layer]) / len(noise)
        if cov.trace() <= 0:  # nothing varies (one pair, no nuisance): nothing to whiten against
            out[layer] = mu[layer]
            continue
        cov = cov + max(how.shrinkage, 1e-9) * cov.trace() / cov.shape[0] * eye
        w = torch.linalg.solve(cov, mu[layer])
        norm = w.norm()
        out[layer] = w * ((mu[layer] @ w) / norm**2) if norm > 0 else w
    return out.float()


def projections(
    groups: dict[str, list[Read]], vectors: torch.Tensor, stage: ActivationStage, resources: Resources
) -> dict[str, np.ndarray]:
    """Step 5: `{group: [reads, 3, L+1]}` projections on the unit vectors, in each group's order (batches may
    finish in any order on actors; paired statistics need row i of two groups to be one pair)."""
    units = vectors / vectors.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    parts: dict[str, dict[int, torch.Tensor]] = {key: {} for key in groups}
    for batch, proj in run_stage(stage, act_batches(groups, units), resources):
        parts[batch.key][batch.start] = proj
    empty = torch.zeros((0, 3, vectors.shape[1]))
    return {
        key: torch.cat([got[start] for start in sorted(got)] or [empty]).numpy() for key, got in parts.items()
    }


def example_reads(
    tokenizer, examples: ExampleSet, max_tokens: int
) -> tuple[list[Read], list[Read], bool, int]:
    """(positive reads, negative reads, paired, truncated): pairs row for row when the set is paired."""
    if examples.paired:
        pairs = examples.pairs()
        pos, cut_pos = tokenized(tokenizer, [p for p, _ in pairs], max_tokens)
        neg, cut_neg = tokenized(tokenizer, [n for _, n in pairs], max_tokens)
        return pos, neg, True, cut_pos + cut_neg
    pos, cut_pos = tokenized(tokenizer, examples.positives, max_tokens)
    neg, cut_neg = tokenized(tokenizer, examples.negatives, max_tokens)
    return pos, neg, False, cut_pos + cut_neg


def specific_vectors(
    positives: list[Read],
    negatives: list[Read],
    orthogonal_to: dict[str, Trait] | None,
    tokenizer,
    settings: ExtractSettings,
    stage: ActivationStage,
    resources: Resources,
    paired: bool = True,
    whitening: tuple[Whitening, dict[str, Trait], dict[str, tuple[list[Read], list[Read]]]] | None = None,
) -> tuple[torch.Tensor, dict]:
    """Step 4: the mean-difference vectors; with `orthogonal_to`, the response_avg vector less, per layer,
    its component in the span of those traits' own example directions (the mean difference of their
    written `examples`, read in the same pass), so it does not measure what they share. With `whitening`
    (how, the traits whose examples are nuisance, the controls' fit halves as (a, b) reads), the
    response_avg vector is whitened against them first (`whiten`). The sidecar fields that say so come
    back with them."""

    def reads(other: Trait) -> tuple[list[Read], list[Read]]:
        pos, neg, _, _ = example_reads(tokenizer, from_trait(other, "examples"), settings.max_tokens)
        return pos, neg

    contrasts = {name: reads(other) for name, other in (orthogonal_to or {}).items()}
    fields: dict = {}
    if whitening is None:
        vectors, means = mean_difference(positives, negatives, stage, resources, contrasts)
        directions = {name: d[0] for name, d in means.items()}
    else:
        # one pass reads the trait's examples, the nuisance pairs and the orthogonalisation's contrasts
        how, traits, control_fit = whitening
        nuisance = {name: reads(other) for name, other in traits.items()}
        nuisance |= {f"{CONTROL}{name}": ab for name, ab in control_fit.items()}
        groups = keyed(positives, negatives, {**contrasts, **nuisance})
        acts = raw_activations(groups, stage, resources, whole=(POS, NEG))

        def diff(key: str) -> torch.Tensor:
            return acts[f"{key}/{POS}"] - acts[f"{key}/{NEG}"]

        vectors = (acts[POS].double().mean(0) - acts[NEG].double().mean(0)).float()
        noise = [diff(key) for key in nuisance if f"{key}/{POS}" in acts]
        vectors[0] = whiten(acts[POS][:, 0], acts[NEG][:, 0], paired, noise, how)
        directions = {
            name: acts[f"{name}/{POS}"].double().mean(0) - acts[f"{name}/{NEG}"].double().mean(0)
            for name in contrasts
        }
        fields["whitened"] = {
            "traits": {name: t.sha256 for name, t in traits.items()},
            "controls": {
                name: {"pairs": len(a), "half": "even pairs (0, 2, ...)"}
                for name, (a, _) in control_fit.items()
            },
            "shrinkage": how.shrinkage,
            "weight": how.weight,
            "how": Whitening.HOW,
        }
    if directions:
        vectors[0] = orthogonalize(vectors[0], list(directions.values()))
        fields["orthogonal_to"] = {
            "traits": {name: t.sha256 for name, t in orthogonal_to.items()},
            "how": "the response_avg vector less, at each layer, its component in the span of these traits' "
            "response_avg mean differences over their written 'examples' (modified Gram-Schmidt); the other "
            "methods are plain mean differences",
        }
    return vectors, fields
