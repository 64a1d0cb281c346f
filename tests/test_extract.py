"""Extraction: exact mean-difference math on tiny random models, the filtering rule, the file format,
the layer report statistics, the steering hook, and the built-in trait files."""

from __future__ import annotations

import argparse
import json

import numpy as np
import pytest
import torch
from conftest import plain_hidden_states, tiny_ref

from screener.commands.extract import add_commands
from screener.distributed import Resources
from screener.extract import generation
from screener.extract.judges import NoJudge
from screener.extract.layers import LayerStats, auroc, choose_layer, cohens_d, layer_report
from screener.extract.pipeline import (
    METHODS,
    Answer,
    ExtractError,
    ExtractSettings,
    GenerationStage,
    batched,
    build_items,
    drop_reason,
    extract,
    pair_up,
)
from screener.extract.steer import SteerError, Steering
from screener.extract.traits import TraitError, list_traits, load_trait, parse_trait
from screener.models import load_model, pick_device, resolve_model
from screener.vectors import LAYER_CONVENTION, load_vector, save_vector

# one torch thread: tiny models gain nothing from more, and on a busy 2-core machine two threads made
# each tiny forward 8x slower (measured: an extraction took 43 s with 2 threads, 5 s with 1)
IN_PROCESS = Resources(actors=0, num_cpus=0, num_gpus=0, threads=1)
TINY_TRAIT = {
    "name": "cheerful",
    "version": 3,
    "description": "Upbeat and positive.",
    "instruction": [
        {"pos": "Be upbeat.", "neg": "Be plain."},
        {"pos": "Smile a lot.", "neg": "Stay neutral."},
    ],
    "questions": ["How are you?", "What is a fox?", "Tell me about dogs."],
    "eval_questions": ["Any news?", "What is your name?"],
    "eval_prompt": "Is this cheerful? {question} {answer} Answer 0-100.",
}


@pytest.fixture(scope="module")
def tiny_trait(tmp_path_factory):
    path = tmp_path_factory.mktemp("traits") / "cheerful.json"
    path.write_text(json.dumps(TINY_TRAIT))
    return load_trait(str(path))


@pytest.fixture(scope="module")
def extracted(tiny_llama, tiny_trait, tmp_path_factory):
    out = tmp_path_factory.mktemp("vectors")
    settings = ExtractSettings(samples=2, max_new_tokens=5, temperature=1.0, batch_size=8, dtype="float32")
    result = extract(tiny_trait, tiny_ref(tiny_llama), NoJudge(), settings, IN_PROCESS, out)
    return result, settings, out


def test_pipeline_vectors_are_exact_mean_differences(extracted, tiny_llama, tiny_trait):
    """Regenerate the same responses (seeded per batch) and recompute every vector from plain passes."""
    result, settings, _ = extracted
    stage = GenerationStage(tiny_ref(tiny_llama), settings)
    stage.setup()
    items = [it for chunk in batched(build_items(tiny_trait, settings.samples), settings.batch_size)
             for it in stage.process(chunk)]  # fmt: skip
    kept, _ = pair_up([it for it in items if it.split == "extract"], judged=False, settings=settings)
    assert kept and result.sidecars["response_avg"]["pairs_kept"] == len(kept)
    model = stage.model

    def features(it: Answer) -> torch.Tensor:
        hs = plain_hidden_states(model, it.prompt_ids + it.response_ids)
        n = len(it.prompt_ids)
        return torch.stack([hs[:, n:].mean(1), hs[:, :n].mean(1), hs[:, n - 1]])

    pos = torch.stack([features(p) for p, _ in kept]).mean(0)
    neg = torch.stack([features(n) for _, n in kept]).mean(0)
    for m, method in enumerate(METHODS):
        vec = load_vector(result.paths[method])
        torch.testing.assert_close(vec.tensor, pos[m] - neg[m], atol=1e-4, rtol=1e-4)


def test_vector_file_round_trip(extracted, tiny_trait, tiny_llama, tmp_path):
    result, _, out = extracted
    for method in METHODS:
        path = result.paths[method]
        assert path == out / f"cheerful_{method}_diff.pt"
        raw = torch.load(path, weights_only=True)
        assert raw.dtype == torch.float32 and raw.shape == (5, 64)
        # the file holds this vector alone, not the storage of the pipeline's [3, L+1, H] tensor it came from
        assert raw.untyped_storage().nbytes() == raw.numel() * 4
        vec = load_vector(path)
        s = vec.sidecar
        assert vec.name == "cheerful" and s["method"] == method and s["trait_version"] == 3
        assert s["layer_convention"] == LAYER_CONVENTION and s["judge"] == {"kind": "none"}
        assert s["trait_file_sha256"] == tiny_trait.sha256 and len(s["model_sha256"]) == 64
        assert s["pairs_kept"] + s["pairs_dropped"] == 2 * 3 * 2  # pairs x questions x samples
        assert s["settings"]["samples"] == 2 and s["date"]
        assert s["settings"]["dtype"] == "float32" and s["settings"]["resolved_dtype"] == "float32"
        assert s["settings"]["device"] == "auto" and s["settings"]["resolved_device"] == str(pick_device())
        assert s["model_name"] == tiny_llama.name and s["model_source"] == str(tiny_llama)
        assert len(s["layer_report"]) == 5 and vec.default_layer == s["chosen_layer"]
        assert s["chosen_layer"] in (1, 2, 3)
    lines = (out / "cheerful_extraction_responses.jsonl").read_text().splitlines()
    assert len(lines) == 2 * 2 * (3 + 2) * 2  # pairs x samples x questions x polarity
    big = torch.randn(3, 5, 64)  # float32 on the CPU already, so `.to` alone would keep the view
    raw = torch.load(save_vector(tmp_path / "row.pt", big[1], {}), weights_only=True)
    assert torch.equal(raw, big[1]) and raw.untyped_storage().nbytes() == 5 * 64 * 4


def test_model_source_is_canonical(tiny_llama):
    ref = resolve_model(str(tiny_llama))
    assert ref.spec == str(tiny_llama) and ref.source == str(tiny_llama.resolve())


def test_vectors_show(extracted, capsys):
    result, _, _ = extracted
    parser = argparse.ArgumentParser()
    add_commands(parser.add_subparsers())
    args = parser.parse_args(["vectors", "show", str(result.paths["response_avg"])])
    assert args.func(args) == 0
    out = capsys.readouterr().out
    assert "AUROC" in out and "<- chosen" in out and "response_avg" in out


class ScriptedJudge:
    """Answers every prompt of a batch from `scores` (cycled), and records the batches."""

    def __init__(self, *scores: float | None):
        self.scores, self.calls = scores, []

    def score(self, prompts):
        self.calls.append(list(prompts))
        return [self.scores[i % len(self.scores)] for i in range(len(prompts))]

    def describe(self):
        return {"kind": "scripted"}


class ReachedGeneration(Exception):
    pass


def no_generation(*_args, **_kwargs):
    raise ReachedGeneration


def test_extract_fails_fast_when_the_judge_gives_no_score(tiny_llama, tiny_trait, tmp_path, monkeypatch):
    monkeypatch.setattr(generation, "run_stage", no_generation)
    judge = ScriptedJudge(None)
    with pytest.raises(ExtractError, match="no 0-100 trait score") as err:
        extract(tiny_trait, tiny_ref(tiny_llama), judge, ExtractSettings(), IN_PROCESS, tmp_path)
    message = str(err.value)
    assert "--judge none" in message and "SCREENER_JUDGE_MODEL" in message and "\n" not in message
    assert [len(batch) for batch in judge.calls] == [2]  # two probe answers, with the trait's own rubric
    assert all("Is this cheerful?" in prompt for prompt in judge.calls[0])
    assert not list(tmp_path.iterdir())


def test_extract_fails_fast_when_the_judge_gives_no_coherence_score(
    tiny_llama, tiny_trait, tmp_path, monkeypatch
):
    monkeypatch.setattr(generation, "run_stage", no_generation)

    class TraitOnly(ScriptedJudge):
        def score(self, prompts):
            scores = super().score(prompts)
            return [None if "coherence" in p else s for p, s in zip(prompts, scores, strict=True)]

    with pytest.raises(ExtractError, match="no 0-100 coherence score"):
        extract(tiny_trait, tiny_ref(tiny_llama), TraitOnly(70.0), ExtractSettings(), IN_PROCESS, tmp_path)


@pytest.mark.parametrize("scores", [(80.0,), (None, 20.0)])  # one score of the two is enough
def test_a_judge_that_scores_passes_the_probe(tiny_llama, tiny_trait, tmp_path, monkeypatch, scores):
    monkeypatch.setattr(generation, "run_stage", no_generation)
    judge = ScriptedJudge(*scores)
    with pytest.raises(ReachedGeneration):
        extract(tiny_trait, tiny_ref(tiny_llama), judge, ExtractSettings(), IN_PROCESS, tmp_path)
    assert [len(batch) for batch in judge.calls] == [2, 2]  # trait, then coherence


@pytest.mark.parametrize(
    ("scores", "threshold", "reason"),
    [
        ((50, 49.99, 50, 50), 50, None),  # all exactly at the boundaries that keep
        ((49.99, 0, 90, 90), 50, "positive lacks the trait"),
        ((90, 50, 90, 90), 50, "negative shows the trait"),  # negative must be < 100 - threshold
        ((90, 10, 49.99, 90), 50, "incoherent"),
        ((90, 10, 90, 49.99), 50, "incoherent"),
        ((70, 29.99, 50, 50), 70, None),
        ((70, 30, 90, 90), 70, "negative shows the trait"),
        ((69.99, 0, 90, 90), 70, "positive lacks the trait"),
        ((None, 0, 90, 90), 50, "no judge score"),
        ((90, 0, 90, None), 50, "no judge score"),
    ],
)
def test_drop_reason(scores, threshold, reason):
    assert drop_reason(*scores, threshold=threshold, coherence_min=50) == reason


def test_pair_up_counts_drops():
    def item(q, pol, score, ids=(1,)):
        return Answer(
            "extract", 0, q, 0, pol, "", "", response_ids=list(ids), trait_score=score, coherence=80
        )

    items = [item(0, "pos", 90), item(0, "neg", 5), item(1, "pos", 10), item(1, "neg", 5),
             item(2, "pos", 90), item(2, "neg", 5, ids=())]  # fmt: skip
    kept, dropped = pair_up(items, judged=True, settings=ExtractSettings())
    assert [p.question for p, _ in kept] == [0]
    assert dropped == {"positive lacks the trait": 1, "empty response": 1}
    kept, dropped = pair_up(items, judged=False, settings=ExtractSettings())
    assert len(kept) == 2 and dropped == {"empty response": 1}


def test_auroc_and_effect_size_by_hand():
    pos, neg = np.array([3.0, 4.0, 5.0]), np.array([1.0, 2.0, 3.0])
    # 9 (pos, neg) comparisons: 8 wins and one tie (3 vs 3)
    assert auroc(pos, neg) == pytest.approx(8.5 / 9)
    assert auroc(neg, pos) == pytest.approx(0.5 / 9)
    assert cohens_d(pos, neg) == pytest.approx(2.0)  # means 4 and 2, both variances 1
    assert cohens_d(np.array([1.0, 3.0, 5.0, 7.0]), np.array([0.0, 2.0])) == pytest.approx(
        (4 - 1) / np.sqrt((3 * np.var([1, 3, 5, 7], ddof=1) + 1 * 2.0) / 4)
    )
    report = layer_report(np.stack([pos, neg], 1), np.stack([neg, pos], 1))
    assert [r.layer for r in report] == [0, 1] and report[1].auroc == pytest.approx(0.5 / 9)


def test_choose_layer_prefers_auroc_then_effect_size_in_the_middle():
    def row(layer, a, d):
        return LayerStats(layer, a, d, 0.0, 0.0)

    report = [row(0, 1.0, 9.0), row(1, 1.0, 9.0), row(2, 0.951, 1.0), row(3, 0.949, 3.0), row(4, 0.9, 5.0),
              row(5, 0.5, 0.0), row(6, 0.6, 0.3), row(7, 1.0, 9.0), row(8, 1.0, 9.0)]  # fmt: skip
    # middle band 2..6; 0.951 and 0.949 both round to 0.95, and the larger effect size wins
    assert choose_layer(report, num_layers=8) == 3
    assert choose_layer(report, num_layers=4) == 1  # band 1..3
    assert choose_layer([], num_layers=8) is None


@pytest.mark.parametrize("layer", [0, 2, 3])
def test_steering_adds_coef_v_at_hidden_states_layer(tiny_llama, layer):
    model, _ = load_model(str(tiny_llama))
    ids = list(range(5, 17))
    base = plain_hidden_states(model, ids)
    v = torch.randn(64, generator=torch.Generator().manual_seed(3))
    with Steering(model, layer, v, coef=2.5):
        steered = plain_hidden_states(model, ids)
    torch.testing.assert_close(
        steered[layer] - base[layer], (2.5 * v).expand(len(ids), -1), atol=1e-4, rtol=1e-4
    )
    torch.testing.assert_close(steered[:layer], base[:layer])
    assert not torch.allclose(steered[layer + 1], base[layer + 1])  # and it propagates
    torch.testing.assert_close(plain_hidden_states(model, ids), base)  # the hook is gone


def test_steering_layer_range_names_the_allowed_layers(tiny_llama):
    model, _ = load_model(str(tiny_llama))
    with pytest.raises(SteerError, match=r"must be in 0\.\.3 .*hidden_states\[4\] is excluded"):
        Steering(model, 4, torch.zeros(64), coef=1.0)


def test_builtin_traits_are_complete_and_held_out():
    names = [name for name, _ in list_traits()]
    for expected in (
        "evil",
        "sycophantic",
        "hallucinating",
        "impolite",
        "apathetic",
        "humorous",
        "optimistic",
    ):
        assert expected in names
        t = load_trait(expected)
        assert len(t.instructions) == 5 and len(t.questions) == 20 and len(t.eval_questions) == 20
        assert not set(t.questions) & set(t.eval_questions)
        assert t.description and t.version >= 1
        filled = t.judge_prompt("Q?", "A.")
        assert "Q?" in filled and "A." in filled and "{answer}" not in filled


def test_trait_validation_names_the_field(tmp_path):
    bad = {**TINY_TRAIT, "eval_questions": ["How are you?"]}
    with pytest.raises(TraitError, match="held out"):
        parse_trait(bad, tmp_path / "x.json")
    with pytest.raises(TraitError, match="eval_prompt"):
        parse_trait({**TINY_TRAIT, "eval_prompt": "no slots"}, tmp_path / "x.json")
    with pytest.raises(TraitError, match=r"instruction\[1\]"):
        parse_trait(
            {**TINY_TRAIT, "instruction": [{"pos": "a", "neg": "b"}, {"pos": "a"}]}, tmp_path / "x.json"
        )
    user_dir = tmp_path / "mine"
    user_dir.mkdir()
    (user_dir / "evil.json").write_text(json.dumps({**TINY_TRAIT, "name": "evil"}))
    assert load_trait("evil", user_dir).instructions[0].pos == "Be upbeat."  # the user's file shadows


@pytest.mark.slow
def test_shipped_vectors_fit_the_default_model():
    from screener.models import resolve_model
    from screener.vectors import BUILTIN_DIR, builtin_traits, builtin_vector_path, check_vector

    ref = resolve_model("default")
    shipped = sorted((BUILTIN_DIR / ref.name).glob("*_diff.pt"))
    # every built-in trait ships the file `screener screen --traits` loads
    assert builtin_traits(ref.name) == sorted(name for name, _ in list_traits())
    assert {builtin_vector_path(ref.name, t) for t in builtin_traits(ref.name)} <= set(shipped)
    for path in shipped:
        vec = load_vector(path)
        check_vector(vec, ref.num_layers, ref.hidden_size, ref.name)
        assert vec.sidecar["model_sha256"] == ref.sha256 and vec.default_layer is not None
        assert vec.sidecar["model_source"] == ref.source
        assert vec.tensor.untyped_storage().nbytes() == vec.tensor.numel() * 4
