"""Natural mode's one prefill per prompt (the default) against the two-pass path it replaced, in fp32.

The two-pass path (`ScoreSettings(shared_prefill=False)`: a teacher-forced pass over prompt + response,
then HF `generate` re-reading the prompt) is the reference: the shared path must give the same values."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
from conftest import TEST_DEVICE, random_vectors
from test_scoring import RTOL, conversations, make_samples

from screener.models import decoder_parts, load_model
from screener.records import Sample, Scored
from screener.scoring import GenerationSettings, Scorer, ScoreSettings
from screener.vectors import unit_vectors


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def model_and_tok(request, tiny_models):
    folder = tiny_models[request.param]
    model, tok = load_model(str(folder), TEST_DEVICE)
    return folder, model, tok


def natural_samples() -> list[Sample]:
    """Single-turn and multi-turn prompts, and every turn of a few conversations (--turns all)."""
    return make_samples(6) + conversations()


def score(model, tok, units, samples, **settings) -> list[Scored]:
    gen = settings.pop("generation", GenerationSettings(max_new_tokens=12))
    st = ScoreSettings(
        mode="natural", generation=gen, **{"generate_batch_size": 4, "shared_prefill": True, **settings}
    )
    return Scorer(model, tok, units, st).score(samples)


def assert_same(new: list[Scored], old: list[Scored]) -> None:
    for a, b in zip(new, old, strict=True):
        assert isinstance(a, Scored) and isinstance(b, Scored)
        assert (a.sample_id, a.turn, a.prompt_tokens, a.response_tokens, a.truncated) == (
            b.sample_id,
            b.turn,
            b.prompt_tokens,
            b.response_tokens,
            b.truncated,
        )
        assert (a.natural_tokens, a.natural_response) == (b.natural_tokens, b.natural_response)
        np.testing.assert_allclose(a.proj_response, b.proj_response, rtol=RTOL, atol=1e-6)
        np.testing.assert_allclose(a.proj_prompt_last, b.proj_prompt_last, rtol=RTOL, atol=1e-6)
        np.testing.assert_allclose(a.proj_natural, b.proj_natural, rtol=RTOL, atol=1e-6)  # NaN == NaN


@pytest.mark.parametrize("side", ["left", "right"])
def test_shared_prefill_equals_the_two_pass_path(model_and_tok, side):
    folder, model, tok = model_and_tok
    layers = (0, 2, model.config.num_hidden_layers)
    units = unit_vectors(random_vectors(folder, 2), layers)
    samples = natural_samples()
    old = score(model, tok, units, samples, layers=layers, padding_side=side, shared_prefill=False)
    new = score(model, tok, units, samples, layers=layers, padding_side=side)
    assert_same(new, old)
    assert max(r.natural_tokens for r in new) > 0


def test_a_decode_batch_prefilled_in_passes(model_and_tok, monkeypatch):
    """A decode batch wider than one teacher-forced budget is prefilled in several passes whose caches are
    merged (each left-aligned to the widest pass): the same values as the two-pass path, and fewer decode
    batches than prefill passes."""
    import screener.scoring as scoring

    folder, model, tok = model_and_tok
    layers = (1, model.config.num_hidden_layers)
    units = unit_vectors(random_vectors(folder, 2), layers)
    samples = natural_samples()
    calls = Counter()

    def counting(name: str):
        original = getattr(scoring, name)

        def counted(*a, **k):
            calls[name] += 1
            return original(*a, **k)

        return counted

    for name in ("prefill", "decode"):
        monkeypatch.setattr(scoring, name, counting(name))
    small = {"layers": layers, "batch_tokens": 48, "generate_batch_size": 8}
    old = score(model, tok, units, samples, shared_prefill=False, **small)
    new = score(model, tok, units, samples, **small)
    assert_same(new, old)
    assert calls["prefill"] > calls["decode"] > 0
    assert max(r.natural_tokens for r in new) > 0


def test_shared_prefill_keeps_truncation_and_an_early_stop(model_and_tok):
    """Prompts cut to --max-tokens, and a layer below the last block (the teacher-forced read stops early
    while the prompt's cache must still hold every block for generation)."""
    folder, model, tok = model_and_tok
    units = unit_vectors(random_vectors(folder, 1), (1,))
    samples = natural_samples()
    old = score(model, tok, units, samples, layers=(1,), max_tokens=40, shared_prefill=False)
    new = score(model, tok, units, samples, layers=(1,), max_tokens=40)
    assert any(r.truncated for r in new)
    assert_same(new, old)


def test_finished_rows_leave_the_generation_batch(model_and_tok):
    """Each answer token is fed back once (its hidden states are read from that step) and a row that ended
    is never fed again: the rows of all one-token decode steps add up to the answers' tokens."""
    folder, model, tok = model_and_tok
    units = unit_vectors(random_vectors(folder, 1), (2,))
    settings = ScoreSettings(
        layers=(2,), mode="natural", generation=GenerationSettings(12), shared_prefill=True
    )
    scorer = Scorer(model, tok, units, settings)
    prompts = [scorer.tokenize(s).prompt for s in make_samples(8)]
    keys = [f"k{i}" for i in range(len(prompts))]
    first = scorer.natural(prompts, keys)[1]
    # a token some answers reach early and others never: as an end-of-turn id, rows end at many steps
    counts = Counter(t for a in first for t in set(a[1:]))
    scorer.stops = [*scorer.stops, min(counts, key=lambda t: abs(counts[t] - len(first) / 2))]
    fed: list[int] = []
    _, blocks, _ = decoder_parts(model)

    def count(_m, args, kwargs):
        h = args[0] if args else kwargs["hidden_states"]
        if h.shape[1] == 1:
            fed.append(h.shape[0])

    handle = blocks[0].register_forward_pre_hook(count, with_kwargs=True)
    try:
        answers = scorer.natural(prompts, keys)[1]
    finally:
        handle.remove()
    assert len({len(a) for a in answers}) > 1  # rows did end at different steps
    assert sum(fed) == sum(map(len, answers))


def test_sampled_answers_are_seeded_and_read_exactly(model_and_tok):
    folder, model, tok = model_and_tok
    layers = (1, 3)
    units = unit_vectors(random_vectors(folder, 1), layers)
    gen = GenerationSettings(max_new_tokens=10, temperature=0.9, top_p=0.9, seed=3)
    settings = ScoreSettings(
        layers=layers, mode="natural", generation=gen, generate_batch_size=4, shared_prefill=True
    )
    reader = Scorer(model, tok, units, settings)
    prompts = [reader.tokenize(s).prompt for s in make_samples(6)]
    keys = [f"k{i}" for i in range(len(prompts))]
    proj, answers = reader.natural(prompts, keys)
    assert Scorer(model, tok, units, settings).natural(prompts, keys)[1] == answers
    checked = 0
    for p, a, got in zip(prompts, answers, proj, strict=True):
        if a:
            tf, _ = reader.project([p], [a])
            np.testing.assert_allclose(got, tf[0], rtol=RTOL, atol=1e-6)
            checked += 1
    assert checked >= 3


def test_generation_alone_equals_hf_generate(model_and_tok):
    """`Scorer.natural` (shift's --generate) on the shared decode loop gives HF generate's answers."""
    folder, model, tok = model_and_tok
    layers = (2,)
    units = unit_vectors(random_vectors(folder, 1), layers)
    reader = Scorer(model, tok, units, ScoreSettings(layers=layers))
    prompts = [reader.tokenize(s).prompt for s in make_samples(7)]
    keys = [f"k{i}" for i in range(len(prompts))]
    gen = GenerationSettings(max_new_tokens=9)
    runs = [
        Scorer(
            model,
            tok,
            units,
            ScoreSettings(layers=layers, mode="natural", generation=gen, shared_prefill=shared),
        ).natural(prompts, keys)
        for shared in (True, False)
    ]
    (new_proj, new_answers), (old_proj, old_answers) = runs
    assert new_answers == old_answers
    np.testing.assert_allclose(new_proj, old_proj, rtol=RTOL, atol=1e-6)
