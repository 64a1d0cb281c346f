"""Persona-vector extraction, two ways: from the model's own contrasting answers, or from labelled examples.

*Generation* (`extract`): for every instruction pair, question and sample k, the model answers under the
positive system prompt ("You are a/an {trait} assistant. {pos}") and the negative one ("You are a helpful
assistant. {neg}"). A pair is kept when the judge finds the trait in the positive answer (score ≥
threshold), not in the negative (< 100 − threshold), and both answers coherent (≥ coherence_min). The
answers are then read teacher-forced after the prompt they were generated under (`read_context`
"system"), or after the question alone ("question": the trait's system prompt is not in context, as it is
not when a screen reads data).

*Examples* (`extract_from_examples`): written or labelled answers (examples.py) are read teacher-forced
after their own prompt, as a screen reads a sample: no generation, no judge, no trait system prompt.

Either way the vector for a method is mean(positive activations) − mean(negative activations), per layer:

    response_avg  mean of hidden_states[L] over the response tokens   (what screening projects onto)
    prompt_avg    mean of hidden_states[L] over the prompt tokens (system + question + template)
    prompt_last   hidden_states[L] at the last prompt token

When every positive shares its prompt with a negative (paired examples, or generated answers read after
the question alone), the prompt methods' difference is zero by construction, so only response_avg is
written.

The layer report and the specificity matrix (layers.py) read held-out examples after the question alone,
the same for every method so methods compare on the same data: the trait file's `eval_examples` (or the
user's `--eval-examples`), and every other trait's. Without written ones, generation falls back to its
answers to the held-out evaluation questions. The steps, in order: generate → judge → pair → activations →
vectors → layer report and specificity → files. Model work runs as `Stage`s on `run_stage`, like
screening: in-process with actors=0, else on Ray actors.
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
from screener.extract.controls import Control, load_controls
from screener.extract.examples import ExampleSet, from_trait, from_written, read_example_files, tokenized
from screener.extract.judges import Judge, NoJudge, coherence_prompt
from screener.extract.layers import (
    CHOICE_RULE,
    NEAR_CHANCE,
    LayerStats,
    choose_layer,
    choose_specific_layer,
    cross_trait,
    layer_report,
    specific_rule,
)
from screener.extract.traits import Trait, TraitError, list_traits, load_trait
from screener.models import ModelRef, chat_ids, generate
from screener.scoring import MEANS, Scorer, ScoreSettings
from screener.vectors import save_vector
from screener.work import Work

log = logging.getLogger(__name__)

METHODS = MEANS  # the vector methods: the mean activations the teacher-forced reader gives
POS, NEG = "pos", "neg"
CONTROL = "control:"  # the group prefix of a style control's reads (a trait name cannot hold a colon)
READ_CONTEXTS = ("system", "question")  # what generated answers are read after: their prompt, or the question
Read = tuple[list[int], list[int]]  # (prompt ids, response ids): one teacher-forced read


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
    # generated answers are read after their system prompt and question ("system"), or the question alone
    read_context: str = "system"
    max_tokens: int = 2048  # examples longer than this are cut as the screen cuts them

    def __post_init__(self) -> None:
        if self.read_context not in READ_CONTEXTS:
            raise ExtractError(f"read context must be one of {READ_CONTEXTS}, not {self.read_context!r}")

    def work(self) -> Work:
        """The device and dtype resolved ("auto" as the stages will run it)."""
        return Work.resolve(self.device, self.dtype)

    @property
    def generation_method(self) -> str:
        """The sidecar's `extraction_method` for generated answers read in this context."""
        return "generation" if self.read_context == "system" else "generation_question_only"


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
    prompt_ids: list[int] = field(default_factory=list)  # system prompt + question: what it answered
    question_ids: list[int] = field(default_factory=list)  # the question alone
    response_ids: list[int] = field(default_factory=list)
    response: str = ""
    trait_score: float | None = None
    coherence: float | None = None

    @property
    def pair_key(self) -> tuple[str, int, int, int]:
        return self.split, self.pair, self.question, self.sample


Pair = tuple[Answer, Answer]  # (positive, negative)


def build_items(trait: Trait, samples: int, splits: Sequence[str] = ("extract", "eval")) -> list[Answer]:
    """Every answer to generate: both polarities of each instruction pair, question and sample."""
    items = []
    questions_of = {"extract": trait.questions, "eval": trait.eval_questions}
    for split, questions in ((split, questions_of[split]) for split in splits):
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


class GenerationStage:
    """Answers batches of `Answer`s with the model itself (sampling seeded by the batch's contents)."""

    def __init__(self, model: ModelRef, settings: ExtractSettings):
        self.ref, self.settings, self.work = model, settings, settings.work()
        self.model = self.tokenizer = None

    def setup(self) -> None:
        self.model, self.tokenizer = self.work.load(self.ref)

    def process(self, items: list[Answer], report=None) -> list[Answer]:
        s = self.settings
        for it in items:
            question = {"role": "user", "content": it.text}
            it.prompt_ids = chat_ids(self.tokenizer, [{"role": "system", "content": it.system}, question])
            it.question_ids = chat_ids(self.tokenizer, [question])
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
    trait: Trait,
    model: ModelRef,
    settings: ExtractSettings,
    resources: Resources,
    splits: Sequence[str] = ("extract", "eval"),
) -> list[Answer]:
    """Step 1: every answer of `build_items`, generated on the workers."""
    items = build_items(trait, settings.samples, splits)
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


@dataclass
class ActBatch:
    """Teacher-forced reads of one group (a polarity, or another trait's polarity), starting at `start` in
    it; with `units` the stage returns projections, else sums."""

    key: str
    start: int
    prompts: list[list[int]]
    responses: list[list[int]]
    units: torch.Tensor | None = None  # [3, L+1, H] unit vectors


def act_batches(
    groups: dict[str, list[Read]], units: torch.Tensor | None = None, size: int = 64
) -> list[ActBatch]:
    """Batches of each group's (prompt, response) ids, for `ActivationStage`."""
    return [
        ActBatch(key, start, [p for p, _ in part], [r for _, r in part], units)
        for key, reads in groups.items()
        for start, part in zip(range(0, len(reads), size), batched(reads, size), strict=True)
    ]


class ActivationStage:
    """Sums activations (extraction: only means are needed, so memory does not grow with the data) or
    projects them onto unit vectors (evaluation: one scalar per sample, method and layer), as read by the
    screen's teacher-forced reader (`Scorer.means`) at every layer."""

    def __init__(self, model: ModelRef, settings: ExtractSettings):
        self.ref, self.settings, self.work = model, settings, settings.work()
        self.scorer: Scorer | None = None

    def setup(self) -> None:
        layers = tuple(range(self.ref.num_layers + 1))
        reads = ScoreSettings(layers=layers, batch_tokens=self.settings.batch_tokens, max_batch_size=64)
        self.scorer = self.work.scorer(self.ref, None, reads)

    def read(self, prompts: list[list[int]], responses: list[list[int]]) -> torch.Tensor:
        """`[reads, 3, L+1, H]` activations (`METHODS` order) in the reads' order."""
        assert self.scorer is not None, "setup() first"
        return self.scorer.means(prompts, responses)

    def process(self, batch: ActBatch, report=None) -> torch.Tensor:
        acts = self.read(batch.prompts, batch.responses)
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


def generated_reads(pairs: list[Pair], context: str) -> tuple[list[Read], list[Read]]:
    """(positive, negative) reads of generated pairs: each answer after its own system prompt and question
    ("system"), or after the question alone ("question")."""

    def read(it: Answer) -> Read:
        return (it.prompt_ids if context == "system" else it.question_ids), it.response_ids

    return [read(p) for p, _ in pairs], [read(n) for _, n in pairs]


# -- held-out evaluation ----------------------------------------------------------------------------


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
) -> HeldOut:
    """The held-out reads: `--eval-examples` files, else the trait's `eval_examples`, else (generation only)
    the generated answers to its evaluation questions, read in the settings' context; plus every other
    trait's `eval_examples` and every style control's pairs (default: the built-in sets), each question
    asked alone."""
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
        held.controls[name] = (a, b)
        held.control_sets[name] = {"description": control.description, **control.describe()}
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
    eval_files: Sequence[str] = (),
    traits_dir: str | Path | None = None,
    orthogonal_to: dict[str, Trait] | None = None,
    note: str = "",
    controls: dict[str, Control] | None = None,
) -> ExtractResult:
    """Generate, judge, pair, average and report; write one `.pt` + sidecar per method (`note`, free text
    such as why this method, goes into the sidecar). `controls`: the style control sets to report on
    (default: the built-in ones)."""
    started = time.perf_counter()
    probe_judge(trait, judge)
    # written held-out examples make generated evaluation answers unnecessary: generate extraction ones only
    written_eval = bool(eval_files or trait.eval_examples)
    splits = ("extract",) if written_eval else ("extract", "eval")
    answers = generate_answers(trait, model, settings, resources, splits)
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
    tokenizer = model.load_tokenizer()
    generated = None if written_eval else eval_kept
    held = held_out(trait, tokenizer, settings, eval_files, traits_dir, generated, controls)
    stage = ActivationStage(model, settings)
    positives, negatives = generated_reads(kept, settings.read_context)
    vectors, orthogonal = specific_vectors(
        positives, negatives, orthogonal_to, tokenizer, settings, stage, resources
    )
    reports, specificity, controls = evaluate(vectors, held, stage, resources)
    out_dir = Path(out_dir)
    write_responses(out_dir / f"{trait.name}_extraction_responses.jsonl", answers)
    common = {
        **trait_and_model_fields(trait, model),
        "extraction_method": settings.generation_method,
        **({"note": note} if note else {}),
        "read_context": "the trait's system prompt and the question"
        if settings.read_context == "system"
        else "the question alone (the answers were generated under the trait's system prompts)",
        "judge": judge.describe(),
        "filter": "kept when positive trait ≥ threshold, negative trait < 100 − threshold, both coherence ≥ "
        "coherence_min"
        if judged
        else "judge 'none': every pair with two non-empty responses kept",
        "pairs_kept": len(kept),
        "pairs_dropped": sum(dropped.values()),
        "dropped_by_reason": dropped,
        **(
            {}
            if written_eval
            else {"eval_pairs_kept": len(eval_kept), "eval_pairs_dropped": sum(eval_dropped.values())}
        ),
        **orthogonal,
        "settings": {**asdict(settings), **settings.work().describe()},
        "resources": asdict(resources),
        "generation_seconds": round(generation_seconds, 1),
        "seconds": round(time.perf_counter() - started, 1),
    }
    if settings.read_context == "question":  # both answers of a pair follow one question
        methods = _response_only(methods, common, "both answers of a pair are read after the same question")
    return write_vectors(
        out_dir, trait, vectors, (reports, specificity, controls), held, common, model, methods, started
    )


def extract_from_examples(
    trait: Trait,
    model: ModelRef,
    settings: ExtractSettings,
    resources: Resources,
    out_dir: str | Path,
    methods: Sequence[str] = METHODS,
    files: Sequence[str] = (),
    eval_files: Sequence[str] = (),
    traits_dir: str | Path | None = None,
    orthogonal_to: dict[str, Trait] | None = None,
    note: str = "",
    controls: dict[str, Control] | None = None,
) -> ExtractResult:
    """Read labelled examples (the `files`, else the trait file's written `examples`) teacher-forced after
    their own prompts, average, report; write one `.pt` + sidecar per method that is defined."""
    started = time.perf_counter()
    examples = read_example_files(files) if files else from_trait(trait, "examples")
    if not examples.examples:
        raise ExtractError(
            f"{trait.name}: {trait.path} has no written 'examples'; pass --from-examples FILE [FILE ...] or "
            "add them to the trait file (format: screener/traits/README.md)"
        )
    tokenizer = model.load_tokenizer()
    positives, negatives, paired, cut = example_reads(tokenizer, examples, settings.max_tokens)
    log.info("%s: %d positive and %d negative examples", trait.name, len(positives), len(negatives))
    held = held_out(trait, tokenizer, settings, eval_files, traits_dir, controls=controls)
    stage = ActivationStage(model, settings)
    vectors, orthogonal = specific_vectors(
        positives, negatives, orthogonal_to, tokenizer, settings, stage, resources
    )
    reports, specificity, controls = evaluate(vectors, held, stage, resources)
    keep = ("batch_tokens", "max_tokens", "dtype", "device")
    common = {
        **trait_and_model_fields(trait, model),
        "extraction_method": "examples",
        **({"note": note} if note else {}),
        "read_context": "each example's own prompt (for written examples: the question alone); no "
        "generation, no judge, no trait system prompt",
        "examples": {
            "source": "files" if files else "trait file examples",
            "files": examples.sources,
            "paired": paired,
            "truncated": cut,
            **examples.counts(),
        },
        **orthogonal,
        "settings": {
            **{k: v for k, v in asdict(settings).items() if k in keep},
            **settings.work().describe(),
        },
        "resources": asdict(resources),
        "seconds": round(time.perf_counter() - started, 1),
    }
    if paired:
        methods = _response_only(methods, common, "every example is one answer of a pair to a shared prompt")
    return write_vectors(
        Path(out_dir), trait, vectors, (reports, specificity, controls), held, common, model, methods, started
    )


def specific_vectors(
    positives: list[Read],
    negatives: list[Read],
    orthogonal_to: dict[str, Trait] | None,
    tokenizer,
    settings: ExtractSettings,
    stage: ActivationStage,
    resources: Resources,
) -> tuple[torch.Tensor, dict]:
    """Step 4: the mean-difference vectors; with `orthogonal_to`, the response_avg vector less, per layer,
    its component in the span of those traits' own example directions (the mean difference of their
    written `examples`, read in the same pass), so it does not measure what they share. The sidecar fields
    that say so come back with them."""
    contrasts = {}
    for name, other in (orthogonal_to or {}).items():
        pos, neg, _, _ = example_reads(tokenizer, from_trait(other, "examples"), settings.max_tokens)
        contrasts[name] = (pos, neg)
    vectors, directions = mean_difference(positives, negatives, stage, resources, contrasts)
    if not directions:
        return vectors, {}
    vectors[0] = orthogonalize(vectors[0], [d[0] for d in directions.values()])
    fields = {
        "orthogonal_to": {
            "traits": {name: t.sha256 for name, t in orthogonal_to.items()},
            "how": "the response_avg vector less, at each layer, its component in the span of these traits' "
            "response_avg mean differences over their written 'examples' (modified Gram-Schmidt); the other "
            "methods are plain mean differences",
        }
    }
    return vectors, fields


def _response_only(methods: Sequence[str], common: dict, why: str) -> list[str]:
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
