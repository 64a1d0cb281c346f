"""Style control sets: the loader's errors name the file and field; every vector is scored on every control
(exact share and paired d against plain forwards on a tiny model with a planted direction); the layer rule
holds controls near chance; `screener vectors show` prints them."""

from __future__ import annotations

import argparse
import json

import pytest
import torch
from conftest import plain_hidden_states, tiny_ref

from screener.commands.extract import add_commands
from screener.distributed import Resources
from screener.extract.controls import load_control, load_controls
from screener.extract.layers import LayerStats, choose_specific_layer, paired_d, specific_rule
from screener.extract.pipeline import ExtractSettings, extract_from_examples
from screener.extract.traits import TraitError, load_trait
from screener.models import chat_ids, load_model
from screener.vectors import load_vector

IN_PROCESS = Resources(actors=0, num_cpus=0, num_gpus=0, threads=1)
SETTINGS = ExtractSettings(dtype="float32", batch_tokens=512)
GOOD, BAD = "You are absolutely right, a wonderful idea!", "The quick brown fox jumps over the lazy dog."
TRAIT = {
    "name": "planted",
    "version": 1,
    "description": "A test trait.",
    "instruction": [{"pos": "Be it.", "neg": "Be plain."}],
    "questions": ["How are you?"],
    "eval_questions": ["Any news?"],
    "eval_prompt": "Score it. {question} {answer} Answer 0-100.",
    "examples": [{"question": f"Question {i}?", "positive": GOOD, "negative": BAD} for i in range(3)],
    "eval_examples": [{"question": f"Held {i}?", "positive": GOOD, "negative": BAD} for i in range(3)],
}


def control(name: str, a: str, b: str, n: int = 4) -> dict:
    pairs = [{"question": f"{name} question {i}?", "a": a, "b": b} for i in range(n)]
    return {"name": name, "description": f"{name} test set", "a": "side a", "b": "side b", "pairs": pairs}


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    traits, controls = tmp_path_factory.mktemp("traits"), tmp_path_factory.mktemp("controls")
    (traits / "planted.json").write_text(json.dumps(TRAIT))
    # along: side a is the trait's positive answer (a vector of it ranks a above b in every pair);
    # against: the other way round
    for c in (control("along", GOOD, BAD), control("against", BAD, GOOD, n=3)):
        (controls / f"{c['name']}.json").write_text(json.dumps(c))
    return traits, controls


@pytest.fixture(scope="module")
def extracted(tiny_llama, dirs, tmp_path_factory):
    traits, controls = dirs
    trait = load_trait("planted", traits)
    out = tmp_path_factory.mktemp("out")
    result = extract_from_examples(
        trait,
        tiny_ref(tiny_llama),
        SETTINGS,
        IN_PROCESS,
        out,
        traits_dir=traits,
        controls=load_controls(controls),
    )
    return result


def test_every_vector_is_scored_on_every_control_exactly(tiny_llama, extracted, dirs):
    """Share of pairs with side a above b, and paired d, at every layer, against plain unpadded forwards."""
    model, tok = load_model(str(tiny_llama))
    side = extracted.sidecars["response_avg"]
    vec = load_vector(extracted.paths["response_avg"]).tensor
    units = vec / vec.norm(dim=-1, keepdim=True)
    spec = side["specificity"]
    assert set(spec["controls"]) == {"along", "against"}
    assert spec["control_sets"]["along"]["a"] == "side a" and spec["control_sets"]["against"]["pairs"] == 3
    assert len(spec["control_sets"]["along"]["sha256"]) == 64
    for c in load_controls(dirs[1]).values():

        def proj(question: str, answer: str) -> torch.Tensor:
            p = chat_ids(tok, [{"role": "user", "content": question}])
            r = tok(answer, add_special_tokens=False)["input_ids"]
            return (plain_hidden_states(model, p + r)[:, len(p) :].mean(1) * units).sum(-1)

        a = torch.stack([proj(e.question, e.positive) for e in c.pairs]).double().numpy()
        b = torch.stack([proj(e.question, e.negative) for e in c.pairs]).double().numpy()
        got = spec["controls"][c.name]
        for layer in range(1, a.shape[1]):  # layer 0: the answer tokens' embeddings, the same in every pair
            diff = a[:, layer] - b[:, layer]
            assert got["share_ranked"][layer] == pytest.approx(float((diff > 0).mean()))
            assert got["paired_d"][layer] == pytest.approx(paired_d(a[:, layer], b[:, layer]), rel=1e-2)
        expected = 1.0 if c.name == "along" else 0.0
        assert all(s == expected for s in got["share_ranked"][1:])
    # both controls are out of band at every layer: the rule falls back, and says controls count
    assert side["chosen_layer_how"] == "fallback"
    assert "every style control's pairs" in side["chosen_layer_rule"]


def test_the_layer_rule_holds_controls_near_chance():
    def row(layer, share, d):
        return LayerStats(layer, 0.5, 0.0, 0.0, 0.0, share, d)

    own = [
        row(i, s, d) for i, (s, d) in enumerate([(1, 9), (1, 2), (1, 3), (0.9, 5), (1, 1), (1, 9), (1, 9)])
    ]
    others = {"near": {"share_ranked": [0.5] * 7}}
    assert choose_specific_layer(own, others, 6) == (2, "specific")  # 1.0 at layer 2, d 3
    style = {"hedged": {"share_ranked": [0.5, 0.5, 0.9, 0.5, 0.5, 0.5, 0.5]}}  # out of band at layer 2 only
    assert choose_specific_layer(own, others, 6, controls=style) == (4, "specific")  # 1.0, d 1 beats 0.9
    style["hedged"]["share_ranked"] = [0.0] * 7  # out everywhere: the margin 1 − 1 = 0 at each; d decides
    assert choose_specific_layer(own, others, 6, controls=style) == (2, "fallback")
    assert "control" not in specific_rule() and "every style control" in specific_rule(controls=True)


def test_vectors_show_prints_the_controls(extracted, capsys):
    parser = argparse.ArgumentParser()
    add_commands(parser.add_subparsers())
    args = parser.parse_args(["vectors", "show", str(extracted.paths["response_avg"]), "--per-layer"])
    assert args.func(args) == 0
    out = capsys.readouterr().out
    assert (
        "style controls at layer" in out and "along: side a > side b" in out and "outside 0.25..0.75" in out
    )
    assert "share of each style control's pairs with side a above side b, per layer" in out


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"name": "Bad Name"}, r"'name' must be a lower-case identifier"),
        ({"a": ""}, r"'a' must be a non-empty string"),
        ({"pairs": []}, r"'pairs' must be a non-empty list"),
        ({"pairs": [{"question": "q", "a": "x"}]}, r"pairs\[0\]: 'b' must be a non-empty string"),
        ({"pairs": [{"question": "q", "a": "x", "b": "x"}]}, r"pairs\[0\]: 'a' and 'b' are the same text"),
        ({"pairs": [{"question": "q", "a": "x", "b": "y"}] * 2}, r"'pairs' repeats a question"),
    ],
)
def test_control_errors_name_the_file_and_field(tmp_path, change, message):
    path = tmp_path / "c.json"
    path.write_text(json.dumps({**control("c", "x", "y"), **change}))
    with pytest.raises(TraitError, match=message) as err:
        load_control(path)
    assert str(err.value).startswith(str(path))


def test_load_controls(tmp_path, dirs):
    assert sorted(load_controls(dirs[1])) == ["against", "along"]
    assert load_controls("none", none_ok=True) == {}
    with pytest.raises(TraitError, match="is not a folder"):
        load_controls(tmp_path / "missing")
    (tmp_path / "one.json").write_text(json.dumps(control("dup", "x", "y")))
    (tmp_path / "two.json").write_text(json.dumps(control("dup", "x", "y")))
    with pytest.raises(TraitError, match="'dup' is also used by"):
        load_controls(tmp_path)


def test_the_builtin_control_sets():
    """Issue 21's seven shipped sets, at least 45 pairs each; side `a` is the first nuisance the name says."""
    controls = load_controls()
    names = {"direct_hedged", "long_short", "refusal_compliance", "narrative_list", "formal_casual"}
    assert set(controls) == names | {"confident_uncertain", "emotive_plain"}
    for name, control in controls.items():
        assert len(control.pairs) >= 45, name
        assert (control.a, control.b) == tuple(name.split("_")), name
