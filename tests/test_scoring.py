"""The scorer against a plain per-sample `output_hidden_states=True` forward pass, in fp32."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import TEST_DEVICE, plain_hidden_states, random_vectors, reference

from screener.choices import MIN_MAX_TOKENS
from screener.errors import UserError
from screener.models import chat_ids, load_model
from screener.records import Reject, Sample, Scored
from screener.scoring import (
    GenerationSettings,
    ProjectionTap,
    Scorer,
    ScoreSettings,
    tokenize,
    truncate,
)
from screener.vectors import unit_vectors

RTOL = 1e-4

TEXTS = [
    "Hello, how can I help you today?",
    "The quick brown fox jumps over the lazy dog. " * 3,
    "Evil plans!",
    "I think that is a wonderful idea, you are absolutely right! Here is a short answer with numbers 12345.",
    "ok",
]


def make_samples(n: int) -> list[Sample]:
    out = []
    for i in range(n):
        prompt = [{"role": "user", "content": TEXTS[i % len(TEXTS)]}]
        if i % 3 == 0:
            prompt = [{"role": "system", "content": "Be cruel."}, *prompt]
        if i % 4 == 1:  # multi-turn prompt
            prompt = [
                *prompt,
                {"role": "assistant", "content": "Sure."},
                {"role": "user", "content": "More?"},
            ]
        response = " ".join(TEXTS[(i + k) % len(TEXTS)] for k in range(1 + i % 4))
        out.append(Sample(f"s{i}", i, 0, prompt, response))
    return out


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def model_and_tok(request, tiny_models):
    folder = tiny_models[request.param]
    model, tok = load_model(str(folder), TEST_DEVICE)
    return folder, model, tok


def test_layer_tap_follows_hidden_states_convention(model_and_tok):
    """Layer L is hidden_states[L]: 0 = embeddings, 1..n-1 = raw block outputs, n = after the final norm."""
    _, model, tok = model_and_tok
    n = model.config.num_hidden_layers
    ids = torch.tensor([tok("Hello there, evil fox.")["input_ids"]], device=model.device)
    with torch.no_grad():
        hs = model(ids, output_hidden_states=True).hidden_states
    eye = torch.eye(model.config.hidden_size, device=model.device)
    for layer in range(n + 1):  # identity "vectors" make the tap return the hidden state itself
        with ProjectionTap(model, {layer: eye}, stop=False) as tap, torch.no_grad():
            model(ids)
            got = tap.take(layer)
        torch.testing.assert_close(got, hs[layer], rtol=1e-5, atol=1e-5)
    # a stopped pass still sees the raw block output, never a normed one
    with ProjectionTap(model, {2: eye}, stop=True) as tap, torch.no_grad():
        try:
            model.model(ids)
        except Exception as e:
            assert type(e).__name__ == "StopForward"
        torch.testing.assert_close(tap.take(2), hs[2], rtol=1e-5, atol=1e-5)


def test_scores_equal_reference_every_layer(model_and_tok):
    folder, model, tok = model_and_tok
    n = model.config.num_hidden_layers
    layers = tuple(range(n + 1))
    vectors = random_vectors(folder, 3)
    scorer = Scorer(model, tok, unit_vectors(vectors, layers), ScoreSettings(layers=layers))
    samples = make_samples(7)
    results = scorer.score(samples)
    for s, r in zip(samples, results, strict=True):
        assert isinstance(r, Scored) and not r.truncated
        resp, last = reference(model, tok, s, vectors, layers)
        np.testing.assert_allclose(r.proj_response, resp, rtol=RTOL, atol=1e-6)
        np.testing.assert_allclose(r.proj_prompt_last, last, rtol=RTOL, atol=1e-6)
        assert r.response_tokens == len(tok(s.response, add_special_tokens=False)["input_ids"])


@pytest.mark.parametrize("side", ["left", "right"])
def test_batch_size_and_padding_do_not_change_results(model_and_tok, side):
    folder, model, tok = model_and_tok
    vectors = random_vectors(folder, 2)
    layers = (1, 3)
    samples = make_samples(16)
    one = Scorer(
        model, tok, unit_vectors(vectors, layers), ScoreSettings(layers=layers, max_batch_size=1)
    ).score(samples)
    many = Scorer(
        model,
        tok,
        unit_vectors(vectors, layers),
        ScoreSettings(layers=layers, max_batch_size=16, padding_side=side),
    )
    big = many.score(samples)
    lengths = {r.prompt_tokens + r.response_tokens for r in big}
    assert len(lengths) > 5  # mixed lengths really were padded together
    for a, b in zip(one, big, strict=True):
        np.testing.assert_allclose(b.proj_response, a.proj_response, rtol=RTOL, atol=1e-6)
        np.testing.assert_allclose(b.proj_prompt_last, a.proj_prompt_last, rtol=RTOL, atol=1e-6)


def test_natural_projection_equals_teacher_forced(model_and_tok):
    """proj_natural comes from the generation pass; it must equal a forward pass over the same tokens."""
    folder, model, tok = model_and_tok
    vectors = random_vectors(folder, 2)
    layers = (0, 2, model.config.num_hidden_layers)
    gen = GenerationSettings(max_new_tokens=12)
    scorer = Scorer(
        model,
        tok,
        unit_vectors(vectors, layers),
        ScoreSettings(layers=layers, mode="natural", generation=gen),
    )
    samples = make_samples(6)
    results = scorer.score(samples)
    checked = 0
    for s, r in zip(samples, results, strict=True):
        assert r.natural_tokens is not None and r.natural_tokens <= 12
        prompt = tok(
            tok.apply_chat_template(s.prompt, add_generation_prompt=True, tokenize=False),
            add_special_tokens=False,
        )["input_ids"]
        # regenerate one at a time, greedily, with plain generate: batching must not change the answer
        with torch.no_grad():
            plain = model.generate(
                torch.tensor([prompt], device=model.device),
                max_new_tokens=12,
                do_sample=False,
                pad_token_id=tok.pad_token_id,
                eos_token_id=tok.eos_token_id,
            )
        answer = plain[0, len(prompt) :].tolist()
        if tok.eos_token_id in answer:
            answer = answer[: answer.index(tok.eos_token_id)]
        assert r.natural_tokens == len(answer)
        assert r.natural_response == tok.decode(answer, skip_special_tokens=True)
        if not answer:
            assert np.isnan(r.proj_natural).all()
            continue
        tf_resp, _ = scorer.project([prompt], [answer])
        np.testing.assert_allclose(r.proj_natural, tf_resp[0], rtol=RTOL, atol=1e-6)
        checked += 1
    assert checked >= 3


def test_truncation_is_flagged_and_keeps_the_generation_prompt(model_and_tok):
    folder, model, tok = model_and_tok
    vectors = random_vectors(folder, 1)
    long = Sample("long", 0, 0, [{"role": "user", "content": TEXTS[1] * 3}], TEXTS[3] * 5)
    short = make_samples(1)[0]
    res = Scorer(model, tok, unit_vectors(vectors, (2,)), ScoreSettings(layers=(2,), max_tokens=64)).score(
        [long, short]
    )
    assert res[0].truncated and res[0].prompt_tokens + res[0].response_tokens == 64
    assert not res[1].truncated


def test_truncate_rule():
    p, r = list(range(10)), list(range(100, 130))
    assert truncate(p, r, 100) == (p, r, False)
    assert truncate(p, r, 20) == (p, r[:10], True)
    p2, r2, cut = truncate(list(range(50)), r, 20)  # long prompt: keep its end and a quarter for the response
    assert cut and p2 == list(range(35, 50)) and r2 == r[:5]


class CountingTokenizer:
    """The tokenizer, noting the length of every text it tokenises."""

    def __init__(self, tok):
        self.tok, self.lengths = tok, []

    def __call__(self, text, **kw):
        self.lengths.append(len(text))
        return self.tok(text, **kw)

    def __getattr__(self, name):
        return getattr(self.tok, name)


def test_a_long_message_is_cut_before_it_is_tokenised_with_the_same_ids(model_and_tok):
    """A 30 MB message was tokenised whole (~150 bytes of memory per byte) before truncation kept a few
    thousand of its tokens: now only a piece of it is, and the kept ids are the whole text's."""
    _, _, tok = model_and_tok
    long = " ".join(TEXTS) * 300  # ~100k characters
    samples = [
        Sample("response", 0, 0, [{"role": "user", "content": "Hi"}], long),
        Sample(
            "prompt",
            1,
            0,
            [
                {"role": "user", "content": long},
                {"role": "assistant", "content": "ok"},
                {"role": "user", "content": "And?"},
            ],
            "Fine.",
        ),
        Sample("both", 2, 0, [{"role": "system", "content": long}, {"role": "user", "content": long}], long),
    ]
    for max_tokens in (64, 300):
        for sample in samples:
            counting = CountingTokenizer(tok)
            got = tokenize(counting, sample, max_tokens)
            whole = truncate(
                chat_ids(tok, sample.prompt),
                tok(sample.response, add_special_tokens=False)["input_ids"],
                max_tokens,
            )
            assert (got.prompt, got.response, got.truncated) == whole
            assert max(counting.lengths) < 50 * max_tokens < len(long)


def test_unscorable_samples_are_rejects_not_crashes(model_and_tok):
    folder, model, tok = model_and_tok
    scorer = Scorer(model, tok, unit_vectors(random_vectors(folder, 1), (1,)), ScoreSettings(layers=(1,)))
    bad_template = Sample("t", 1, 0, [{"role": "user", "content": None}], "fine")  # type: ignore[dict-item]
    res = scorer.score([make_samples(1)[0], bad_template])
    assert isinstance(res[0], Scored)
    assert isinstance(res[1], Reject) and res[1].reason.startswith("prompt:")


def test_a_budget_too_small_to_score_is_refused_never_a_nan(model_and_tok):
    """A budget below the command line's minimum is refused by the settings themselves (the Python API
    too): at the minimum, a sample whose prompt is longer than the budget still keeps response tokens, so
    no mean over no token (NaN) reaches the store."""
    folder, model, tok = model_and_tok
    units = unit_vectors(random_vectors(folder, 1), (1,))
    long_prompt = Sample("p", 0, 0, [{"role": "user", "content": TEXTS[1] * 3}], TEXTS[3])
    settings = ScoreSettings(layers=(1,), max_tokens=MIN_MAX_TOKENS)
    ok = Scorer(model, tok, units, settings).score([long_prompt])[0]
    assert isinstance(ok, Scored) and ok.truncated and ok.response_tokens == MIN_MAX_TOKENS // 4
    assert np.isfinite(ok.proj_response).all() and np.isfinite(ok.proj_prompt_last).all()
    for bad in (MIN_MAX_TOKENS - 1, 3, 1, 0, -5):
        with pytest.raises(UserError, match=f"--max-tokens takes a whole number of at least 16.*not {bad}"):
            ScoreSettings(layers=(1,), max_tokens=bad)


def test_non_finite_projections_are_rejects(model_and_tok):
    folder, model, tok = model_and_tok
    units = unit_vectors(random_vectors(folder, 1), (1,))
    scorer = Scorer(model, tok, units, ScoreSettings(layers=(1,)))
    scorer.units[1] = torch.full_like(scorer.units[1], float("inf"))  # as an fp16 overflow would
    res = scorer.score(make_samples(2))
    assert all(isinstance(r, Reject) and "not finite" in r.reason for r in res)


def test_length_batches_respect_budget():
    lengths = [5, 100, 7, 50, 50, 3, 99]
    batches = list(Scorer._batches(lengths, lambda: (200, 3)))
    assert sorted(i for b in batches for i in b) == list(range(7))
    for b in batches:
        assert len(b) <= 3 and max(lengths[i] for i in b) * len(b) <= 200


@pytest.mark.parametrize("side", ["right", "left"])
def test_activations_match_plain_hidden_states(model_and_tok, side):
    """`Scorer.means`, extraction's reader: per layer the response mean, the prompt mean and the last prompt
    token of `hidden_states[L]`, whatever the batching and padding."""
    _, model, tok = model_and_tok
    n = model.config.num_hidden_layers
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 300, (k,), generator=g).tolist() for k in (5, 9, 3)]
    responses = [torch.randint(3, 300, (k,), generator=g).tolist() for k in (4, 1, 7)]
    for budget in (8192, 12):  # one padded batch, then one read a batch
        settings = ScoreSettings(layers=tuple(range(n + 1)), batch_tokens=budget, padding_side=side)
        acts = Scorer(model, tok, None, settings).means(prompts, responses)
        assert acts.shape == (3, 3, n + 1, 64) and acts.dtype == torch.float32 and acts.device.type == "cpu"
        for b, (p, r) in enumerate(zip(prompts, responses, strict=True)):
            hs = plain_hidden_states(model, p + r).cpu()
            torch.testing.assert_close(acts[b, 0], hs[:, len(p) :].mean(dim=1), atol=1e-4, rtol=1e-4)
            torch.testing.assert_close(acts[b, 1], hs[:, : len(p)].mean(dim=1), atol=1e-4, rtol=1e-4)
            torch.testing.assert_close(acts[b, 2], hs[:, len(p) - 1], atol=1e-4, rtol=1e-4)


def test_zero_vector_is_refused(tiny_llama):
    model, tok = load_model(str(tiny_llama))
    v = random_vectors(tiny_llama, 1)[0]
    v[2] = 0
    with pytest.raises(ValueError, match="zero at layer 2"):
        Scorer(model, tok, unit_vectors([v], (2,)), ScoreSettings(layers=(2,)))


# ---- every assistant turn from one pass per conversation ------------------------------------------------


def conversations() -> list[Sample]:
    """Samples of every assistant turn of a few conversations (1-4 turns, with and without a system
    message), as the reader makes them under --turns all."""
    from screener.datasets import record_to_samples

    out = []
    for c in range(4):
        messages = [{"role": "system", "content": "Be cruel."}] if c % 2 else []
        for turn in range(1 + c):
            messages.append({"role": "user", "content": TEXTS[(c + turn) % len(TEXTS)]})
            messages.append(
                {"role": "assistant", "content": TEXTS[(c + 2 * turn + 1) % len(TEXTS)] * (1 + turn)}
            )
        record = {"id": f"c{c}", "messages": messages}
        out += record_to_samples(record, "openai", source_row=c, source_file="f.jsonl", turns="all")
    return out


@pytest.mark.parametrize("side", ["left", "right"])
def test_all_turns_from_one_pass_equal_per_turn_reference(model_and_tok, side):
    from screener.scoring import ONE_PASS

    folder, model, tok = model_and_tok
    vectors, layers = random_vectors(folder, 2), (0, 2, model.config.num_hidden_layers)
    samples = conversations()
    scorer = Scorer(
        model, tok, unit_vectors(vectors, layers), ScoreSettings(layers=layers, padding_side=side)
    )
    results = scorer.score(samples)
    assert len(samples) == 10
    for s, r in zip(samples, results, strict=True):
        resp, last = reference(model, tok, s, vectors, layers)
        np.testing.assert_allclose(r.proj_response, resp, rtol=RTOL, atol=1e-6)
        np.testing.assert_allclose(r.proj_prompt_last, last, rtol=RTOL, atol=1e-6)
        multi = s.source_row > 0
        assert r.extra.get("path") == (ONE_PASS if multi else None)


def test_a_template_that_rewrites_earlier_turns_falls_back_to_a_pass_per_turn(model_and_tok):
    import copy

    from screener.scoring import PER_TURN

    folder, model, tok = model_and_tok
    tok = copy.deepcopy(tok)
    # the system prompt counts the messages: every prefix renders differently, so no turn is a prefix
    tok.chat_template = (
        "{{ '<|im_start|>system\nturns: ' + (messages|length|string) + '<|im_end|>\n' }}"
        "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}"
        "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
    )
    vectors, layers = random_vectors(folder, 1), (1, 3)
    samples = conversations()
    results = Scorer(model, tok, unit_vectors(vectors, layers), ScoreSettings(layers=layers)).score(samples)
    for s, r in zip(samples, results, strict=True):
        resp, last = reference(model, tok, s, vectors, layers)
        np.testing.assert_allclose(r.proj_response, resp, rtol=RTOL, atol=1e-6)
        np.testing.assert_allclose(r.proj_prompt_last, last, rtol=RTOL, atol=1e-6)
        assert r.extra.get("path") == (PER_TURN if s.source_row > 0 else None)


def test_turns_past_max_tokens_keep_per_turn_truncation(model_and_tok):
    from screener.scoring import WINDOWS

    folder, model, tok = model_and_tok
    vectors, layers = random_vectors(folder, 2), (2,)
    samples = conversations()
    units = unit_vectors(vectors, layers)
    shared = Scorer(model, tok, units, ScoreSettings(layers=layers, max_tokens=96)).score(samples)
    per_turn = Scorer(model, tok, units, ScoreSettings(layers=layers, max_tokens=96, share_passes=False))
    for a, b in zip(shared, per_turn.score(samples), strict=True):
        assert (a.truncated, a.prompt_tokens, a.response_tokens) == (
            b.truncated,
            b.prompt_tokens,
            b.response_tokens,
        )
        np.testing.assert_allclose(a.proj_response, b.proj_response, rtol=RTOL, atol=1e-6)
        np.testing.assert_allclose(a.proj_prompt_last, b.proj_prompt_last, rtol=RTOL, atol=1e-6)
    truncated = {s.source_row for s, r in zip(samples, shared, strict=True) if r.truncated}
    whole = {s.source_row for s, r in zip(samples, shared, strict=True) if not r.truncated and s.source_row}
    assert truncated & whole  # a conversation whose early turns fit and later ones do not
    for s, r in zip(samples, shared, strict=True):
        if s.source_row in truncated & whole:
            assert r.extra["path"] == WINDOWS


@pytest.mark.parametrize("max_tokens", [2048, 96, 40])
def test_prepare_tokenises_as_each_turn_apart(model_and_tok, max_tokens):
    """`Scorer.prepare` tokenises a conversation's prompts once (`tokenize_all`): the ids, lengths,
    truncation and passes are those of each turn tokenised apart (`tokenize`), so the values are too."""
    from screener.scoring import plan_passes

    folder, model, tok = model_and_tok
    layers = (2,)
    scorer = Scorer(
        model,
        tok,
        unit_vectors(random_vectors(folder, 1), layers),
        ScoreSettings(layers=layers, max_tokens=max_tokens),
    )
    samples = conversations()[::-1]  # turns out of order: the batch is grouped by conversation
    prepared = scorer.prepare(samples)
    apart = [tokenize(tok, s, max_tokens, i) for i, s in enumerate(samples)]
    assert prepared.results == [None] * len(samples)
    assert [(t.index, t.prompt, t.response, t.truncated) for t in prepared.toks] == [
        (t.index, t.prompt, t.response, t.truncated) for t in apart
    ]
    reference_plan = plan_passes(apart)
    assert [(p.ids, [t.index for t in p.reads]) for p in prepared.plan.passes] == [
        (p.ids, [t.index for t in p.reads]) for p in reference_plan.passes
    ]
    assert prepared.plan.paths == reference_plan.paths
