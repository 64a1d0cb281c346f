"""Persona-vector extraction: generate contrasting responses, judge them, keep clean pairs, average.

For every instruction pair, question and sample k, the model answers under the positive system prompt
("You are a/an {trait} assistant. {pos}") and the negative one ("You are a helpful assistant. {neg}").
A pair is kept when the judge finds the trait in the positive answer (score ≥ threshold), not in the
negative (< 100 − threshold), and both answers coherent (≥ coherence_min). The vector for a method is
mean(positive activations) − mean(negative activations) over the kept extraction pairs, at every layer:

    response_avg  mean of hidden_states[L] over the response tokens   (what screening projects onto)
    prompt_avg    mean of hidden_states[L] over the prompt tokens (system + question + template)
    prompt_last   hidden_states[L] at the last prompt token

Responses to the held-out evaluation questions give the layer report (layers.py). Model work runs as
`Stage`s on `run_stage`, like screening: in-process with actors=0, else on Ray actors.
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

import torch

from screener.distributed import Resources, run_stage
from screener.errors import UserError
from screener.extract.judges import Judge, NoJudge, coherence_prompt
from screener.extract.layers import CHOICE_RULE, choose_layer, layer_report
from screener.extract.traits import Trait
from screener.models import ModelRef, load_model, pick_device, pick_dtype, resolve_model
from screener.scoring import decoder_parts, length_batches
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
class Item:
    """One response to generate: which split, pair, question, sample and polarity."""

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


def build_items(trait: Trait, samples: int) -> list[Item]:
    items = []
    for split, questions in (("extract", trait.questions), ("eval", trait.eval_questions)):
        for p, pair in enumerate(trait.instructions):
            for q, question in enumerate(questions):
                for k in range(samples):
                    items.append(Item(split, p, q, k, POS, trait.positive_system(pair), question))
                    items.append(Item(split, p, q, k, NEG, trait.negative_system(pair), question))
    return items


# -- generation -------------------------------------------------------------------------------------


def eos_ids(model, tokenizer) -> list[int]:
    eos = model.generation_config.eos_token_id
    eos = eos if isinstance(eos, list) else [eos]
    return sorted({*(e for e in eos if e is not None), tokenizer.eos_token_id} - {None})


def chat_ids(tokenizer, messages: list[dict[str, str]]) -> list[int]:
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


@torch.inference_mode()
def generate(
    model,
    tokenizer,
    prompts: Sequence[list[int]],
    max_new_tokens: int,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int = 0,
) -> list[list[int]]:
    """Batched generation with left padding; each answer stops before its first end-of-turn token."""
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    width = max(map(len, prompts))
    ids = torch.full((len(prompts), width), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for b, p in enumerate(prompts):
        ids[b, width - len(p) :] = torch.tensor(p)
        mask[b, width - len(p) :] = 1
    kwargs: dict = {"do_sample": temperature > 0}
    if temperature > 0:
        kwargs.update(temperature=temperature, top_p=top_p, top_k=0)
    torch.manual_seed(seed)
    stops = eos_ids(model, tokenizer)
    out = model.generate(
        input_ids=ids.to(device),
        attention_mask=mask.to(device),
        max_new_tokens=max_new_tokens,
        pad_token_id=pad,
        eos_token_id=stops,
        **kwargs,
    )
    answers = []
    for tokens in out[:, width:].tolist():
        n = next((i for i, t in enumerate(tokens) if t in stops), len(tokens))
        answers.append(tokens[:n])
    return answers


def _load(model: ModelRef, device: str, dtype: str):
    # an actor on another machine may not see the driver's cache path: resolve again there
    path = model.path if Path(model.path).exists() else resolve_model(model.spec).path
    dev = pick_device(device)
    return load_model(path, dev, pick_dtype(dtype, dev))


class GenerationStage:
    """Answers batches of `Item`s with the model itself (sampling seeded by the batch's contents)."""

    def __init__(self, model: ModelRef, settings: ExtractSettings):
        self.ref, self.settings = model, settings
        self.model = self.tokenizer = None

    def setup(self) -> None:
        self.model, self.tokenizer = _load(self.ref, self.settings.device, self.settings.dtype)

    def process(self, items: list[Item]) -> list[Item]:
        s = self.settings
        for it in items:
            msgs = [{"role": "system", "content": it.system}, {"role": "user", "content": it.text}]
            it.prompt_ids = chat_ids(self.tokenizer, msgs)
        # so results do not depend on which actor ran the batch, or in which order
        first = items[0]
        digest = hashlib.sha256(repr((*first.pair_key, first.polarity)).encode()).hexdigest()
        answers = generate(
            self.model,
            self.tokenizer,
            [it.prompt_ids for it in items],
            s.max_new_tokens,
            s.temperature,
            s.top_p,
            s.seed + int(digest[:8], 16),
        )
        for it, ans in zip(items, answers, strict=True):
            it.response_ids = ans
            it.response = self.tokenizer.decode(ans, skip_special_tokens=True)
        return items


# -- activations ------------------------------------------------------------------------------------


@torch.inference_mode()
def activations(model, prompts: Sequence[list[int]], responses: Sequence[list[int]]) -> torch.Tensor:
    """`[batch, 3, num_layers+1, hidden]` float32: response_avg, prompt_avg, prompt_last per sample.

    One right-padded forward with `output_hidden_states=True`, so every row is exactly the
    `hidden_states[L]` of the layer convention (the last one after the final norm).
    """
    device = next(model.parameters()).device
    seqs = [p + r for p, r in zip(prompts, responses, strict=True)]
    width = max(map(len, seqs))
    ids = torch.zeros((len(seqs), width), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for b, s in enumerate(seqs):
        ids[b, : len(s)] = torch.tensor(s)
        mask[b, : len(s)] = 1
    base, _, _ = decoder_parts(model)
    out = base(input_ids=ids.to(device), attention_mask=mask.to(device), output_hidden_states=True)
    hs = torch.stack(out.hidden_states, dim=1).float()  # [B, L+1, T, H]
    result = torch.empty((len(seqs), 3, hs.shape[1], hs.shape[3]), dtype=torch.float32)
    for b, (p, r) in enumerate(zip(prompts, responses, strict=True)):
        n = len(p)
        result[b, 0] = hs[b, :, n : n + len(r)].mean(dim=1).cpu()
        result[b, 1] = hs[b, :, :n].mean(dim=1).cpu()
        result[b, 2] = hs[b, :, n - 1].cpu()
    return result


@dataclass
class ActBatch:
    """Teacher-forced samples of one polarity; with `units` the stage returns projections, else sums."""

    polarity: str
    prompts: list[list[int]]
    responses: list[list[int]]
    units: torch.Tensor | None = None  # [3, L+1, H] unit vectors


def _act_batches(
    pairs: list[tuple[Item, Item]], units: torch.Tensor | None = None, size: int = 64
) -> list[ActBatch]:
    return [
        ActBatch(pol, [p[i].prompt_ids for p in part], [p[i].response_ids for p in part], units)
        for i, pol in enumerate((POS, NEG))
        for part in _chunks(pairs, size)
    ]


class ActivationStage:
    """Sums activations (extraction: only means are needed, so memory does not grow with the data) or
    projects them onto unit vectors (evaluation: one scalar per sample, method and layer)."""

    def __init__(self, model: ModelRef, settings: ExtractSettings):
        self.ref, self.settings = model, settings
        self.model = None

    def setup(self) -> None:
        self.model, _ = _load(self.ref, self.settings.device, self.settings.dtype)

    def process(self, batch: ActBatch) -> torch.Tensor:
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


def judge_items(items: list[Item], trait: Trait, judge: Judge, chunk: int = 64) -> None:
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
    items: list[Item], judged: bool, settings: ExtractSettings
) -> tuple[list[tuple[Item, Item]], dict[str, int]]:
    """Kept (positive, negative) pairs, and the count of dropped ones by reason."""
    by_key: dict[tuple, dict[str, Item]] = {}
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


def _chunks(items: list, size: int) -> Iterator[list]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


def extract(
    trait: Trait,
    model: ModelRef,
    judge: Judge,
    settings: ExtractSettings,
    resources: Resources,
    out_dir: str | Path,
    methods: Sequence[str] = METHODS,
) -> ExtractResult:
    """Generate, judge, filter, average and report; write one `.pt` + sidecar per method."""
    started = time.perf_counter()
    out_dir = Path(out_dir)
    probe_judge(trait, judge)
    # "auto" resolved here as the stages resolve it (screening records its dtype the same way), so the
    # sidecar says what the vectors were computed with
    device = pick_device(settings.device)
    resolved = {
        "resolved_device": str(device),
        "resolved_dtype": str(pick_dtype(settings.dtype, device)).removeprefix("torch."),
    }
    items = build_items(trait, settings.samples)
    log.info("%s: generating %d responses with %s", trait.name, len(items), model.name)
    generated: list[Item] = []
    batches = _chunks(items, settings.batch_size)
    for _, done in run_stage(GenerationStage(model, settings), batches, resources):
        generated.extend(done)
        elapsed = time.perf_counter() - started
        log.info("generated %d/%d responses (%.0f s)", len(generated), len(items), elapsed)
    items = generated
    gen_seconds = time.perf_counter() - started
    judge_items(items, trait, judge)
    judged = not isinstance(judge, NoJudge)
    splits = {
        s: pair_up([it for it in items if it.split == s], judged, settings) for s in ("extract", "eval")
    }
    kept, dropped = splits["extract"]
    log.info("%s: kept %d extraction pairs, dropped %s", trait.name, len(kept), dropped or "none")
    if not kept:
        raise ExtractError(
            f"{trait.name}: the judge kept no extraction pair (dropped: {dropped}); lower --threshold, "
            "generate more --samples, or use a stronger judge"
        )
    # two passes, one actor pool each: the extraction sums give the vectors the evaluation projects onto
    act_stage = ActivationStage(model, settings)
    sums = {POS: 0, NEG: 0}
    for batch, total in run_stage(act_stage, _act_batches(kept), resources):
        sums[batch.polarity] = sums[batch.polarity] + total
    vectors = ((sums[POS] - sums[NEG]) / len(kept)).float()  # [3, L+1, H]

    eval_kept, eval_dropped = splits["eval"]
    units = vectors / vectors.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    parts: dict[str, list[torch.Tensor]] = {POS: [], NEG: []}
    for batch, projections in run_stage(act_stage, _act_batches(eval_kept, units), resources):
        parts[batch.polarity].append(projections)
    empty = torch.zeros((0, 3, vectors.shape[1]))
    proj = {pol: torch.cat(parts[pol] or [empty]).numpy() for pol in (POS, NEG)}
    _write_responses(out_dir / f"{trait.name}_extraction_responses.jsonl", items)

    common = {
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
        "settings": {**asdict(settings), **resolved},
        "resources": asdict(resources),
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "generation_seconds": round(gen_seconds, 1),
        "seconds": round(time.perf_counter() - started, 1),
        "chosen_layer_rule": CHOICE_RULE,
    }
    paths, sidecars = {}, {}
    for m, method in enumerate(METHODS):
        if method not in methods:
            continue
        report = layer_report(proj[POS][:, m], proj[NEG][:, m])
        sidecar = {
            **common,
            "method": method,
            "chosen_layer": choose_layer(report, model.num_layers),
            "layer_report": [asdict(r) for r in report],
        }
        path = out_dir / f"{trait.name}_{method}_diff.pt"
        paths[method] = save_vector(path, vectors[m], sidecar)
        sidecars[method] = sidecar
    return ExtractResult(paths, sidecars, time.perf_counter() - started)


def _write_responses(path: Path, items: list[Item]) -> None:
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
