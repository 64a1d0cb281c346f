"""What an extraction writes: one `.pt` per method with its JSON sidecar (the trait file, the model, the
settings, the layer report, the specificity and control matrices and the chosen layer), and every
generated response with its judge scores.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from screener.extract.evaluation import HeldOut
from screener.extract.generation import Answer
from screener.extract.layers import (
    CHOICE_RULE,
    NEAR_CHANCE,
    LayerStats,
    choose_layer,
    choose_specific_layer,
    specific_rule,
)
from screener.extract.settings import METHODS
from screener.extract.traits import Trait
from screener.models import ModelRef
from screener.vectors import save_vector

log = logging.getLogger(__name__)


@dataclass
class ExtractResult:
    paths: dict[str, Path]
    sidecars: dict[str, dict]
    seconds: float


def response_only(methods: Sequence[str], common: dict, why: str) -> list[str]:
    """Drop the prompt methods (recorded in the sidecar): with shared prompts their difference is zero."""
    left_out = [m for m in methods if m != "response_avg"]
    if left_out:
        common["methods_not_written"] = {
            m: f"{why}, so the positive and negative prompts are the same and the difference is zero"
            for m in left_out
        }
        log.info("%s: not written (%s)", ", ".join(left_out), why)
    return [m for m in methods if m == "response_avg"]


def trait_and_model_fields(trait: Trait, model: ModelRef) -> dict:
    """The sidecar fields that say which trait file and which model weights a vector comes from."""
    return {
        "trait": trait.name,
        "trait_description": trait.description,
        "trait_version": trait.version,
        "trait_file_sha256": trait.sha256,
        "model": model.spec,
        "model_name": model.name,
        "model_source": model.source or model.path,
        "model_sha256": model.sha256,
        "num_layers": model.num_layers,
        "hidden_size": model.hidden_size,
    }


def write_vectors(
    out_dir: Path,
    trait: Trait,
    vectors: torch.Tensor,
    evaluated: tuple[dict[str, list[LayerStats]], dict[str, dict], dict[str, dict]],
    held: HeldOut,
    common: dict,
    model: ModelRef,
    methods: Sequence[str],
    started: float,
) -> ExtractResult:
    """Step 7: one `.pt` + sidecar per method asked for, with its layer report, its cross-trait and control
    matrices (`evaluate`'s three) and the chosen layer (by the specificity rule when other traits or
    controls were scored, else by `CHOICE_RULE`)."""
    reports, specificity, controls = evaluated
    exempt = {name: why for name, why in trait.related.items() if name in held.others}
    specific = bool(held.others or held.controls)
    common = {
        **common,
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "chosen_layer_rule": (
            specific_rule(NEAR_CHANCE, exempt, bool(held.controls)) if specific else CHOICE_RULE
        ),
        "eval_examples": held.description,
    }
    paths, sidecars = {}, {}
    for m, method in enumerate(METHODS):
        if method not in methods:
            continue
        if specific:
            chosen, how = choose_specific_layer(
                reports[method],
                specificity[method],
                model.num_layers,
                NEAR_CHANCE,
                list(exempt),
                controls[method],
            )
        else:
            chosen, how = choose_layer(reports[method], model.num_layers), "no other traits to score"
        sidecar = {
            **common,
            "method": method,
            "chosen_layer": chosen,
            "chosen_layer_how": how,
            "layer_report": [asdict(r) for r in reports[method]],
            "specificity": {
                "near_chance": list(NEAR_CHANCE),
                "not_held_to_chance": exempt,
                "skipped": held.skipped,
                "traits": specificity[method],
                "controls": controls[method],
                "control_sets": held.control_sets,
            },
        }
        paths[method] = save_vector(out_dir / f"{trait.name}_{method}_diff.pt", vectors[m], sidecar)
        sidecars[method] = sidecar
    return ExtractResult(paths, sidecars, time.perf_counter() - started)


def write_responses(path: Path, items: list[Answer]) -> None:
    """Every response with its scores, kept or not: nothing is dropped silently."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fields = (
        "split",
        "pair",
        "question",
        "sample",
        "polarity",
        "text",
        "response",
        "trait_score",
        "coherence",
    )
    with path.open("w") as f:
        for it in items:
            f.write(json.dumps({k: getattr(it, k) for k in fields}) + "\n")
