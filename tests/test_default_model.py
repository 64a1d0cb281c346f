"""Slow checks on the real default model (SmolLM2-135M-Instruct from the shipped GGUF)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from conftest import reference

from screener.datasets import packaged_sharegpt, read_samples
from screener.models import DEFAULT_MODEL_NAME, load_model, resolve_model
from screener.records import Sample
from screener.scoring import GenerationSettings, ProjectionTap, Scorer, ScoreSettings
from screener.vectors import unit_vectors

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def default_model():
    ref = resolve_model("default")
    model, tok = load_model(ref.path)
    return ref, model, tok


@pytest.fixture(scope="module")
def real_samples() -> list[Sample]:
    samples = (s for s in read_samples(str(packaged_sharegpt())) if isinstance(s, Sample))
    return [s for s in itertools.islice(samples, 40) if len(s.response) < 1500][:4]


def test_default_model_resolves_to_the_converted_gguf(default_model):
    ref = default_model[0]
    assert (ref.name, ref.num_layers, ref.hidden_size) == (DEFAULT_MODEL_NAME, 30, 576)
    assert len(ref.sha256) == 64 and resolve_model("default") == ref  # cached, same identity


def test_stopping_early_reads_raw_block_output_not_the_normed_one(default_model):
    """The trap: a model cut after block 20 returns a *normed* hidden_states[20]; hooks must not."""
    _, model, tok = default_model
    ids = torch.tensor([tok("The persona vector of a small model.")["input_ids"]])
    with torch.no_grad():
        full = model(ids, output_hidden_states=True).hidden_states
    with ProjectionTap(model, {20: torch.eye(576)}, stop=True) as tap, torch.no_grad():
        try:
            model.model(ids)
        except Exception as e:
            assert type(e).__name__ == "StopForward"
        got = tap.take(20)
    torch.testing.assert_close(got, full[20], rtol=1e-5, atol=1e-4)
    assert (full[20] - full[30]).abs().max() > 1.0  # the final-norm entry really is different


def test_real_model_scores_equal_reference(default_model, real_samples):
    _, model, tok = default_model
    g = torch.Generator().manual_seed(0)
    vectors = [torch.randn(31, 576, generator=g) for _ in range(3)]
    layers = (0, 10, 20, 30)
    res = Scorer(
        model, tok, unit_vectors(vectors, layers), ScoreSettings(layers=layers, max_batch_size=4)
    ).score(real_samples)
    for s, r in zip(real_samples, res, strict=True):
        resp, last = reference(model, tok, s, vectors, layers)
        np.testing.assert_allclose(r.proj_response, resp, rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(r.proj_prompt_last, last, rtol=1e-4, atol=1e-4)


def test_real_model_natural_projection_equals_teacher_forced(default_model, real_samples):
    _, model, tok = default_model
    vectors = [torch.randn(31, 576, generator=torch.Generator().manual_seed(1))]
    gen = GenerationSettings(max_new_tokens=16)
    scorer = Scorer(
        model, tok, unit_vectors(vectors, (20,)), ScoreSettings(layers=(20,), mode="natural", generation=gen)
    )
    res = scorer.score(real_samples[:3])
    compared = 0
    for s, r in zip(real_samples[:3], res, strict=True):
        assert 0 < r.natural_tokens <= 16 and r.natural_response
        prompt = tok(
            tok.apply_chat_template(s.prompt, add_generation_prompt=True, tokenize=False),
            add_special_tokens=False,
        )["input_ids"]
        answer = tok(r.natural_response, add_special_tokens=False)["input_ids"]
        if len(answer) != r.natural_tokens:  # decode→encode need not round-trip; compare on equal tokens only
            continue
        tf, _ = scorer.project([prompt], [answer])
        np.testing.assert_allclose(r.proj_natural, tf[0], rtol=1e-4, atol=1e-4)
        compared += 1
    assert compared >= 1
