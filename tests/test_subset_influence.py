"""benchmarks/subset_influence.py on a tiny random model: its central differences equal autograd's exact
directional derivative, the measure's gradient is zero above its layer, and the weights come back intact."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch
from tiny import make_tokenizer, random_model, tiny_config

# appended, not prepended: the scripts' names (machine, bench, driver) must shadow nothing the suite imports
sys.path.append(str(Path(__file__).resolve().parent.parent / "benchmarks"))
from shift_validation import response_loss
from subset_influence import adapted, alignments, measure_gradient, summed_losses


def setup(seed: int = 0):
    tok = make_tokenizer()
    # float64: the central differences are checked to 0.1%, beyond float32's rounding of these activations
    model = random_model(tiny_config("llama", len(tok), tok.eos_token_id), seed).double().eval()
    rng = np.random.default_rng(seed)
    prompts = [rng.integers(3, 390, n).tolist() for n in (5, 8, 6)]
    data = [
        (rng.integers(3, 390, p).tolist(), rng.integers(3, 390, r).tolist())
        for p, r in ((4, 7), (9, 3), (6, 11))
    ]
    unit = torch.nn.functional.normalize(
        torch.randn(64, generator=torch.Generator().manual_seed(seed), dtype=torch.float64), dim=0
    )
    return tok, model, prompts, data, unit


def test_the_measure_gradient_is_the_projections_and_zero_above_its_layer():
    _, model, prompts, _, unit = setup()
    grad = measure_gradient(model, prompts, 2, unit)
    names = [n for n, p in model.named_parameters() if any(p is q for q in adapted(model))]
    assert len(names) == 4 * 7  # q, k, v, o, gate, up, down of every block
    for name, g in zip(names, grad, strict=True):
        above = (
            int(name.split(".layers.")[1].split(".")[0]) >= 2
        )  # blocks 3 and 4 come after hidden_states[2]
        assert (g.abs().sum() == 0) == above, name
    # along the gradient, the projection moves by the gradient's squared norm to first order
    params = adapted(model)
    squared = float(sum((g.double() ** 2).sum() for g in grad))
    eps = 1e-4 / squared  # a first-order move of 1e-4

    def measure() -> float:
        with torch.no_grad():
            out = [model(input_ids=torch.tensor([p]), output_hidden_states=True) for p in prompts]
        return float(sum(o.hidden_states[2][0, -1] @ unit for o in out) / len(out))

    before = measure()
    with torch.no_grad():
        for p, g in zip(params, grad, strict=True):
            p.add_(g, alpha=eps)
    moved = measure() - before
    assert abs(moved - 1e-4) < 0.01 * 1e-4


def test_alignments_equal_autograd_and_leave_the_weights_as_they_were():
    tok, model, prompts, data, unit = setup(1)
    grad = measure_gradient(model, prompts, 3, unit)
    norm = torch.sqrt(sum((g.double() ** 2).sum() for g in grad))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    got = alignments(model, data, grad, move=0.1, pad_token=tok.pad_token_id, batch=2)
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]), n
    for i, (prompt, response) in enumerate(data):
        model.zero_grad(set_to_none=True)
        loss = response_loss(model, [(prompt, response)], tok.pad_token_id) * len(response)  # summed
        loss.backward()
        exact = -float(
            sum((p.grad.double() * g.double()).sum() for p, g in zip(adapted(model), grad, strict=True))
            / norm
        )
        assert abs(got[i] - exact) <= 1e-3 * max(abs(exact), 1.0), (i, got[i], exact)


def test_summed_losses_are_the_recipes_loss_times_its_tokens_in_any_batch():
    tok, model, _, data, _ = setup(2)
    alone = summed_losses(model, data, tok.pad_token_id, batch=1)
    together = summed_losses(model, data, tok.pad_token_id, batch=3)
    np.testing.assert_allclose(alone, together, rtol=1e-5)
    with torch.no_grad():
        for i, (p, r) in enumerate(data):
            assert abs(alone[i] - float(response_loss(model, [(p, r)], tok.pad_token_id)) * len(r)) < 1e-3
