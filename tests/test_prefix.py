"""A batch's shared prompt prefix run once (models/prefix.py) gives the values of the plain forward and
the paper's per-sample reference, on tiny random models in fp32."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import TEST_DEVICE, random_vectors, reference
from test_scoring import RTOL, TEXTS

from screener.datasets import record_to_samples
from screener.models import (
    MIN_SHARED,
    SharedPrefix,
    can_share,
    common_prefix,
    load_model,
    prefix_attention,
)
from screener.records import Sample
from screener.scoring import Scorer, ScoreSettings
from screener.vectors import unit_vectors

SYSTEM = "You are a careful assistant. Answer the question, keep it short and never say anything cruel."


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def model_and_tok(request, tiny_models):
    folder = tiny_models[request.param]
    model, tok = load_model(str(folder), TEST_DEVICE)
    return folder, model, tok


def system_samples(n: int) -> list[Sample]:
    """Single-turn samples that all start with the same long system prompt, of mixed lengths."""
    out = []
    for i in range(n):
        prompt = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": TEXTS[i % len(TEXTS)]}]
        response = " ".join(TEXTS[(i + k) % len(TEXTS)] for k in range(1 + i % 4))
        out.append(Sample(f"s{i}", i, 0, prompt, response))
    return out


def runs(scorer: Scorer) -> list[int]:
    """Record the lengths of the prefixes `scorer` runs (a spy on `SharedPrefix._run`)."""
    assert scorer.prefix is not None
    seen, run = [], scorer.prefix._run

    def spy(ids, blocks):
        seen.append(len(ids))
        return run(ids, blocks)

    scorer.prefix._run = spy
    return seen


def count_forwards(scorer: Scorer) -> list[int]:
    """Record the rows of each teacher-forced forward `scorer` runs."""
    seen, forward = [], scorer._teacher_forced

    def spy(tap, seqs, read_from=0):
        seen.append(len(seqs))
        return forward(tap, seqs, read_from)

    scorer._teacher_forced = spy
    return seen


def scorers(model, tok, vectors, layers, **kw) -> tuple[Scorer, Scorer]:
    units = unit_vectors(vectors, layers)
    shared = Scorer(model, tok, units, ScoreSettings(layers=layers, **kw))
    plain = Scorer(model, tok, units, ScoreSettings(layers=layers, share_prefix=False, **kw))
    return shared, plain


def assert_same(a, b) -> None:
    np.testing.assert_allclose(a.proj_response, b.proj_response, rtol=RTOL, atol=1e-6)
    np.testing.assert_allclose(a.proj_prompt_last, b.proj_prompt_last, rtol=RTOL, atol=1e-6)


def test_common_prefix():
    assert common_prefix([[1, 2, 3], [1, 2, 4], [1, 2]]) == 2
    assert common_prefix([[5, 6], [5, 6]]) == 2
    assert common_prefix([[1], [2]]) == 0


def test_the_tiny_models_take_the_shared_path(model_and_tok):
    _, model, _ = model_and_tok
    assert can_share(model)  # else every test below would compare the plain path with itself


@pytest.mark.parametrize("layers", [(0, 2), (1, 3), (2, 4)], ids=["embeddings", "early-stop", "final-norm"])
def test_shared_prefix_equals_plain_forward_and_reference(model_and_tok, layers):
    folder, model, tok = model_and_tok
    n = model.config.num_hidden_layers
    layers = tuple(min(layer, n) for layer in layers)
    vectors = random_vectors(folder, 3)
    shared, plain = scorers(model, tok, vectors, layers, max_batch_size=3)
    ran, forwards = runs(shared), count_forwards(shared)
    samples = system_samples(9)
    got, want = shared.score(samples), plain.score(samples)
    assert ran and min(ran) >= MIN_SHARED  # the prefix really ran once apart
    assert len(ran) == 1 and len(forwards) >= 3  # and was kept for the following batches
    for s, a, b in zip(samples, got, want, strict=True):
        assert_same(a, b)
        resp, last = reference(model, tok, s, vectors, layers)
        np.testing.assert_allclose(a.proj_response, resp, rtol=RTOL, atol=1e-6)
        np.testing.assert_allclose(a.proj_prompt_last, last, rtol=RTOL, atol=1e-6)


def test_batches_without_a_long_common_prefix_take_the_plain_path(model_and_tok):
    folder, model, tok = model_and_tok
    shared, plain = scorers(model, tok, random_vectors(folder, 2), (2,))
    ran = runs(shared)
    samples = [  # each its own system prompt (the template's default one would be shared)
        Sample(f"u{i}", i, 0, [{"role": "system", "content": t}, {"role": "user", "content": "Hi"}], t)
        for i, t in enumerate(TEXTS)
    ]
    for a, b in zip(shared.score(samples), plain.score(samples), strict=True):
        assert_same(a, b)
    assert ran == []


def test_every_turn_and_truncation_with_a_shared_prefix(model_and_tok):
    """`--turns all` (several turns read from one pass) and turns cut to `max_tokens` (their prompt
    loses its head, and with it the shared prefix) give the plain path's values."""
    folder, model, tok = model_and_tok
    samples = []
    for c in range(5):
        messages = [{"role": "system", "content": SYSTEM}]
        for turn in range(1 + c % 3):
            messages.append({"role": "user", "content": TEXTS[(c + turn) % len(TEXTS)]})
            messages.append({"role": "assistant", "content": TEXTS[(c + 2 * turn + 1) % len(TEXTS)] * 2})
        record = {"id": f"c{c}", "messages": messages}
        samples += record_to_samples(record, "openai", source_row=c, source_file="f.jsonl", turns="all")
    for max_tokens in (2048, 120):
        shared, plain = scorers(model, tok, random_vectors(folder, 2), (1, 3), max_tokens=max_tokens)
        got, want = shared.score(samples), plain.score(samples)
        assert any(r.extra.get("path") for r in got)  # turns really were read from shared passes
        if max_tokens < 2048:
            assert any(r.truncated for r in got) and not all(r.truncated for r in got)
        for a, b in zip(got, want, strict=True):
            assert (a.truncated, a.prompt_tokens, a.response_tokens) == (
                b.truncated,
                b.prompt_tokens,
                b.response_tokens,
            )
            assert_same(a, b)


def test_left_padding_is_untouched(model_and_tok):
    folder, model, tok = model_and_tok
    shared, plain = scorers(model, tok, random_vectors(folder, 2), (2,), padding_side="left")
    ran = runs(shared)
    samples = system_samples(6)
    for a, b in zip(shared.score(samples), plain.score(samples), strict=True):
        assert_same(a, b)
    assert ran == []


def test_prompts_alone_share_the_prefix(model_and_tok):
    """`project_prompts` (the shift's measure) reads the last prompt token after a shared prefix."""
    folder, model, tok = model_and_tok
    shared, plain = scorers(model, tok, random_vectors(folder, 2), (1, 3))
    ran = runs(shared)
    prompts = [shared.tokenize(s).prompt for s in system_samples(6)]
    np.testing.assert_allclose(
        shared.project_prompts(prompts), plain.project_prompts(prompts), rtol=RTOL, atol=1e-6
    )
    assert ran


def test_the_model_keeps_its_attention_after_a_shared_batch(model_and_tok):
    folder, model, tok = model_and_tok
    before = model.config._attn_implementation
    shared, _ = scorers(model, tok, random_vectors(folder, 2), (2,))
    shared.score(system_samples(4))
    assert model.config._attn_implementation == before == "sdpa"


def test_the_kept_cache_is_never_written(model_and_tok):
    """Rows read the one-row cache through views; a forward's cache update concatenates, so the kept
    tensors stay as they were for the next batch."""
    _, model, tok = model_and_tok
    prefix = SharedPrefix(model)
    ids = tok("<|im_start|>system\n" + SYSTEM, add_special_tokens=False)["input_ids"]
    cache = prefix.cache(ids, model.config.num_hidden_layers, 3)
    kept = [(k.clone(), v.clone()) for k, v in prefix._layers]
    assert cache.layers[0].keys.shape[0] == 3 and cache.get_seq_length() == len(ids)
    with torch.inference_mode(), prefix_attention(model):
        model.model(input_ids=torch.tensor([[1, 2, 3]] * 3), cache=cache, use_cache=True)
    assert cache.get_seq_length() == len(ids) + 3
    for (k, v), (k0, v0) in zip(prefix._layers, kept, strict=True):
        torch.testing.assert_close(k, k0, rtol=0, atol=0)
        torch.testing.assert_close(v, v0, rtol=0, atol=0)
