"""The model's own contrasting answers, and the judge that keeps the pairs that show the trait.

For every instruction pair, question and sample k, the model answers under the positive system prompt
("You are a/an {trait} assistant. {pos}") and the negative one ("You are a helpful assistant. {neg}")
(`generate_answers`, on the workers). A pair is kept when the judge finds the trait in the positive answer
(score ≥ threshold), not in the negative (< 100 − threshold), and both answers coherent (≥ coherence_min)
(`pair_up`, `drop_reason`); `probe_judge` fails at once when the judge cannot score at all. Kept pairs are
read teacher-forced after the prompt they were generated under, or after the question alone
(`generated_reads`).
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from screener.distributed import Resources, run_stage
from screener.extract.judges import Judge, NoJudge, coherence_prompt
from screener.extract.settings import NEG, POS, ExtractError, ExtractSettings, Read, batched
from screener.extract.traits import Trait
from screener.models import ModelRef, chat_ids, generate

log = logging.getLogger(__name__)


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


def generated_reads(pairs: list[Pair], context: str) -> tuple[list[Read], list[Read]]:
    """(positive, negative) reads of generated pairs: each answer after its own system prompt and question
    ("system"), or after the question alone ("question")."""

    def read(it: Answer) -> Read:
        return (it.prompt_ids if context == "system" else it.question_ids), it.response_ids

    return [read(p) for p, _ in pairs], [read(n) for _, n in pairs]


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
