"""`screener extract`, `traits new|list`, `vectors show`, `steer`: making and checking persona vectors."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from screener import choices
from screener.choices import DEFAULT_MODEL, EXTRACT_METHODS, JUDGES, READ_CONTEXTS
from screener.commands.common import (
    DEVICE,
    DTYPE,
    MAX_TOKENS,
    add_generation_arguments,
    add_worker_arguments,
    at_least,
    given,
    number,
)

if TYPE_CHECKING:
    from screener.extract.judges import Judge

log = logging.getLogger(__name__)


def make_judge(kind: str, judge_model: str | None, model_spec: str, device: str, dtype: str) -> Judge:
    """`openai` (from the environment), `local` (an HF model, by default the one being extracted), `none`;
    `auto` as `judge_kind` resolves it."""
    from screener.extract.judges import LocalJudge, NoJudge, OpenAIJudge, judge_kind
    from screener.models import resolve_model

    kind = judge_kind(kind)
    if kind == "openai":
        return OpenAIJudge.from_env()
    if kind == "none":
        return NoJudge()
    from screener.work import Work

    ref = resolve_model(judge_model or model_spec)
    model, tok = Work.resolve(device, dtype).load(ref)
    log.info("judging with the local model %s (a small model judges poorly; see the sidecar)", ref.name)
    return LocalJudge(model, tok, name=f"{ref.spec} (sha256 {ref.sha256[:12]})")


# options whose default is ExtractSettings' own (None on the command line)
SETTINGS = (
    "samples",
    "max_new_tokens",
    "temperature",
    "top_p",
    "seed",
    "threshold",
    "coherence_min",
    "batch_size",
    "batch_tokens",
    "dtype",
    "device",
    "read_context",
    "max_tokens",
)


def add_extract_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "trait",
        nargs="+",
        help="trait names (built-in or in --traits-dir) or trait .json files; several are extracted in turn, "
        "in-process (--actors 0) reading each text once for all of them",
    )
    p.add_argument("--model", default=DEFAULT_MODEL, help="HF folder, .gguf file, hub id, or 'default'")
    p.add_argument(
        "--from-examples",
        nargs="*",
        metavar="FILE",
        help="build the vector from labelled examples instead of generating answers: data files (any format "
        "the screen reads) with a 'label' per record or 'positive' + 'negative' answers to one prompt; with "
        "no FILE, the trait file's written 'examples'. No generation, no judge",
    )
    p.add_argument(
        "--eval-examples",
        nargs="+",
        metavar="FILE",
        help="held-out labelled examples for the layer report (default: the trait file's 'eval_examples')",
    )
    p.add_argument(
        "--read-context",
        choices=READ_CONTEXTS,
        help="generation: read the answers after their trait system prompt and question (system, the "
        "default), or after the question alone (question)",
    )
    p.add_argument(
        "--max-tokens",
        type=MAX_TOKENS,
        help=f"examples are cut to this length (default {choices.DEFAULT_MAX_TOKENS})",
    )
    p.add_argument(
        "--orthogonal-to",
        default="none",
        metavar="TRAITS",
        help="remove from the response_avg vector, at each layer, the directions of these traits' written "
        "examples: 'others' (every other trait with examples, except those the trait file declares related), "
        "comma-separated names, or 'none' (default)",
    )
    p.add_argument(
        "--whiten",
        default="none",
        metavar="TRAITS",
        help="whiten the response_avg vector against what varies besides the trait: these traits' written "
        "example pairs and the even pairs of every style control (reported then on their odd pairs); "
        "'others', comma-separated names, or 'none' (default). The built-in vectors use 'others'",
    )
    p.add_argument(
        "--whiten-shrinkage",
        type=number(0.0, 100.0),
        default=choices.WHITEN_SHRINKAGE,
        help=f"ridge of the whitening, a share of the mean eigenvalue (default {choices.WHITEN_SHRINKAGE:g})",
    )
    p.add_argument(
        "--whiten-weight",
        type=number(0.0, 100.0),
        default=choices.WHITEN_WEIGHT,
        help=f"weight of the nuisance pairs against the trait's spread (default {choices.WHITEN_WEIGHT:g})",
    )
    p.add_argument("--traits-dir", help="folder of user trait files, searched before the built-ins")
    p.add_argument(
        "--controls",
        metavar="DIR",
        help="folder of style control sets (pairs that differ in a nuisance, not a trait) every vector is "
        "reported on and the layer rule holds near chance (default: the built-in screener/traits/controls; "
        "'none': no controls)",
    )
    p.add_argument("--out", help="output folder (default: vectors/<model name>)")
    p.add_argument("--judge", choices=JUDGES, default="auto")
    p.add_argument("--judge-model", help="HF model for --judge local (default: the model itself)")
    p.add_argument("--samples", type=at_least(1), help="responses per pair, question, polarity")
    add_generation_arguments(p, "generation")
    p.add_argument("--threshold", type=number(0.0, 100.0), help="trait-score threshold (0-100)")
    p.add_argument("--coherence-min", type=number(0.0, 100.0), help="least coherence score kept (0-100)")
    p.add_argument("--batch-size", type=at_least(1), help="generation rows per batch")
    p.add_argument("--batch-tokens", type=at_least(1), help="tokens per activation forward")
    p.add_argument(
        "--methods",
        default=",".join(EXTRACT_METHODS),
        help="comma-separated subset of " + ",".join(EXTRACT_METHODS),
    )
    p.add_argument("--note", default="", help="free text kept in the sidecar (e.g. why this method)")
    add_worker_arguments(p, cpus=True)


def run_extract(args: argparse.Namespace) -> int:
    from screener.distributed import model_workers, on_cluster
    from screener.extract.controls import load_controls
    from screener.extract.pipeline import (
        ExtractError,
        ExtractSettings,
        Whitening,
        extract,
        extract_from_examples,
        orthogonal_traits,
    )
    from screener.extract.traits import load_trait
    from screener.models import resolve_model
    from screener.work import Work

    methods = [m for m in args.methods.split(",") if m]
    unknown = set(methods) - set(EXTRACT_METHODS)
    if unknown:
        raise ExtractError(f"--methods: unknown {sorted(unknown)}; choose from {', '.join(EXTRACT_METHODS)}")
    work = Work.resolve(args.device, args.dtype, here=not on_cluster(args.address))  # before the model
    traits = [load_trait(name, args.traits_dir) for name in args.trait]
    if len(traits) > 1 and (args.from_examples or args.eval_examples):
        raise ExtractError("FILEs for --from-examples or --eval-examples belong to one trait: give one trait")
    model = resolve_model(args.model)
    settings = ExtractSettings(**given(args, SETTINGS))
    from_examples = args.from_examples is not None
    judge = None  # examples need none
    if not from_examples:
        judge = make_judge(args.judge, args.judge_model, args.model, args.device, args.dtype)
    out = args.out or Path("vectors") / model.name
    controls = None if args.controls is None else load_controls(args.controls, none_ok=True)
    how = Whitening(args.whiten_shrinkage, args.whiten_weight)
    with model_workers(str(work.device), args.actors, args.cpus, args.address) as resources:
        memo = {} if resources.actors == 0 and len(traits) > 1 else None  # reads shared by the traits
        for trait in traits:
            # a list of names may hold the traits being extracted: each is nuisance for the others only
            spec = ",".join(n for n in args.whiten.split(",") if n.strip() != trait.name) or "none"
            whiten = orthogonal_traits(trait, spec, args.traits_dir)
            options = {
                "eval_files": args.eval_examples or (),
                "traits_dir": args.traits_dir,
                "orthogonal_to": orthogonal_traits(trait, args.orthogonal_to, args.traits_dir),
                "note": args.note,
                "controls": controls,
                "whitening": (how, whiten) if args.whiten != "none" else None,
                "memo": memo,
            }
            if from_examples:
                files = args.from_examples
                result = extract_from_examples(
                    trait, model, settings, resources, out, methods, files, **options
                )
            else:
                result = extract(trait, model, judge, settings, resources, out, methods, **options)
            print_result(result)
    return 0


def print_result(result) -> None:
    """The files written, the layer report and the specificity tables."""
    for method, path in result.paths.items():
        side = result.sidecars[method]
        print(f"{path}  (chosen layer {side['chosen_layer']}, {extraction_counts(side)})")
    side = result.sidecars.get("response_avg") or next(iter(result.sidecars.values()))
    for method, why in side.get("methods_not_written", {}).items():
        print(f"{method}: not written ({why})")
    print_reports(side)
    print(f"\ndone in {result.seconds:.0f} s")


def extraction_counts(side: dict) -> str:
    """What a vector was averaged over, in words."""
    if "examples" in side:
        ex = side["examples"]
        return f"{ex['positive']} positive and {ex['negative']} negative examples"
    return f"{side['pairs_kept']} pairs kept"


def print_reports(side: dict, per_layer: bool = False) -> None:
    """The layer report, then the specificity table at the chosen layer (or at every layer)."""
    from screener.extract.layers import (
        NEAR_CHANCE,
        format_cross_trait,
        format_cross_trait_layers,
        format_report,
    )

    chosen = side.get("chosen_layer")
    held = side.get("eval_examples") or {}
    count = held.get("pairs") or side.get("eval_pairs_kept")
    source = held.get("source", "held-out pairs")
    print(f"\nlayer report ({side.get('method')}, {count} held-out pairs: {source}):")
    print(format_report(side["layer_report"], chosen))
    spec = side.get("specificity") or {}
    others, controls = spec.get("traits"), labelled_controls(spec)
    if chosen is None:
        return
    band = tuple(spec.get("near_chance", NEAR_CHANCE))
    how = side.get("chosen_layer_how")
    if others:
        own = next((r for r in side["layer_report"] if r["layer"] == chosen), None)
        print(f"\nspecificity at layer {chosen} ({how}): every other trait's held-out pairs")
        print(format_cross_trait(own, others, chosen, band))
        if spec.get("not_held_to_chance"):
            print("not held to chance (related): " + ", ".join(sorted(spec["not_held_to_chance"])))
    if controls:
        print(f"\nstyle controls at layer {chosen}: share of pairs whose side a projects above side b")
        print(format_cross_trait(None, controls, chosen, band, head="control: a > b"))
    if per_layer and others:
        print("\nshare ranked right on each other trait's held-out pairs, per layer:")
        print(format_cross_trait_layers(others, chosen))
    if per_layer and controls:
        print("\nshare of each style control's pairs with side a above side b, per layer:")
        print(format_cross_trait_layers(spec["controls"], chosen))


def labelled_controls(spec: dict) -> dict[str, dict]:
    """The sidecar's control matrix keyed "name: a > b" (what each side is), for the tables."""
    sets = spec.get("control_sets") or {}

    def label(name: str) -> str:
        s = sets.get(name) or {}
        return f"{name}: {s['a']} > {s['b']}" if s.get("a") and s.get("b") else name

    return {label(name): m for name, m in (spec.get("controls") or {}).items()}


def run_traits_list(args: argparse.Namespace) -> int:
    from screener.extract.traits import TraitError, list_traits, load_trait

    for name, path in list_traits(args.traits_dir):
        try:
            t = load_trait(str(path))
            print(
                f"{name:<16} v{t.version}  {len(t.instructions)} pairs, {len(t.questions)}+"
                f"{len(t.eval_questions)} questions, {len(t.examples)}+{len(t.eval_examples)} examples"
                f"  {path}"
            )
        except TraitError as e:
            print(f"{name:<16} INVALID: {e}")
    return 0


def run_traits_new(args: argparse.Namespace) -> int:
    from screener.extract.judges import OpenAIJudge
    from screener.extract.traits import DRAFT_REQUEST, TraitError, load_trait, parse_draft, scaffold

    path = Path(args.traits_dir) / f"{args.name}.json"
    if path.exists() and not args.force:
        print(f"error: {path} exists (use --force to overwrite)", file=sys.stderr)
        return 2
    draft = None
    if os.environ.get("SCREENER_GENERATOR_MODEL") or os.environ.get("SCREENER_JUDGE_MODEL"):
        gen = OpenAIJudge.from_env("GENERATOR")
        log.info("drafting %s with %s", args.name, gen.model)
        draft = parse_draft(gen.chat(DRAFT_REQUEST.format(name=args.name, description=args.description)))
    data = scaffold(args.name, args.description, draft)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n")
    print(f"wrote {path}")
    try:
        load_trait(str(path))
    except TraitError as e:
        print(f"fill it in before extracting: {e}")
    return 0


def run_vectors_show(args: argparse.Namespace) -> int:
    from screener.vectors import load_vector

    vec = load_vector(args.file)
    s = vec.sidecar
    print(f"{vec.path}: {vec.name}, shape {tuple(vec.tensor.shape)}, sha256 {vec.sha256[:16]}")
    if not s:
        print("no sidecar: no layer report")
        return 0
    for key in (
        "extraction_method",
        "note",
        "method",
        "read_context",
        "orthogonal_to",
        "whitened",
        "model",
        "model_source",
        "model_sha256",
        "judge",
        "examples",
        "pairs_kept",
        "pairs_dropped",
        "dropped_by_reason",
        "eval_pairs_kept",
        "date",
        "chosen_layer",
        "chosen_layer_how",
    ):
        if key in s:
            print(f"  {key}: {json.dumps(s[key]) if isinstance(s[key], dict) else s[key]}")
    if s.get("layer_report"):
        print_reports(s, per_layer=args.per_layer)
    return 0


def run_steer(args: argparse.Namespace) -> int:
    import torch

    from screener.extract.judges import LocalJudge, judge_kind
    from screener.extract.steer import steer_check
    from screener.extract.traits import load_trait
    from screener.models import resolve_model
    from screener.vectors import VectorError, builtin_vector_path, load_vector
    from screener.work import Work

    work = Work.resolve(args.device, args.dtype)  # before the model is looked at
    trait = load_trait(args.trait, args.traits_dir)
    ref = resolve_model(args.model)
    vec = load_vector(args.vector or builtin_vector_path(ref.name, trait.name), trait.name)
    layer = args.layer if args.layer is not None else vec.default_layer
    if layer is None:
        raise VectorError(f"{vec.path} has no chosen layer: pass --layer")
    if args.cpus:
        torch.set_num_threads(args.cpus)
    model, tok = work.load(ref)
    kind = judge_kind(args.judge)
    if kind == "local" and not args.judge_model:  # reuse the loaded model; it judges unsteered
        judge: Judge = LocalJudge(model, tok, name=f"{ref.spec} (sha256 {ref.sha256[:12]})")
    else:
        judge = make_judge(kind, args.judge_model, args.model, args.device, args.dtype)
    results = steer_check(
        model, tok, trait, vec.tensor, layer, args.coef, judge, args.questions, args.max_new_tokens
    )

    def fmt(x: float | None) -> str:
        return "   -" if x is None else f"{x:5.1f}"

    print(f"steering {trait.name} at layer {layer}, {args.questions} questions, judge {judge.describe()}")
    print(f"{'coef':>6}  {'trait':>5}  {'coherence':>9}  first answer")
    for r in results:
        first = r.answers[0].replace("\n", " ")[:70] if r.answers else ""
        print(f"{r.coef:>6.1f}  {fmt(r.trait_score)}  {fmt(r.coherence):>9}  {first}")
    if args.out:
        rows = [
            {
                "coef": r.coef,
                "trait_score": r.trait_score,
                "coherence": r.coherence,
                "answers": list(r.answers),
            }
            for r in results
        ]
        payload = {
            "trait": trait.name,
            "layer": layer,
            "vector": vec.path,
            "judge": judge.describe(),
            "results": rows,
        }
        Path(args.out).write_text(json.dumps(payload, indent=2) + "\n")
    return 0


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("extract", help="extract persona vectors for a trait from a model")
    add_extract_arguments(p)
    p.set_defaults(func=run_extract)

    traits = sub.add_parser("traits", help="list trait files, or scaffold a new one")
    tsub = traits.add_subparsers(dest="traits_command", required=True)
    tl = tsub.add_parser("list", help="the traits visible (built-ins and --traits-dir)")
    tl.add_argument("--traits-dir")
    tl.set_defaults(func=run_traits_list)
    tn = tsub.add_parser("new", help="write NAME.json (drafted when a generator endpoint is configured)")
    tn.add_argument("name")
    tn.add_argument("description")
    tn.add_argument("--traits-dir", default="traits", help="where to write it (default ./traits)")
    tn.add_argument("--force", action="store_true")
    tn.set_defaults(func=run_traits_new)

    vectors = sub.add_parser("vectors", help="inspect persona vector files")
    vsub = vectors.add_subparsers(dest="vectors_command", required=True)
    vs = vsub.add_parser("show", help="a vector's sidecar and layer report")
    vs.add_argument("file")
    vs.add_argument("--per-layer", action="store_true", help="the specificity table at every layer")
    vs.set_defaults(func=run_vectors_show)

    st = sub.add_parser("steer", help="generate with coef·v added at a layer; judge trait and coherence")
    st.add_argument("trait")
    st.add_argument("--model", default=DEFAULT_MODEL)
    st.add_argument("--vector", help="vector file (default: the built-in one for the model)")
    st.add_argument("--layer", type=at_least(0), help="default: the vector's chosen layer")
    st.add_argument("--coef", type=float, nargs="+", default=[0.0, 2.0, 4.0, 8.0])
    st.add_argument("--questions", type=at_least(1), default=5, help="how many evaluation questions")
    st.add_argument("--max-new-tokens", type=at_least(1), default=96)
    st.add_argument("--traits-dir")
    st.add_argument("--judge", choices=JUDGES, default="auto")
    st.add_argument("--judge-model")
    st.add_argument("--device", type=DEVICE, default="auto", help="auto, cpu, cuda or cuda:N")
    st.add_argument("--dtype", type=DTYPE, default="auto")
    st.add_argument("--cpus", type=at_least(1), help="torch threads on CPU (default all)")
    st.add_argument("--out", help="write the results as JSON")
    st.set_defaults(func=run_steer)
