"""The held-out evaluation: what the layer report, the specificity matrix and the style controls read.

The held-out reads are the trait's own held-out examples (`--eval-examples`, the trait file's
`eval_examples`, or generated answers to its evaluation questions), every other trait's `eval_examples`
and the style control sets, all read after the question alone so every method is compared on the same
data (`held_out`); `evaluate` projects them on the vectors in one pass and reports per method
(layers.py: `layer_report`, `cross_trait`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from screener.distributed import Resources
from screener.extract.controls import Control, load_controls
from screener.extract.examples import from_trait, from_written, read_example_files
from screener.extract.generation import Pair, generated_reads
from screener.extract.layers import LayerStats, cross_trait, layer_report
from screener.extract.settings import CONTROL, METHODS, NEG, POS, ExtractError, ExtractSettings, Read
from screener.extract.traits import Trait, TraitError, list_traits, load_trait
from screener.extract.vectors import ActivationStage, example_reads, keyed, projections


@dataclass
class HeldOut:
    """What the layer report and the specificity matrix read: the trait's own held-out examples (paired
    when every positive has its negative, row for row) and every other trait's held-out pairs."""

    positives: list[Read]
    negatives: list[Read]
    paired: bool
    description: dict  # where the examples came from and how many, for the sidecar
    others: dict[str, tuple[list[Read], list[Read]]] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)  # other traits not scored, and why
    # style controls: (side a, side b) reads of each, and what each set is (Control.describe)
    controls: dict[str, tuple[list[Read], list[Read]]] = field(default_factory=dict)
    control_sets: dict[str, dict] = field(default_factory=dict)
    # with a whitened vector: each control's even pairs, which fit it; `controls` then holds the odd ones
    control_fit: dict[str, tuple[list[Read], list[Read]]] = field(default_factory=dict)


def other_traits(trait: Trait, traits_dir: str | Path | None) -> tuple[dict[str, Trait], dict[str, str]]:
    """Every other visible trait with held-out examples, and those left out with the reason."""
    others, skipped = {}, {}
    for name, path in list_traits(traits_dir):
        if name == trait.name:
            continue
        try:
            other = load_trait(str(path))
        except TraitError as e:
            skipped[name] = str(e)
            continue
        if other.eval_examples:
            others[name] = other
        else:
            skipped[name] = "no eval_examples"
    return others, skipped


def orthogonal_traits(trait: Trait, spec: str, traits_dir: str | Path | None = None) -> dict[str, Trait]:
    """The traits whose example directions `--orthogonal-to` removes: "none", "others" (every other visible
    trait with written examples, except those the trait file declares `related`: it may share their
    direction), or comma-separated names."""
    if spec in ("", "none"):
        return {}
    if spec == "others":
        others = other_traits(trait, traits_dir)[0]
        return {name: t for name, t in others.items() if t.examples and name not in trait.related}
    chosen = {}
    for name in (n.strip() for n in spec.split(",") if n.strip()):
        other = load_trait(name, traits_dir)
        if other.name == trait.name:
            raise ExtractError(f"--orthogonal-to: {name} is the trait being extracted")
        if not other.examples:
            raise ExtractError(
                f"--orthogonal-to: {other.path} has no written 'examples' to take a direction from"
            )
        chosen[other.name] = other
    return chosen


def held_out(
    trait: Trait,
    tokenizer,
    settings: ExtractSettings,
    eval_files: Sequence[str] = (),
    traits_dir: str | Path | None = None,
    generated: list[Pair] | None = None,
    controls: dict[str, Control] | None = None,
    split_controls: bool = False,
) -> HeldOut:
    """The held-out reads: `--eval-examples` files, else the trait's `eval_examples`, else (generation only)
    the generated answers to its evaluation questions, read in the settings' context; plus every other
    trait's `eval_examples` and every style control's pairs (default: the built-in sets), each question
    asked alone. With `split_controls` each control's even pairs go to `control_fit` (a whitened vector
    is fitted on them) and only its odd pairs are reported, so no control is scored on pairs that shaped
    the vector."""
    if eval_files:
        examples = read_example_files(eval_files)
        pos, neg, paired, _ = example_reads(tokenizer, examples, settings.max_tokens)
        described = {"source": "files", "files": examples.sources, **examples.counts()}
    elif trait.eval_examples:
        examples = from_trait(trait, "eval_examples")
        pos, neg, paired, _ = example_reads(tokenizer, examples, settings.max_tokens)
        described = {"source": "trait file eval_examples", **examples.counts()}
    elif generated is not None:
        (pos, neg), paired = generated_reads(generated, settings.read_context), True
        described = {"source": f"generated answers to eval_questions, read after the {settings.read_context}"}
        described.update(positive=len(pos), negative=len(neg), pairs=len(pos))
    else:
        raise ExtractError(
            f"{trait.name}: no held-out examples for the layer report: add 'eval_examples' to {trait.path} "
            "or pass --eval-examples FILE"
        )
    others, skipped = other_traits(trait, traits_dir)
    held = HeldOut(pos, neg, paired, described, skipped=skipped)
    for name, other in others.items():
        o_pos, o_neg, _, _ = example_reads(tokenizer, from_trait(other, "eval_examples"), settings.max_tokens)
        held.others[name] = (o_pos, o_neg)
    for name, control in (load_controls() if controls is None else controls).items():
        source = {"control": name, "sha256": control.sha256}
        examples = from_written(control.pairs, f"{control.path} (pairs)", source)
        a, b, _, _ = example_reads(tokenizer, examples, settings.max_tokens)
        held.control_sets[name] = {"description": control.description, **control.describe()}
        if split_controls:
            held.control_fit[name] = (a[0::2], b[0::2])
            a, b = a[1::2], b[1::2]
            held.control_sets[name].update(
                pairs=len(a), half="odd pairs (1, 3, ...): the even ones fit the vector"
            )
        held.controls[name] = (a, b)
    return held


def evaluate(
    vectors: torch.Tensor, held: HeldOut, stage: ActivationStage, resources: Resources
) -> tuple[dict[str, list[LayerStats]], dict[str, dict], dict[str, dict]]:
    """Step 6: per method, the layer report on the held-out examples, the cross-trait matrix on every
    other trait's and the same matrix on every style control, from one pass over all of them."""
    controls = {CONTROL + name: reads for name, reads in held.controls.items()}
    groups = keyed(held.positives, held.negatives, {**held.others, **controls})
    proj = projections(groups, vectors, stage, resources)
    return (*held_out_reports(proj, held), control_reports(proj, held))


def held_out_reports(
    proj: dict[str, np.ndarray], held: HeldOut, methods: Sequence[str] = METHODS
) -> tuple[dict[str, list[LayerStats]], dict[str, dict]]:
    """Layer reports and cross-trait matrices from `{group: [reads, methods, L+1]}` projections."""
    reports, specificity = {}, {}
    for i, method in enumerate(methods):
        reports[method] = layer_report(proj[POS][:, i], proj[NEG][:, i], paired=held.paired)
        specificity[method] = cross_trait(
            {name: (proj[f"{name}/{POS}"][:, i], proj[f"{name}/{NEG}"][:, i]) for name in held.others}
        )
    return reports, specificity


def control_reports(
    proj: dict[str, np.ndarray], held: HeldOut, methods: Sequence[str] = METHODS
) -> dict[str, dict]:
    """Per method, `cross_trait`'s matrix on every style control (share of pairs with side a above b)."""
    return {
        method: cross_trait(
            {
                name: (proj[f"{CONTROL}{name}/{POS}"][:, i], proj[f"{CONTROL}{name}/{NEG}"][:, i])
                for name in held.controls
            }
        )
        for i, method in enumerate(methods)
    }
