"""How far fine-tuning moved a model along each persona vector: the fine-tuning shift of the paper.

For a base model B, a fine-tuned model F, a trait's unit vector v̂ at layer L and evaluation prompts
x_1..x_n (by default the trait's held-out evaluation questions from its trait file):

    d_i    = h_F[L](x_i) · v̂ − h_B[L](x_i) · v̂      at the last prompt token (the screen's proj_prompt_last)
    shift  = mean_i d_i
    stderr = std(d_i, ddof=1) / sqrt(n)               the standard error of the paired differences

Both models see the same token ids (the prompts are tokenised once, on the driver, after checking that the
tokenizers agree), so the differences are paired and identical models give exactly 0. With `generate`
each model also answers every prompt itself, and the `response_avg` measure compares the mean projection
over each model's own answer's tokens the same way (pairs where either answer is empty are left out).

`prepare` resolves both models, the vectors, layers and prompts on the driver into a `ShiftPlan`, and
refuses a pair that cannot be compared (architecture, layer count, hidden size, tokenizer) before any
weights load. `measure` runs each model as a stage on the model workers (`distributed.run_stage`: one
model after the other, or both at once when there are two actors or more), through the same `Scorer` code
path as the screen, and stores the results in the `shifts` table.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace

import numpy as np
import torch

from screener.datasets import ReadStats, canonical_uri, read_samples
from screener.distributed import Resources, model_workers, on_cluster, run_stage
from screener.errors import UserError
from screener.extract.traits import TraitError, load_trait
from screener.models import (
    AdapterRef,
    ModelRef,
    adapter_mismatches,
    chat_ids,
    is_adapter,
    load_tokenizer,
    model_config,
    resolve_adapter,
    resolve_model,
)
from screener.records import Message, Sample
from screener.scoring import GenerationSettings, Scorer, ScoreSettings, truncate
from screener.store import Store, check_not_busy
from screener.vectors import Vector, vectors_at
from screener.work import Work

log = logging.getLogger(__name__)

MEASURES = ("prompt_last", "response_avg")
# rendered by both tokenizers' chat templates: templates that differ anywhere a prompt can reach differ here
# (the first has no system message, where templates such as SmolLM2's insert their default one)
PROBES: tuple[list[Message], ...] = (
    [{"role": "user", "content": "Hello! What is 2 + 2?"}],
    [
        {"role": "system", "content": "You are a careful assistant."},
        {"role": "user", "content": "Hello! What is 2 + 2?"},
        {"role": "assistant", "content": "2 + 2 = 4."},
        {"role": "user", "content": "And in words, with ünïcödé?"},
    ],
)


class IncompatibleModelsError(UserError, ValueError):
    """A base and a fine-tuned model that cannot be compared; the message names what differs."""


@dataclass
class ShiftConfig:
    """A shift measurement as the user asked for it (the command line's options)."""

    base: str
    finetuned: str  # an HF folder, a .gguf file, a hub id, or a PEFT adapter folder applied to `base`
    db: str = "screen.duckdb"
    traits: list[str] = field(default_factory=list)
    vectors: list[str] = field(default_factory=list)  # NAME=PATH
    layers: list[int] = field(default_factory=list)  # empty: each vector's chosen layer
    questions: str | None = None  # a dataset (prompts only are used); None: each trait's eval questions
    split: str | None = None
    limit: int | None = None
    traits_dir: str | None = None  # where trait files (eval questions) are looked up before the built-ins
    generate: bool = False  # also compare each model's own answers (response_avg)
    generation: GenerationSettings = field(default_factory=GenerationSettings)
    max_tokens: int = 2048  # longer prompts lose their head
    batch_tokens: int | None = None
    max_batch_size: int | None = None
    dtype: str = "auto"
    device: str = "auto"
    actors: int | None = None  # None: as the screen (one per GPU, or one per 2 cores); 0: no Ray
    address: str | None = None


@dataclass(frozen=True)
class Prompt:
    key: str  # sha256 of its messages: a prompt that several traits use runs once
    ids: tuple[int, ...]  # chat template with the generation prompt, cut to max_tokens
    truncated: bool


@dataclass(frozen=True)
class PromptSet:
    """One trait's evaluation prompts: positions in the plan's prompts, and where they came from."""

    source: str
    sha256: str
    indices: tuple[int, ...]


@dataclass(frozen=True)
class ShiftPlan:
    """Everything the measurement needs, resolved on the driver; the stages receive it as is."""

    base: ModelRef
    finetuned: ModelRef | AdapterRef
    work: Work  # device and dtype
    vectors: tuple[Vector, ...]
    units: dict[int, torch.Tensor]  # {layer: [hidden, traits]} unit vectors, traits in `vectors` order
    settings: ScoreSettings
    prompts: tuple[Prompt, ...]
    prompt_sets: dict[str, PromptSet]  # by trait
    generate: bool
    chunk_size: int  # prompts per worker call

    @property
    def traits(self) -> tuple[str, ...]:
        return tuple(v.name for v in self.vectors)

    @property
    def layers(self) -> tuple[int, ...]:
        return self.settings.layers

    @property
    def finetuned_kind(self) -> str:
        return "adapter" if isinstance(self.finetuned, AdapterRef) else "model"

    def identity(self, measure: str) -> dict:
        """Everything that determines a measure's values; its hash is the `shift_id`."""
        ident = {
            "base_sha256": self.base.sha256,
            "finetuned_sha256": self.finetuned.sha256,
            "finetuned_kind": self.finetuned_kind,
            "vectors": {v.name: v.sha256 for v in self.vectors},
            "layers": list(self.layers),
            "prompts": {t: s.sha256 for t, s in self.prompt_sets.items()},
            "dtype": self.work.dtype_name,
            "max_tokens": self.settings.max_tokens,
            "measure": measure,
        }
        if measure == "response_avg":
            ident["generation"] = asdict(self.settings.generation)
        return ident

    def shift_id(self, measure: str) -> str:
        canonical = json.dumps(self.identity(measure), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()[:16]

    def batches(self) -> Iterator[PromptBatch]:
        for i in range(0, len(self.prompts), self.chunk_size):
            part = self.prompts[i : i + self.chunk_size]
            yield PromptBatch([p.key for p in part], [list(p.ids) for p in part])


@dataclass(frozen=True)
class Shift:
    """One trait, layer and measure of a measurement."""

    trait: str
    layer: int
    measure: str  # "prompt_last" | "response_avg"
    n_prompts: int
    shift: float  # mean over prompts of (fine-tuned − base)
    stderr: float | None  # standard error of the paired differences; None for one prompt
    base_mean: float
    finetuned_mean: float


@dataclass
class ShiftResult:
    plan: ShiftPlan
    shifts: list[Shift]
    seconds: float

    def rows(self) -> list[dict]:
        """The `shifts` table's rows (the store adds the time)."""
        plan = self.plan
        common = {
            "base": plan.base.spec,
            "base_sha256": plan.base.sha256,
            "finetuned": plan.finetuned.spec,
            "finetuned_sha256": plan.finetuned.sha256,
            "finetuned_kind": plan.finetuned_kind,
        }
        settings = {
            "dtype": plan.work.dtype_name,
            "device": str(plan.work.device),
            "max_tokens": plan.settings.max_tokens,
            "vectors": {v.name: {"path": v.path, "sha256": v.sha256} for v in plan.vectors},
            "prompts": {
                t: {"source": s.source, "sha256": s.sha256, "n": len(s.indices)}
                for t, s in plan.prompt_sets.items()
            },
            "truncated_prompts": sum(p.truncated for p in plan.prompts),
        }
        if isinstance(plan.finetuned, AdapterRef):
            a = plan.finetuned
            settings["adapter"] = {"path": a.path, "peft_type": a.peft_type, "trained_on": a.trained_on}
        out = []
        for s in self.shifts:
            extra = {"generation": asdict(plan.settings.generation)} if s.measure == "response_avg" else {}
            out.append(
                {
                    "shift_id": plan.shift_id(s.measure),
                    **common,
                    "trait": s.trait,
                    "layer": s.layer,
                    "measure": s.measure,
                    "prompts": plan.prompt_sets[s.trait].source,
                    "n_prompts": s.n_prompts,
                    "shift": s.shift,
                    "stderr": s.stderr,
                    "base_mean": s.base_mean,
                    "finetuned_mean": s.finetuned_mean,
                    "settings": {**settings, **extra},
                }
            )
        return out


# -- planning ---------------------------------------------------------------------------------------


def resolve_finetuned(spec: str, base: ModelRef) -> ModelRef | AdapterRef:
    """A PEFT adapter folder (applied to `base`), or any model `resolve_model` takes."""
    return resolve_adapter(spec, base) if is_adapter(spec) else resolve_model(spec)


def check_compatible(base: ModelRef, finetuned: ModelRef | AdapterRef):
    """Refuse, before any weights load, models whose hidden states cannot be compared: naming each of
    architecture, layer count, hidden size and tokenizer (vocabulary, chat template) that differs. Returns
    the base's tokenizer, which then tokenises the prompts for both models."""
    if isinstance(finetuned, AdapterRef):
        diffs = adapter_mismatches(finetuned)
        tokenizer_path = finetuned.tokenizer_path
    else:
        cb, cf = model_config(base.path), model_config(finetuned.path)
        diffs = [
            f"{what}: {a} in the base, {b} in the fine-tuned model"
            for what, a, b in (
                ("architecture", _architecture(cb), _architecture(cf)),
                ("layer count", cb.num_hidden_layers, cf.num_hidden_layers),
                ("hidden size", cb.hidden_size, cf.hidden_size),
            )
            if a != b
        ]
        tokenizer_path = finetuned.path
    tokenizer = load_tokenizer(base.path)
    if tokenizer_path != base.path:
        diffs += tokenizer_differences(tokenizer, load_tokenizer(tokenizer_path))
    if diffs:
        raise IncompatibleModelsError(
            f"{base.spec} and {finetuned.spec} cannot be compared: {'; '.join(diffs)}"
        )
    return tokenizer


def _architecture(cfg) -> str:
    return " ".join([str(cfg.model_type), *(getattr(cfg, "architectures", None) or [])])


def tokenizer_differences(base, finetuned) -> list[str]:
    """What differs between two tokenizers, one phrase each: vocabulary, chat template, tokenisation."""
    out = []
    va, vb = base.get_vocab(), finetuned.get_vocab()
    if va != vb:
        changed = len(va.keys() ^ vb.keys()) + sum(va[k] != vb[k] for k in va.keys() & vb.keys())
        out.append(
            f"tokenizer vocabulary: {len(va)} tokens in the base, {len(vb)} in the fine-tuned model "
            f"({changed} differ)"
        )
    ra, rb = _render(base), _render(finetuned)
    if ra != rb:
        i = next((k for k, (x, y) in enumerate(zip(ra, rb, strict=False)) if x != y), min(len(ra), len(rb)))
        out.append(
            f"chat template: a probe conversation renders differently from character {i} "
            f"({ra[i : i + 24]!r} in the base, {rb[i : i + 24]!r} in the fine-tuned model)"
        )
    elif not out:  # same vocabulary and text: the merges or normalisation could still differ
        ids_a = base(ra, add_special_tokens=False)["input_ids"]
        if ids_a != finetuned(rb, add_special_tokens=False)["input_ids"]:
            out.append("tokenizer: the same text gives different token ids")
    return out


def _render(tokenizer) -> str:
    out = []
    for probe in PROBES:
        try:
            out.append(tokenizer.apply_chat_template(probe, add_generation_prompt=True, tokenize=False))
        except Exception as e:  # no template, or one that refuses the probe: compared as such
            out.append(f"<chat template fails: {type(e).__name__}: {e}>")
    return "".join(out)


def _messages_key(messages: list[Message]) -> str:
    return hashlib.sha256(json.dumps(messages, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


def prompt_messages(cfg: ShiftConfig, traits: Sequence[str]) -> dict[str, tuple[str, list[list[Message]]]]:
    """`{trait: (source, prompts)}`: the `--questions` dataset's prompts for every trait, else each trait's
    evaluation questions (its trait file, by the vector's name) as single user messages."""
    if cfg.questions:
        stats = ReadStats()
        items = read_samples(cfg.questions, split=cfg.split, limit=cfg.limit, stats=stats)
        prompts = [s.prompt for s in items if isinstance(s, Sample)]
        if not prompts:
            raise UserError(f"--questions {cfg.questions}: no usable prompts ({stats.rejects} rows rejected)")
        if stats.rejects:
            log.warning(
                "--questions: %d rows rejected by the reader, %d prompts used", stats.rejects, len(prompts)
            )
        source = canonical_uri(cfg.questions) + (f" (split {cfg.split})" if cfg.split else "")
        source += f" (first {cfg.limit})" if cfg.limit else ""
        return {t: (source, prompts) for t in traits}
    out = {}
    for trait in traits:
        try:
            t = load_trait(trait, cfg.traits_dir)
        except TraitError as e:
            raise UserError(
                f"vector {trait!r}: no trait file to take evaluation questions from ({e}); "
                "pass --questions DATA (or --traits-dir)"
            ) from e
        questions = t.eval_questions[: cfg.limit] if cfg.limit else t.eval_questions
        source = f"{t.name} eval_questions (trait file v{t.version}, sha256 {t.sha256[:12]})"
        out[trait] = (source, [[{"role": "user", "content": q}] for q in questions])
    return out


def tokenize_prompts(
    tokenizer, per_trait: dict[str, tuple[str, list[list[Message]]]], max_tokens: int
) -> tuple[tuple[Prompt, ...], dict[str, PromptSet]]:
    """Token ids for every distinct prompt (with the chat template's generation prompt, cut to
    `max_tokens` from the head), and each trait's positions among them."""
    prompts: list[Prompt] = []
    index: dict[str, int] = {}
    sets = {}
    for trait, (source, messages) in per_trait.items():
        positions = []
        for m in messages:
            key = _messages_key(m)
            if key not in index:
                try:
                    ids = chat_ids(tokenizer, m)
                except Exception as e:
                    raise UserError(f"{source}: the chat template fails on a prompt: {e}") from e
                cut, _, truncated = truncate(ids, [], max_tokens)
                index[key] = len(prompts)
                prompts.append(Prompt(key, tuple(cut), truncated))
            positions.append(index[key])
        digest = hashlib.sha256("\n".join(prompts[i].key for i in positions).encode()).hexdigest()
        sets[trait] = PromptSet(source, digest, tuple(positions))
    return tuple(prompts), sets


def prepare(cfg: ShiftConfig) -> ShiftPlan:
    """Resolve both models, check they can be compared, then the vectors, layers and prompts: no weights
    load here."""
    # before the models are looked at
    work = Work.resolve(cfg.device, cfg.dtype, here=not on_cluster(cfg.address))
    base = resolve_model(cfg.base)
    finetuned = resolve_finetuned(cfg.finetuned, base)
    tokenizer = check_compatible(base, finetuned)
    vectors, layers, units = vectors_at(base, cfg.traits, cfg.vectors, cfg.layers)
    # fixed, never tuned: both models must see the same batches (padding and batch shape change the
    # kernels' rounding), so a paired difference measures the weights and nothing else
    settings = work.score_settings(
        tuned=False,
        layers=layers,
        mode="natural" if cfg.generate else "proxy",
        max_tokens=cfg.max_tokens,
        batch_tokens=cfg.batch_tokens,
        max_batch_size=cfg.max_batch_size,
        generation=cfg.generation,
    )
    per_trait = prompt_messages(cfg, [v.name for v in vectors])
    prompts, sets = tokenize_prompts(tokenizer, per_trait, cfg.max_tokens)
    return ShiftPlan(
        base, finetuned, work, tuple(vectors), units, settings, prompts, sets, cfg.generate, work.chunk_size()
    )


# -- the model work ---------------------------------------------------------------------------------


@dataclass(slots=True)
class PromptBatch:
    keys: list[str]
    ids: list[list[int]]


@dataclass(slots=True)
class Projected:
    """One model's projections of a batch, `[batch, layers, traits]`: at the last prompt token, and with
    `generate` the mean over its own answer's tokens (NaN for an empty answer)."""

    prompt_last: np.ndarray
    response_avg: np.ndarray | None = None
    answer_tokens: list[int] | None = None


class ShiftStage:
    """One model's passes over the prompts, on a worker: `setup` loads it (merging an adapter), `process`
    projects a batch with the screen's `Scorer`."""

    def __init__(self, model: ModelRef | AdapterRef, plan: ShiftPlan):
        self.model = model
        self.plan = plan
        self.scorer: Scorer | None = None

    def setup(self) -> None:
        self.scorer = self.plan.work.scorer(self.model, self.plan.units, self.plan.settings)

    def process(self, batch: PromptBatch, report: Callable[[int], None] | None = None) -> Projected:
        assert self.scorer is not None, "setup() first"
        out = Projected(self.scorer.project_prompts(batch.ids))
        if self.plan.generate:
            out.response_avg, answers = self.scorer.natural(batch.ids, batch.keys)
            out.answer_tokens = [len(a) for a in answers]
        if report is not None:
            report(len(batch.ids))
        return out


def _project(stage: ShiftStage, plan: ShiftPlan, resources: Resources) -> dict[str, np.ndarray]:
    """`{measure: [prompts, layers, traits]}` for one model, in the plan's prompt order."""
    shape = (len(plan.prompts), len(plan.layers), len(plan.traits))
    out = {m: np.full(shape, np.nan) for m in (MEASURES if plan.generate else MEASURES[:1])}
    where = {p.key: i for i, p in enumerate(plan.prompts)}
    for batch, got in run_stage(stage, plan.batches(), resources):
        rows = [where[k] for k in batch.keys]
        out["prompt_last"][rows] = got.prompt_last
        if plan.generate:
            out["response_avg"][rows] = got.response_avg
    return out


def project_both(plan: ShiftPlan, resources: Resources) -> dict[str, dict[str, np.ndarray]]:
    """Both models' projections, `{"base"|"finetuned": {measure: array}}`: one model after the other
    (each stage loads its model on the workers, runs, and frees them), or both at once, on half the
    actors each, when there are two actors or more."""
    stages = {"base": ShiftStage(plan.base, plan), "finetuned": ShiftStage(plan.finetuned, plan)}
    if resources.actors >= 2:
        half = replace(resources, actors=resources.actors // 2)
        with ThreadPoolExecutor(max_workers=2) as pool:
            futures = {k: pool.submit(_project, s, plan, half) for k, s in stages.items()}
            return {k: f.result() for k, f in futures.items()}
    out = {}
    for name, stage in stages.items():
        label = "fine-tuned" if name == "finetuned" else name
        log.info("projecting %d prompts with the %s model", len(plan.prompts), label)
        out[name] = _project(stage, plan, resources)
        del stage.scorer  # an in-process model is freed before the next one loads
    return out


def paired_shift(base: np.ndarray, finetuned: np.ndarray) -> tuple[int, float, float | None, float, float]:
    """`(n, mean of finetuned − base, its standard error, mean base, mean finetuned)` over the pairs where
    both are finite; n = 0 (and NaNs) when there are none."""
    ok = np.isfinite(base) & np.isfinite(finetuned)
    n = int(ok.sum())
    if n == 0:
        return 0, float("nan"), None, float("nan"), float("nan")
    d = finetuned[ok] - base[ok]
    stderr = float(d.std(ddof=1) / np.sqrt(n)) if n > 1 else None
    return n, float(d.mean()), stderr, float(base[ok].mean()), float(finetuned[ok].mean())


def shifts_of(plan: ShiftPlan, proj: dict[str, dict[str, np.ndarray]]) -> list[Shift]:
    """Per trait (over its own prompts), layer and measure."""
    out = []
    for measure in proj["base"]:
        for k, trait in enumerate(plan.traits):
            rows = list(plan.prompt_sets[trait].indices)
            for j, layer in enumerate(plan.layers):
                n, mean, se, b, f = paired_shift(
                    proj["base"][measure][rows, j, k], proj["finetuned"][measure][rows, j, k]
                )
                if n == 0:
                    log.warning(
                        "%s layer %d %s: no prompt with both answers non-empty", trait, layer, measure
                    )
                    continue
                out.append(Shift(trait, layer, measure, n, mean, se, b, f))
    return out


def measure(cfg: ShiftConfig) -> ShiftResult:
    """Measure the shift from `cfg.base` to `cfg.finetuned` and store it in `cfg.db`."""
    started = time.perf_counter()
    check_not_busy(cfg.db)
    plan = prepare(cfg)
    with model_workers(str(plan.work.device), cfg.actors, address=cfg.address) as resources:
        proj = project_both(plan, resources)
    result = ShiftResult(plan, shifts_of(plan, proj), time.perf_counter() - started)
    with Store(cfg.db) as store:
        store.write_shifts(result.rows())
    return result
