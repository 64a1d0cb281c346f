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
answers to the held-out evaluation questions. The steps, in order, each in its module: generate → judge →
pair (generation.py) → activations → vectors (vectors.py) → layer report and specificity (evaluation.py)
→ files (sidecar.py). Model work runs as `Stage`s on `run_stage`, like screening: in-process with
actors=0, else on Ray actors. This module runs the steps; the names callers use are importable from it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

from screener.distributed import Resources
from screener.extract.controls import Control
from screener.extract.evaluation import HeldOut, evaluate, held_out, held_out_reports, orthogonal_traits
from screener.extract.examples import from_trait, read_example_files
from screener.extract.generation import (
    Answer,
    GenerationStage,
    build_items,
    drop_reason,
    generate_answers,
    generated_reads,
    judge_answers,
    pair_up,
    probe_judge,
)
from screener.extract.judges import Judge, NoJudge
from screener.extract.settings import (
    METHODS,
    NEG,
    POS,
    READ_CONTEXTS,
    ExtractError,
    ExtractSettings,
    Read,
    batched,
)
from screener.extract.sidecar import (
    ExtractResult,
    response_only,
    trait_and_model_fields,
    write_responses,
    write_vectors,
)
from screener.extract.traits import Trait
from screener.extract.vectors import (
    ActivationStage,
    Whitening,
    example_reads,
    orthogonalize,
    specific_vectors,
)
from screener.models import ModelRef

__all__ = [
    "METHODS",
    "NEG",
    "POS",
    "READ_CONTEXTS",
    "ActivationStage",
    "Answer",
    "ExtractError",
    "ExtractResult",
    "ExtractSettings",
    "GenerationStage",
    "HeldOut",
    "Read",
    "Whitening",
    "batched",
    "build_items",
    "drop_reason",
    "example_reads",
    "extract",
    "extract_from_examples",
    "generated_reads",
    "held_out_reports",
    "orthogonal_traits",
    "orthogonalize",
    "pair_up",
]

log = logging.getLogger(__name__)


def vectors_and_reports(
    model: ModelRef,
    examples: tuple[list[Read], list[Read], bool],
    held: HeldOut,
    orthogonal_to: dict[str, Trait] | None,
    whitening: tuple[Whitening, dict[str, Trait]] | None,
    tokenizer,
    settings: ExtractSettings,
    resources: Resources,
    memo: dict | None,
) -> tuple:
    """Steps 4-6 of both ways: the vectors from the (positive, negative, paired) reads (orthogonalised or
    whitened, with the sidecar fields that say so), then their layer reports, specificity and control
    matrices on `held`."""
    stage = ActivationStage(model, settings, memo)
    positives, negatives, paired = examples
    fit = whitening and (*whitening, held.control_fit)
    vectors, fields = specific_vectors(
        positives, negatives, orthogonal_to, tokenizer, settings, stage, resources, paired, fit
    )
    return vectors, fields, evaluate(vectors, held, stage, resources)


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
    whitening: tuple[Whitening, dict[str, Trait]] | None = None,
    memo: dict | None = None,
) -> ExtractResult:
    """Generate, judge, pair, average and report; write one `.pt` + sidecar per method (`note`, free text
    such as why this method, goes into the sidecar). `controls`: the style control sets to report on
    (default: the built-in ones). `whitening`: (how, the traits whose examples are nuisance) for a
    whitened response_avg vector (vectors.whiten; the controls' even pairs are nuisance too). `memo`:
    reads shared between runs in one process (in-process work only)."""
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
    held = held_out(trait, tokenizer, settings, eval_files, traits_dir, generated, controls, bool(whitening))
    positives, negatives = generated_reads(kept, settings.read_context)
    vectors, orthogonal, (reports, specificity, controls) = vectors_and_reports(
        model,
        (positives, negatives, True),
        held,
        orthogonal_to,
        whitening,
        tokenizer,
        settings,
        resources,
        memo,
    )
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
        methods = response_only(methods, common, "both answers of a pair are read after the same question")
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
    whitening: tuple[Whitening, dict[str, Trait]] | None = None,
    memo: dict | None = None,
) -> ExtractResult:
    """Read labelled examples (the `files`, else the trait file's written `examples`) teacher-forced after
    their own prompts, average, report; write one `.pt` + sidecar per method that is defined (`whitening`
    and `memo` as in `extract`)."""
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
    held = held_out(
        trait, tokenizer, settings, eval_files, traits_dir, controls=controls, split_controls=bool(whitening)
    )
    vectors, orthogonal, (reports, specificity, controls) = vectors_and_reports(
        model,
        (positives, negatives, paired),
        held,
        orthogonal_to,
        whitening,
        tokenizer,
        settings,
        resources,
        memo,
    )
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
        methods = response_only(methods, common, "every example is one answer of a pair to a shared prompt")
    return write_vectors(
        Path(out_dir), trait, vectors, (reports, specificity, controls), held, common, model, methods, started
    )
