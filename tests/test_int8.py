"""`--dtype int8` (models/int8.py): the int8 linear layer against the float math it stands for, a quantised
tiny model's scores against fp32 (close, never equal), and its hooks reading the right layers."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import random_vectors, reference, tiny_ref
from test_scoring import make_samples

import screener
from screener.errors import UserError
from screener.models import INT8, Int8Linear, is_int8, load_model, pick_dtype, weight_dtype
from screener.records import Scored
from screener.scoring import ProjectionTap, Scorer, ScoreSettings
from screener.vectors import unit_vectors
from screener.work import Work


def test_int8_linear_is_the_quantised_float_product():
    torch.manual_seed(0)
    lin = torch.nn.Linear(48, 40)
    x = torch.randn(3, 5, 48) * 4
    q = Int8Linear(lin)
    # the same scheme in float64: per-token inputs and per-channel weights rounded to 127 steps
    w = lin.weight.double()
    ws = w.abs().amax(dim=1) / 127
    xs = x.double().abs().amax(dim=-1, keepdim=True) / 127
    expected = ((x.double() / xs).round() @ (w / ws[:, None]).round().t()) * xs * ws + lin.bias.double()
    got = q(x)
    assert got.shape == (3, 5, 40) and got.dtype == torch.float32
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-4)
    exact = lin(x).detach()
    error = ((got - exact).norm() / exact.norm()).item()
    assert 0 < error < 0.02  # really quantised, and close
    assert q.weight_t.dtype == torch.int8 and not q.weight_t.requires_grad


@pytest.fixture(scope="module")
def models(tiny_llama):
    fp32, tok = load_model(str(tiny_llama))
    int8, _ = load_model(str(tiny_llama), "cpu", INT8)
    return fp32, int8, tok


def test_only_the_decoder_blocks_are_quantised(models):
    fp32, int8, _ = models
    assert is_int8(int8) and not is_int8(fp32)
    assert (weight_dtype(int8), weight_dtype(fp32)) == (INT8, torch.float32)
    layers = fp32.config.num_hidden_layers
    linears = [m for m in int8.model.layers.modules() if isinstance(m, Int8Linear)]
    assert len(linears) == 7 * layers  # q, k, v, o, gate, up, down
    assert not any(isinstance(m, torch.nn.Linear) for m in int8.model.layers.modules())
    assert isinstance(int8.lm_head, torch.nn.Linear) and int8.lm_head.weight.dtype == torch.float32
    assert int8.model.embed_tokens.weight.dtype == torch.float32


def test_hooks_read_the_quantised_models_hidden_states(models):
    """The tap reads hidden_states[L] of the int8 model itself, and each layer is the fp32 model's same
    layer (nearer to it than to the layers beside it): the blocks were swapped in place, in order."""
    fp32, int8, tok = models
    n = int8.config.num_hidden_layers
    ids = torch.tensor([tok("Hello there, evil fox. The quick brown dog.")["input_ids"]])
    with torch.no_grad():
        hs8 = int8(ids, output_hidden_states=True).hidden_states
        hs32 = fp32(ids, output_hidden_states=True).hidden_states
    eye = torch.eye(int8.config.hidden_size)
    for layer in range(n + 1):
        with ProjectionTap(int8, {layer: eye}, stop=True) as tap, torch.no_grad():
            try:
                int8.model(ids)
            except Exception as e:
                assert type(e).__name__ == "StopForward"
            got = tap.take(layer)
        torch.testing.assert_close(got, hs8[layer], rtol=1e-5, atol=1e-5)
        far = [(hs8[layer] - hs32[k]).norm() for k in range(n + 1) if k != layer]
        assert (hs8[layer] - hs32[layer]).norm() < min(far)
        if layer > 0:
            assert not torch.equal(hs8[layer], hs32[layer])


def test_int8_scores_are_close_to_fp32_but_not_equal(models, tiny_llama):
    fp32, int8, tok = models
    layers = (1, 2, 3)
    vectors = random_vectors(tiny_llama, 3)
    units = unit_vectors(vectors, layers)
    samples = make_samples(24)
    got = {}
    for name, model in (("fp32", fp32), ("int8", int8)):
        results = Scorer(model, tok, units, ScoreSettings(layers=layers, batch_tokens=4096)).score(samples)
        assert all(isinstance(r, Scored) for r in results)
        got[name] = np.stack([r.proj_response - r.proj_prompt_last for r in results])  # [n, layer, trait]
    # the scorer on the int8 model is exact against the plain forward of the same int8 model
    resp, last = reference(int8, tok, samples[5], vectors, layers)
    np.testing.assert_allclose(got["int8"][5], resp - last, rtol=1e-4, atol=1e-5)
    a, b = got["fp32"], got["int8"]
    assert np.abs(a - b).max() > 1e-4  # quantisation happened
    for li in range(len(layers)):
        for k in range(len(vectors)):
            r = np.corrcoef(a[:, li, k], b[:, li, k])[0, 1]
            assert r > 0.99, (layers[li], k, r)


def test_int8_is_a_cpu_dtype(tiny_llama, vector_file, tmp_path):
    cpu = torch.device("cpu")
    assert pick_dtype("int8", cpu) == INT8 and Work.resolve("cpu", "int8").dtype_name == "int8"
    with pytest.raises(UserError, match="CPUs only"):
        pick_dtype("int8", torch.device("cuda"))
    work = Work.resolve("cpu", "int8")
    assert is_int8(work.load(tiny_ref(tiny_llama))[0])
    run = screener.screen(
        [{"messages": [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hello."}]}],
        model=str(tiny_llama),
        vectors=[f"a={vector_file}"],
        layers=[1],
        dtype="int8",
        db=tmp_path / "s.duckdb",
    )
    assert run.info.settings["dtype"] == "int8"
    assert run.scores("a").height == 1
