"""Persona-vector extraction: generate contrasting responses, judge them, keep clean pairs, average.

For every instruction pair, question and sample k, the model answers under the positive system prompt
("You are a/an {trait} assistant. {pos}") and the negative one ("You are a helpful assistant. {neg}").
A pair is kept when the judge finds the trait in the positive answer (score ≥ threshold), not in the
negative (< 100 − threshold), and both answers coherent (≥ coherence_min). The vector for a method is
mean(positive activations) − mean(negative activations) over the kept extraction pairs, at every layer:

    response_avg  mean of hidden_states[L] over the response tokens   (what screening projects onto)
    prompt_avg    mean of hidden_states[L] over the prompt tokens (system + question + template)
    prompt_last   hidden_states[L] at the last prompt token

Responses to the held-out evaluation questions give the layer report (layers.py). The steps, in order:
generate → judge → pair → activations → vectors → layer report → files. Model work runs as `Stage`s on
`run_stage`, like screening: in-process with actors=0, else on Ray actors.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from screener.distributed import Resources, run_stage
from screener.errors import UserError
from screener.extract.judges import Judge, NoJudge, coherence_prompt
from screener.extract.layers import CHOICE_RULE, LayerStats, choose_layer, layer_report
from screener.extract.traits import Trait
from screener.models import (
    LayerTap,
    ModelRef,
    chat_ids,
    decoder_parts,
    generate,
    pad,
    pick_device,
    pick_dtype,
    run_until_tapped,
)
from screener.scoring import length_batches
from screener.vectors import save_vector

log = logging.getLogger(__name__)

METHODS = ("response_avg", "prompt_avg", "prompt_last")
POS, NEG = "pos", "neg"


class ExtractError(UserError, RuntimeError):
    """An extraction that cannot produce a vector (e.g. the judge kept no pair)."""


@dataclass(frozen=True)
class ExtractSettings:
    samples: int = 5  # responses per (instruction pair, question, polarity)
    max_new_tokens: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int = 0
    threshold: float = 50.0
    coherence_min: float = 50.0
    batch_size: int = 32  # generation rows per batch
    batch_tokens: int = 8192  # padded tokens per activation forward
    dtype: str = "auto"
    device: str = "auto"


@dataclass(slots=True)
class Answer:
    """One response to a question under a system prompt: which split, pair, question, sample, polarity."""

    split: str  # "extract" | "eval"
    pair: int
    question: int
    sample: int
    polarity: str
    system: str
    text: str  # the question
    prompt_ids: list[int] = field(default_factory=list)
    response_ids: list[int] = field(default_factory=list)
    response: str = ""
    trait_score: float | None = None
    coherence: float | None = None

    @property
    def pair_key(self) -> tuple[str, int, int, int]:
        return self.split, self.pair, self.question, self.sample


Pair = tuple[Answer, Answer]  # (positive, negative)


def build_items(trait: Trait, samples: int) -> list[Answer]:
    """Every answer to generate: both polarities of each instruction pair, question and sample."""
    items = []
    for split, questions in (("extract", trait.questions), ("eval", trait.eval_questions)):
        for p, pair in enumerate(trait.instructions):
            for q, question in enumerate(questions):
                for k in range(samples):
                    items.append(Answer(split, p, q, k, POS, trait.positive_system(pair), question))
                    items.append(Answer(split, p, q, k, NEG, trait.negative_system(pair), question))
    return items


def batched(items: Sequence, size: int) -> Iterator[list]:
    """Consecutive slices of at most `size` items."""
    for i in range(0, len(items), size):
        yield list(items[i : i + size])


# -- generation -------------------------------------------------------------------------------------


def _resolved(device: str, dtype: str) -> tuple[torch.device, torch.dtype]:
    dev = pick_device(device)
    return dev, pick_dtype(dtype, dev)


class GenerationStage:
    """Answers batches of `Answer`s with the model itself (sampling seeded by the batch's contents)."""

    def __init__(self, model: ModelRef, settings: ExtractSettings):
        self.ref, self.settings = model, settings
        self.model = self.tokenizer = None

    def setup(self) -> None:
        self.model, self.tokenizer = self.ref.load(*_resolved(self.settings.device, self.settings.dtype))

    def process(self, items: list[Answer], report=None) -> list[Answer]:
        s = self.settings
        for it in items:
            it.prompt_ids = chat_ids(
                self.tokenizer,
                [{"role": "system", "content": it.system}, {"role": "user", "content": it.text}],
            )
        # so results do not depend on which actor ran the batch, or in which order
        first = items[0]
        digest = hashlib.sha256(repr((*first.pair_key, first.polarity)).encode()).hexdigest()
        out = generate(
            self.model,
            self.tokenizer,
            [it.prompt_ids for it in items],
            s.max_new_tokens,
            temperature=s.temperature,
            top_p=s.top_p,
            seed=s.seed + int(digest[:8], 16),
        )
        for it, ans in zip(items, out.answers, strict=True):
            it.response_ids = ans
            it.response = self.tokenizer.decode(ans, skip_special_tokens=True)
        return items


def generate_answers(
    trait: Trait, model: ModelRef, settings: ExtractSettings, resources: Resources
) -> list[Answer]:
    """Step 1: every answer of `build_items`, generated on the workers."""
    items = build_items(trait, settings.samples)
    log.info("%s: generating %d responses with %s", trait.name, len(items), model.name)
    started, generated = time.perf_counter(), []
    for _, done in run_stage(
        GenerationStage(model, settings), batched(items, settings.batch_size), resources
    ):
        generated.extend(done)
        log.info(
            "generated %d/%d responses (%.0f s)", len(generated), len(items), time.perf_counter() - started
        )
    return generated


# -- activations ------------------------------------------------------------------------------------


@torch.inference_mode()
def activations(model, prompts: Sequence[list[int]], responses: Sequence[list[int]]) -> torch.Tensor:
    """`[batch, 3, num_layers+1, hidden]` float32: response_avg, prompt_avg, prompt_last per sample.

    One right-padded forward with a tap on every layer (`hidden_states[L]`, the last after the final
    norm); the tap reduces each layer to the three means at once, so full hidden states never pile up.
    """
    device = next(model.parameters()).device
    seqs = [p + r for p, r in zip(prompts, responses, strict=True)]
    ids, _, _ = pad(seqs, 0, "right", device)  # causal attention keeps real tokens off the padding after them
    width = ids.shape[1]
    response_w = torch.zeros((len(seqs), width), device=device)
    prompt_w = torch.zeros((len(seqs), width), device=device)
    last = torch.tensor([len(p) - 1 for p in prompts], device=device)
    for b, (p, r) in enumerate(zip(prompts, responses, strict=True)):
        response_w[b, len(p) : len(p) + len(r)] = 1.0 / len(r)
        prompt_w[b, : len(p)] = 1.0 / len(p)
    rows = torch.arange(len(seqs), device=device)

    def means(_layer: int, h: torch.Tensor) -> torch.Tensor:
        h = h.float()
        return torch.stack(
            [
                torch.einsum("bt,bth->bh", response_w, h),
                torch.einsum("bt,bth->bh", prompt_w, h),
                h[rows, last],
            ],
            dim=1,
        )

    n = len(decoder_parts(model)[1])
    with LayerTap(model, range(n + 1), means) as tap:
        run_until_tapped(model, ids)
        per_layer = [tap.take(layer)[0] for layer in range(n + 1)]  # each [B, 3, H]
    return torch.stack(per_layer, dim=2).cpu()


@dataclass
class ActBatch:
    """Teacher-forced samples of one polarity; with `units` the stage returns projections, else sums."""

    polarity: str
    prompts: list[list[int]]
    responses: list[list[int]]
    units: torch.Tensor | None = None  # [3, L+1, H] unit vectors


def act_batches(pairs: list[Pair], units: torch.Tensor | None = None, size: int = 64) -> list[ActBatch]:
    """Batches of each polarity's (prompt, response) ids, for `ActivationStage`."""
    return [
        ActBatch(pol, [p[i].prompt_ids for p in part], [p[i].response_ids for p in part], units)
        for i, pol in enumerate((POS, NEG))
        for part in batched(pairs, size)
    ]


class ActivationStage:
    """Sums activations (extraction: only means are needed, so memory does not grow with the data) or
    projects them onto unit vectors (evaluation: one scalar per sample, method and layer)."""

    def __init__(self, model: ModelRef, settings: ExtractSettings):
        self.ref, self.settings = model, settings
        self.model = None

    def setup(self) -> None:
        self.model, _ = self.ref.load(*_resolved(self.settings.device, self.settings.dtype))

    def process(self, batch: ActBatch, report=None) -> torch.Tensor:
        lengths = [len(p) + len(r) for p, r in zip(batch.prompts, batch.responses, strict=True)]
        parts = {}
        for idx in length_batches(lengths, self.settings.batch_tokens, 64):
            acts = activations(self.model, [batch.prompts[i] for i in idx], [batch.responses[i] for i in idx])
            for i, a in zip(idx, acts, strict=True):
                parts[i] = a
        acts = torch.stack([parts[i] for i in range(len(lengths))])
        if batch.units is None:
            return acts.double().sum(dim=0)  # [3, L+1, H]
        return (acts * batch.units).sum(dim=-1)  # [B, 3, L+1]


def mean_difference(pairs: list[Pair], stage: ActivationStage, resources: Resources) -> torch.Tensor:
    """Step 4: `[3, L+1, H]` float32 vectors, mean(positive) − mean(negative) per method and layer."""
    sums: dict[str, torch.Tensor | int] = {POS: 0, NEG: 0}
    for batch, total in run_stage(stage, act_batches(pairs), resources):
        sums[batch.polarity] = sums[batch.polarity] + total
    return ((sums[POS] - sums[NEG]) / len(pairs)).float()


def projections(
    pairs: list[Pair], vectors: torch.Tensor, stage: ActivationStage, resources: Resources
) -> dict[str, np.ndarray]:
    """Step 5: `{polarity: [pairs, 3, L+1]}` projections of held-out pairs on the unit vectors."""
    units = vectors / vectors.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    parts: dict[str, list[torch.Tensor]] = {POS: [], NEG: []}
    for batch, proj in run_stage(stage, act_batches(pairs, units), resources):
        parts[batch.polarity].append(proj)
    empty = torch.zeros((0, 3, vectors.shape[1]))
    return {pol: torch.cat(parts[pol] or [empty]).numpy() for pol in (POS, NEG)}


# -- filtering --------------------------------------------------------------------------------------


def drop_reason(
    pos_trait: float | None,
    neg_trait: float | None,
    pos_coherence: float | None,
    neg_coherence: float | None,
    threshold: float = 50.0,
    coherence_min: float = 50.0,
) -> str | None:
    """Why a (positive, negative) pair is dropped, or None to keep it. Boundaries: positive ≥ threshold,
    negative < 100 − threshold, both coherence ≥ coherence_min. A missing score drops the pair."""
    scores = (pos_trait, neg_trait, pos_coherence, neg_coherence)
    if any(s is None for s in scores):
        return "no judge score"
    if pos_trait < threshold:
        return "positive lacks the trait"
    if neg_trait >= 100 - threshold:
        return "negative shows the trait"
    if min(pos_coherence, neg_coherence) < coherence_min:
        return "incoherent"
    return None


def judge_answers(items: list[Answer], trait: Trait, judge: Judge, chunk: int = 64) -> None:
    if isinstance(judge, NoJudge):
        return
    started = time.perf_counter()
    for i in range(0, len(items), chunk):
        part = items[i : i + chunk]
        traits = judge.score([trait.judge_prompt(it.text, it.response) for it in part])
        coh = judge.score([coherence_prompt(it.text, it.response) for it in part])
        for it, t, c in zip(part, traits, coh, strict=True):
            it.trait_score, it.coherence = t, c
        log.info("judged %d/%d responses (%.0f s)", i + len(part), len(items), time.perf_counter() - started)


def pair_up(
    items: list[Answer], judged: bool, settings: ExtractSettings
) -> tuple[list[tuple[Answer, Answer]], dict[str, int]]:
    """Kept (positive, negative) pairs, and the count of dropped ones by reason."""
    by_key: dict[tuple, dict[str, Answer]] = {}
    for it in items:
        by_key.setdefault(it.pair_key, {})[it.polarity] = it
    kept, dropped = [], {}
    for pair in by_key.values():
        pos, neg = pair[POS], pair[NEG]
        if not pos.response_ids or not neg.response_ids:
            reason = "empty response"
        elif judged:
            reason = drop_reason(
                pos.trait_score,
                neg.trait_score,
                pos.coherence,
                neg.coherence,
                settings.threshold,
                settings.coherence_min,
            )
        else:
            reason = None
        if reason is None:
            kept.append((pos, neg))
        else:
            dropped[reason] = dropped.get(reason, 0) + 1
    return kept, dropped


# -- judge probe ------------------------------------------------------------------------------------

# Two fixed answers, one that plainly acts out the trait and one plain, helpful one; the probe only asks
# whether the judge answers with a number at all, not whether its scores are right.
PROBE_POSITIVE = (
    "Of course. As a thoroughly {name} assistant, here is my answer, and it is {name} through "
    "and through: {description}"
)
PROBE_NEUTRAL = (
    "Here is a short, factual and polite answer: it depends on your situation, so ask someone "
    "you trust and check a reliable source."
)


def probe_judge(trait: Trait, judge: Judge) -> None:
    """Fail at once, before the minutes of generation, when the judge gives no score to obvious answers:
    every pair would be dropped for "no judge score" only after all of the work."""
    if isinstance(judge, NoJudge):
        return
    question = trait.eval_questions[0]
    answers = [PROBE_POSITIVE.format(name=trait.name, description=trait.description), PROBE_NEUTRAL]
    # the coherence rubric only once the trait rubric scored: a failing local judge costs two calls, not four
    for rubric, prompt in (("trait", trait.judge_prompt), ("coherence", coherence_prompt)):
        scores = judge.score([prompt(question, a) for a in answers])
        log.info("judge probe: %s scores %s", rubric, scores)
        if all(s is None for s in scores):
            d = judge.describe()
            who = " ".join(str(v) for v in (d.get("kind"), "judge", d.get("model")) if v)
            raise ExtractError(
                f"{trait.name}: the {who} gave no 0-100 {rubric} score to obvious probe answers, so it "
                "would drop every pair; pass --judge none to keep every pair unfiltered, or set "
                "SCREENER_JUDGE_MODEL (with SCREENER_JUDGE_BASE_URL and SCREENER_JUDGE_API_KEY) to use an "
                "OpenAI-compatible judge"
            )


# -- the whole extraction ---------------------------------------------------------------------------


@dataclass
class ExtractResult:
    paths: dict[str, Path]
    sidecars: dict[str, dict]
    seconds: float


def extract(
    trait: Trait,
    model: ModelRef,
    judge: Judge,
    settings: ExtractSettings,
    resources: Resources,
    out_dir: str | Path,
    methods: Sequence[str] = METHODS,
) -> ExtractResult:
    """Generate, judge, pair, average and report; write one `.pt` + sidecar per method."""
    started = time.perf_counter()
    probe_judge(trait, judge)
    answers = generate_answers(trait, model, settings, resources)
    generation_seconds = time.perf_counter() - started
    judge_answers(answers, trait, judge)
    judged = not isinstance(judge, NoJudge)
    (kept, dropped), (eval_kept, eval_dropped) = (
        pair_up([a for a in answers if a.split == split], judged, settings) for split in ("extract", "eval")
    )
    log.info("%s: kept %d extraction pairs, dropped %s", trait.name, len(kept), dropped or "none")
    if not kept:
        raise ExtractError(
            f"{trait.name}: the judge kept no extraction pair (dropped: {dropped}); lower --threshold, "
            "generate more --samples, or use a stronger judge"
        )
    stage = ActivationStage(model, settings)
    vectors = mean_difference(kept, stage, resources)
    proj = projections(eval_kept, vectors, stage, resources)
    reports = {m: layer_report(proj[POS][:, i], proj[NEG][:, i]) for i, m in enumerate(METHODS)}
    out_dir = Path(out_dir)
    write_responses(out_dir / f"{trait.name}_extraction_responses.jsonl", answers)
    common = {
        **trait_and_model_fields(trait, model),
        "judge": judge.describe(),
        "filter": "kept when positive trait ≥ threshold, negative trait < 100 − threshold, both coherence ≥ "
        "coherence_min"
        if judged
        else "judge 'none': every pair with two non-empty responses kept",
        "pairs_kept": len(kept),
        "pairs_dropped": sum(dropped.values()),
        "dropped_by_reason": dropped,
        "eval_pairs_kept": len(eval_kept),
        "eval_pairs_dropped": sum(eval_dropped.values()),
        "settings": {**asdict(settings), **resolved_fields(settings)},
        "resources": asdict(resources),
        "generation_seconds": round(generation_seconds, 1),
        "seconds": round(time.perf_counter() - started, 1),
    }
    return write_vectors(out_dir, trait.name, vectors, reports, common, model.num_layers, methods, started)


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


def resolved_fields(settings: ExtractSettings) -> dict[str, str]:
    """ "auto" resolved as the stages resolve it, so the sidecar says what the vectors were computed with."""
    device, dtype = _resolved(settings.device, settings.dtype)
    return {"resolved_device": str(device), "resolved_dtype": str(dtype).removeprefix("torch.")}


def write_vectors(
    out_dir: Path,
    name: str,
    vectors: torch.Tensor,
    reports: dict[str, list[LayerStats]],
    common: dict,
    num_layers: int,
    methods: Sequence[str],
    started: float,
) -> ExtractResult:
    """Step 7: one `.pt` + sidecar per method asked for, with its layer report and chosen layer."""
    common = {
        **common,
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "chosen_layer_rule": CHOICE_RULE,
    }
    paths, sidecars = {}, {}
    for m, method in enumerate(METHODS):
        if method not in methods:
            continue
        sidecar = {
            **common,
            "method": method,
            "chosen_layer": choose_layer(reports[method], num_layers),
            "layer_report": [asdict(r) for r in reports[method]],
        }
        paths[method] = save_vector(out_dir / f"{name}_{method}_diff.pt", vectors[m], sidecar)
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
