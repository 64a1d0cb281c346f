"""Extraction from labelled examples: exact mean differences on a tiny random model, every input format and
label style, errors that name the file and row, the specificity matrix with planted directions, generated
answers read after the question alone, and the orthogonalisation against other traits."""

from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from conftest import plain_hidden_states, tiny_ref

from screener import cli
from screener.commands.extract import add_commands
from screener.distributed import Resources
from screener.extract.examples import ExampleError, parse_label, read_example_files
from screener.extract.judges import NoJudge
from screener.extract.layers import LayerStats, choose_specific_layer, cross_trait, specific_rule
from screener.extract.pipeline import (
    ExtractError,
    ExtractSettings,
    GenerationStage,
    batched,
    build_items,
    extract,
    extract_from_examples,
    orthogonal_traits,
    orthogonalize,
    pair_up,
)
from screener.extract.traits import TraitError, list_traits, load_trait
from screener.models import chat_ids, load_model
from screener.vectors import load_vector

# one torch thread: tiny models gain nothing from more, and on a busy 2-core machine two threads made
# each tiny forward 8x slower (measured: an extraction took 43 s with 2 threads, 5 s with 1)
IN_PROCESS = Resources(actors=0, num_cpus=0, num_gpus=0, threads=1)
SETTINGS = ExtractSettings(dtype="float32", batch_tokens=512)
BASE_TRAIT = {
    "version": 1,
    "description": "A test trait.",
    "instruction": [{"pos": "Be it.", "neg": "Be plain."}],
    "questions": ["How are you?", "What is a fox?"],
    "eval_questions": ["Any news?"],
    "eval_prompt": "Score it. {question} {answer} Answer 0-100.",
}


def pair(question: str, positive: str, negative: str) -> dict:
    return {"question": question, "positive": positive, "negative": negative}


# own: every pair contrasts the same two answers; mirror: another trait whose held-out pairs are own's
# answers (a vector of own must rank them as it ranks its own); blind: held-out pairs whose two answers are
# the same text, which no vector can tell apart
GOOD, BAD = "You are absolutely right, a wonderful idea!", "The quick brown fox jumps over the lazy dog."
TRAITS = {
    "planted": {
        "examples": [pair(f"Question {i} about dogs?", GOOD, BAD) for i in range(3)],
        "eval_examples": [pair(f"Held-out question {i}?", GOOD, BAD) for i in range(3)],
    },
    "mirror": {
        "examples": [pair("Tell me about foxes.", BAD, GOOD)],
        "eval_examples": [pair(f"Mirror question {i}?", GOOD, BAD) for i in range(3)],
    },
    "blind": {
        "examples": [pair("Tell me about cats.", BAD, GOOD)],
        "eval_examples": [pair(f"Blind question {i}?", GOOD, GOOD) for i in range(3)],
    },
}


@pytest.fixture(scope="module")
def traits_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("traits")
    for name, extra in TRAITS.items():
        (folder / f"{name}.json").write_text(json.dumps({**BASE_TRAIT, "name": name, **extra}))
    return folder


@pytest.fixture(scope="module")
def tiny(tiny_llama):
    return load_model(str(tiny_llama))


def features(model, tok, prompt: list[dict], response: str) -> torch.Tensor:
    """`[3, L+1, H]` response_avg, prompt_avg, prompt_last from one plain unpadded forward."""
    p = chat_ids(tok, prompt)
    r = tok(response, add_special_tokens=False)["input_ids"]
    hs = plain_hidden_states(model, p + r)
    return torch.stack([hs[:, len(p) :].mean(1), hs[:, : len(p)].mean(1), hs[:, len(p) - 1]])


def user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


# -- exact math ---------------------------------------------------------------------------------------


def test_labelled_examples_give_exact_mean_differences(tiny_llama, tiny, traits_dir, tmp_path):
    """Unpaired labelled examples with unequal class sizes: every method is the difference of class means."""
    model, tok = tiny
    rows = [
        ({"messages": [*user("Is it good?"), {"role": "assistant", "content": GOOD}]}, 1),
        (
            {
                "messages": [
                    {"role": "system", "content": "Be brief."},
                    *user("Hi"),
                    {"role": "assistant", "content": "Hello there, how can I help?"},
                ]
            },
            1,
        ),
        ({"prompt": "Tell me a fact.", "response": "Foxes are quick and brown."}, 1),
        ({"prompt": "What now?", "response": BAD}, 0),
        ({"prompt": "Numbers?", "response": "Some numbers 12345."}, 0),
    ]
    path = tmp_path / "labelled.jsonl"
    path.write_text("".join(json.dumps({**r, "label": label}) + "\n" for r, label in rows))
    trait = load_trait("planted", traits_dir)
    result = extract_from_examples(
        trait, tiny_ref(tiny_llama), SETTINGS, IN_PROCESS, tmp_path / "out", files=[str(path)],
        traits_dir=traits_dir,
    )  # fmt: skip

    def prompt_of(r: dict) -> list[dict]:
        return r["messages"][:-1] if "messages" in r else user(r["prompt"])

    def response_of(r: dict) -> str:
        return r["messages"][-1]["content"] if "messages" in r else r["response"]

    feats = [(features(model, tok, prompt_of(r), response_of(r)), label) for r, label in rows]
    expected = torch.stack([f for f, y in feats if y]).mean(0) - torch.stack(
        [f for f, y in feats if not y]
    ).mean(0)
    assert set(result.paths) == {"response_avg", "prompt_avg", "prompt_last"}
    for m, method in enumerate(("response_avg", "prompt_avg", "prompt_last")):
        torch.testing.assert_close(
            load_vector(result.paths[method]).tensor, expected[m], atol=1e-4, rtol=1e-4
        )
    side = result.sidecars["response_avg"]
    assert side["extraction_method"] == "examples" and "judge" not in side
    assert side["examples"]["positive"] == 3 and side["examples"]["negative"] == 2
    assert side["examples"]["files"][0]["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert side["examples"]["files"][0]["records"] == 5 and not side["examples"]["paired"]


def test_paired_examples_write_response_avg_only_and_read_after_the_question(
    tiny_llama, tiny, traits_dir, tmp_path
):
    """The trait file's own pairs (no FILE): each answer after its question alone; the prompt methods are
    zero by construction, so they are not written, and the sidecar says why."""
    model, tok = tiny
    trait = load_trait("planted", traits_dir)
    out = tmp_path / "out"
    result = extract_from_examples(
        trait, tiny_ref(tiny_llama), SETTINGS, IN_PROCESS, out, traits_dir=traits_dir
    )
    assert list(result.paths) == ["response_avg"]
    assert sorted(p.name for p in out.glob("*.pt")) == ["planted_response_avg_diff.pt"]
    side = result.sidecars["response_avg"]
    assert set(side["methods_not_written"]) == {"prompt_avg", "prompt_last"}
    assert side["examples"]["source"] == "trait file examples" and side["examples"]["pairs"] == 3
    pos = torch.stack([features(model, tok, user(e.question), e.positive)[0] for e in trait.examples])
    neg = torch.stack([features(model, tok, user(e.question), e.negative)[0] for e in trait.examples])
    torch.testing.assert_close(load_vector(result.paths["response_avg"]).tensor, (pos - neg).mean(0),
                               atol=1e-4, rtol=1e-4)  # fmt: skip


def test_generated_answers_read_after_the_question_alone(tiny_llama, tiny, traits_dir, tmp_path):
    """--read-context question: the same generated answers, read after the question without the system
    prompt they were generated under; exact against plain passes."""
    model, tok = tiny
    trait = load_trait("planted", traits_dir)
    settings = ExtractSettings(samples=1, max_new_tokens=4, temperature=1.0, batch_size=8, dtype="float32",
                               read_context="question")  # fmt: skip
    result = extract(
        trait, tiny_ref(tiny_llama), NoJudge(), settings, IN_PROCESS, tmp_path, traits_dir=traits_dir
    )
    assert list(result.paths) == ["response_avg"]
    side = result.sidecars["response_avg"]
    assert side["extraction_method"] == "generation_question_only"
    assert side["eval_examples"]["source"] == "trait file eval_examples"
    stage = GenerationStage(tiny_ref(tiny_llama), settings)
    stage.setup()
    # held-out examples are written, so only extraction answers are generated
    items = [it for chunk in batched(build_items(trait, 1, ("extract",)), 8) for it in stage.process(chunk)]
    kept, _ = pair_up(items, judged=False, settings=settings)
    assert len(kept) == side["pairs_kept"] == 2
    assert all(it.question_ids == chat_ids(tok, user(it.text)) != it.prompt_ids for it in items)

    def read(it) -> torch.Tensor:
        hs = plain_hidden_states(model, it.question_ids + it.response_ids)
        return hs[:, len(it.question_ids) :].mean(1)

    expected = torch.stack([read(p) - read(n) for p, n in kept]).mean(0)
    torch.testing.assert_close(
        load_vector(result.paths["response_avg"]).tensor, expected, atol=1e-4, rtol=1e-4
    )


# -- the specificity matrix ------------------------------------------------------------------------------


def test_specificity_matrix_with_planted_directions(tiny_llama, traits_dir, tmp_path):
    """A vector ranks another trait's pairs exactly as its own when they are its own answers (mirror), and
    at chance when the two answers of every pair are the same text (blind), at every layer."""
    trait = load_trait("planted", traits_dir)
    result = extract_from_examples(
        trait, tiny_ref(tiny_llama), SETTINGS, IN_PROCESS, tmp_path, traits_dir=traits_dir
    )
    side = result.sidecars["response_avg"]
    own = side["layer_report"]
    matrix = side["specificity"]["traits"]
    assert {"mirror", "blind"} <= set(matrix) and "planted" not in matrix
    assert {name for name, _ in list_traits()} <= set(matrix)  # every built-in is scored too
    for layer in range(1, 5):  # layer 0 reads the embeddings of the answer tokens: the same for every pair
        assert own[layer]["share_ranked"] == 1.0
        assert matrix["mirror"]["share_ranked"][layer] == 1.0
        assert matrix["blind"]["share_ranked"][layer] == 0.5 and matrix["blind"]["paired_d"][layer] == 0.0
    assert side["chosen_layer_how"] == "fallback"  # mirror is never near chance
    assert "near chance" in side["chosen_layer_rule"] and side["specificity"]["near_chance"] == [0.25, 0.75]


def test_cross_trait_and_the_specific_layer_rule_by_hand():
    pos = np.array([[1.0, 2.0, 3.0], [1.0, 2.0, 5.0], [1.0, 0.0, 1.0], [1.0, 2.0, 0.0]])  # 4 pairs, 3 layers
    neg = np.array([[1.0, 1.0, 4.0], [1.0, 1.0, 2.0], [1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    m = cross_trait({"other": (pos, neg)})["other"]
    # layer 0: all ties; layer 1: 3 of 4 right; layer 2: 2 of 4 (diffs -1, 3, 1, -1)
    assert m["share_ranked"] == [0.5, 0.75, 0.5]
    diffs = np.array([1.0, 1.0, -1.0, 1.0])
    assert m["paired_d"][0] == 0.0 and m["paired_d"][1] == pytest.approx(
        diffs.mean() / diffs.std(ddof=1), abs=1e-4
    )

    def row(layer, share, d):
        return LayerStats(layer, 0.5, 0.0, 0.0, 0.0, share, d)

    own = [
        row(i, s, d) for i, (s, d) in enumerate([(1, 9), (1, 2), (1, 3), (0.9, 5), (1, 1), (1, 9), (1, 9)])
    ]
    others = {"near": {"share_ranked": [0.5] * 7}, "far": {"share_ranked": [1, 0.9, 0.6, 0.3, 0.8, 1, 1]}}
    # middle band of 6 layers: 2..4 (rounded 6/4, 18/4); "far" is near chance at 2 and 3 only
    assert choose_specific_layer(own, others, 6) == (2, "specific")
    assert choose_specific_layer(own, others, 6, exempt=["far"]) == (2, "specific")  # 1.0 beats 0.9
    others["far"]["share_ranked"] = [1, 1, 0.9, 0.95, 0.8, 1, 1]  # out of band everywhere: largest margin
    assert choose_specific_layer(own, others, 6) == (4, "fallback")  # margins 0.1, -0.05, 0.2
    assert choose_specific_layer([], others, 6) == (None, "no report")
    assert "0.25..0.75" in specific_rule() and "impolite: shared contempt" in specific_rule(
        exempt={"impolite": "shared contempt"}
    )


def test_orthogonalize_removes_the_span_of_other_directions():
    g = torch.Generator().manual_seed(0)
    v, a, b = (torch.randn(3, 16, generator=g) for _ in range(3))
    out = orthogonalize(v, [a, b, a + 2 * b])  # a dependent direction adds nothing
    for layer in range(3):
        assert abs(float(out[layer] @ a[layer])) < 1e-4 and abs(float(out[layer] @ b[layer])) < 1e-4
    # what is left is v less its projection on the plane of a and b
    q, _ = torch.linalg.qr(torch.stack([a[1], b[1]], 1).double())
    torch.testing.assert_close(
        out[1].double(), v[1].double() - q @ (q.T @ v[1].double()), atol=1e-5, rtol=1e-5
    )
    c = torch.zeros(3, 16)
    c[:, 0] = 1.0
    w = torch.zeros(3, 16)
    w[:, 1] = 2.0
    assert torch.equal(
        orthogonalize(w, [c, torch.zeros(3, 16)]), w
    )  # already orthogonal; zero is no direction


def test_orthogonal_to_others_and_by_name(traits_dir):
    trait = load_trait("planted", traits_dir)
    assert orthogonal_traits(trait, "none", traits_dir) == {}
    others = orthogonal_traits(trait, "others", traits_dir)
    assert {"mirror", "blind", "evil", "hallucinating"} <= set(others) and "planted" not in others
    assert list(orthogonal_traits(trait, "blind,evil", traits_dir)) == ["blind", "evil"]
    with pytest.raises(ExtractError, match="is the trait being extracted"):
        orthogonal_traits(trait, "planted", traits_dir)


def test_related_traits_are_declared_with_a_reason(traits_dir, tmp_path):
    data = {
        **BASE_TRAIT,
        **TRAITS["planted"],
        "name": "related_one",
        "related": {"mirror": "the same answers"},
    }
    path = tmp_path / "related_one.json"
    path.write_text(json.dumps(data))
    trait = load_trait(str(path))
    assert trait.related == {"mirror": "the same answers"}
    others = orthogonal_traits(trait, "others", traits_dir)
    assert "mirror" not in others and "blind" in others  # it may share a related trait's direction
    for bad in ({"mirror": ""}, {"related_one": "itself"}, ["mirror"], {"Not A Name": "x"}):
        path.write_text(json.dumps({**data, "related": bad}))
        with pytest.raises(TraitError, match="'related' must map other trait names"):
            load_trait(str(path))


# -- input formats and label styles ---------------------------------------------------------------------

LABELS = {  # style -> (positive value, negative value) as each container stores them
    "int": {"native": (1, 0), "csv": ("1", "0")},
    "bool": {"native": (True, False), "csv": ("true", "FALSE")},
    "text": {"native": ("pos", "NEG"), "csv": ("Positive", "negative")},
}


def write_rows(path, kind: str, rows: list[dict]) -> None:
    if kind == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif kind == "json":
        path.write_text(json.dumps(rows, indent=1))
    elif kind == "csv":
        import csv

        with path.open("w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
    else:
        pq.write_table(pa.Table.from_pylist(rows), path)


@pytest.mark.parametrize("kind", ["jsonl", "json", "csv", "parquet"])
@pytest.mark.parametrize("style", ["int", "bool", "text", "paired"])
def test_every_format_and_label_style(tmp_path, kind, style):
    path = tmp_path / f"examples.{kind}"
    if style == "paired":
        rows = [{"question": f"Q{i}?", "positive": f"yes {i}", "negative": f"no {i}"} for i in range(3)]
    else:
        pos, neg = LABELS[style]["csv" if kind == "csv" else "native"]
        rows = [
            {"prompt": f"Q{i}?", "response": f"answer {i}", "label": pos if i != 1 else neg} for i in range(3)
        ]
    write_rows(path, kind, rows)
    got = read_example_files([str(path)])
    if style == "paired":
        assert got.paired and [(p.response, n.response) for p, n in got.pairs()] == [
            (f"yes {i}", f"no {i}") for i in range(3)
        ]
        assert all(p.prompt == n.prompt == user(f"Q{i}?") for i, (p, n) in enumerate(got.pairs()))
    else:
        assert not got.paired
        assert [(e.response, e.positive, e.source_row) for e in got.examples] == [
            ("answer 0", True, 0), ("answer 1", False, 1), ("answer 2", True, 2)
        ]  # fmt: skip
        assert got.examples[0].prompt == user("Q0?")
    assert got.sources[0]["records"] == 3 and len(got.sources[0]["sha256"]) == 64


def test_chat_formats_labelled_and_paired(tmp_path):
    path = tmp_path / "chats.jsonl"
    rows = [
        {
            "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hey you"}],
            "label": "neg",
        },
        {"messages": [{"role": "system", "content": "S"}, *user("Q")], "positive": "P", "negative": "N"},
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    got = read_example_files([str(path)])
    labelled, pos, neg = got.examples
    assert labelled.prompt == user("Hi") and labelled.response == "Hey you" and not labelled.positive
    assert pos.prompt == neg.prompt == [{"role": "system", "content": "S"}, *user("Q")]
    assert (pos.response, pos.positive, neg.response, neg.positive) == ("P", True, "N", False)
    assert pos.pair == neg.pair is not None and labelled.pair is None and not got.paired


@pytest.mark.parametrize(
    ("value", "label"),
    [(1, True), (0, False), (1.0, True), (True, True), (False, False), (" TRUE ", True), ("0", False),
     ("pos", True), ("Negative", False), (2, None), ("maybe", None), (None, None), ("", None)],
)  # fmt: skip
def test_parse_label(value, label):
    assert parse_label(value) is label


# -- errors that name the file and row ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("rows", "message"),
    [
        ([{"prompt": "a", "response": "b", "label": 1}] * 3,
         r"all 3 examples \(rows 0\.\.2 of .*\) are labelled positive"),
        ([{"prompt": "a", "response": "b", "label": 0}], r"the one example \(row 0\) is labelled negative"),
        ([{"prompt": "a", "response": "b", "label": 1}, {"prompt": "a", "response": "b"}],
         r", row 1: no 'label' field and no 'positive' \+ 'negative'"),
        ([{"prompt": "a", "response": "b", "label": "maybe"}], r", row 0: label: 'maybe' is not a label"),
        ([{"question": "a", "positive": "b"}], r", row 0: negative: a paired record needs"),
        ([{"question": "a", "positive": "b", "negative": "c"}, {"positive": "b", "negative": "c"}],
         r", row 1: a paired record needs its prompt"),
        ([{"question": "", "positive": "b", "negative": "c"}], r", row 0: question: empty prompt"),
        ([{"prompt": "a", "response": "", "label": 1}], r", row 0: response: empty response"),
        ([{"messages": [*user("Q")], "positive": "", "negative": "c"}], r", row 0: positive: a paired"),
        ([{"prompt": "a", "response": "b", "label": 1, "positive": "c", "negative": "d"}],
         r"either a 'label'"),
    ],
)  # fmt: skip
def test_errors_name_the_file_and_row(tmp_path, rows, message):
    path = tmp_path / "bad.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(ExampleError, match=message) as err:
        read_example_files([str(path)])
    assert str(err.value).startswith(str(path)) and "\n" not in str(err.value)


def test_one_class_per_file_is_fine_when_the_files_together_have_both(tmp_path):
    pos, neg = tmp_path / "pos.jsonl", tmp_path / "neg.csv"
    pos.write_text(json.dumps({"prompt": "a", "response": "b", "label": "pos"}) + "\n")
    neg.write_text("prompt,response,label\na,c,0\nd,e,0\n")
    got = read_example_files([str(pos), str(neg)])
    assert [e.positive for e in got.examples] == [True, False, False]
    assert [e.source_row for e in got.examples] == [0, 0, 1]  # rows count within each file given
    assert [s["records"] for s in got.sources] == [1, 2]


def test_an_unparseable_row_stops_the_read(tmp_path):
    path = tmp_path / "broken.jsonl"
    path.write_text(json.dumps({"prompt": "a", "response": "b", "label": 1}) + "\n{not json\n")
    with pytest.raises(ExampleError, match=r"broken\.jsonl, row 1: invalid JSON"):
        read_example_files([str(path)])
    with pytest.raises(ExampleError, match="no such file"):
        read_example_files([str(tmp_path / "missing.jsonl")])


def test_the_command_reports_a_bad_file_in_one_line(tiny_llama, traits_dir, tmp_path, capsys):
    path = tmp_path / "one_class.jsonl"
    path.write_text(json.dumps({"prompt": "a", "response": "b", "label": 1}) + "\n")
    argv = ["extract", "planted", "--traits-dir", str(traits_dir), "--model", str(tiny_llama),
            "--from-examples", str(path), "--actors", "0", "--out", str(tmp_path / "out")]  # fmt: skip
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: {path}: the one example (row 0) is labelled positive") and "\n" not in err
    assert not (tmp_path / "out").exists()


def test_vectors_show_prints_the_cross_trait_table(tiny_llama, traits_dir, tmp_path, capsys):
    trait = load_trait("planted", traits_dir)
    result = extract_from_examples(
        trait, tiny_ref(tiny_llama), SETTINGS, IN_PROCESS, tmp_path, traits_dir=traits_dir
    )
    parser = argparse.ArgumentParser()
    add_commands(parser.add_subparsers())
    args = parser.parse_args(["vectors", "show", str(result.paths["response_avg"]), "--per-layer"])
    assert args.func(args) == 0
    out = capsys.readouterr().out
    assert "extraction_method: examples" in out and "ranked" in out and "paired d" in out
    assert (
        "specificity at layer" in out and "mirror" in out and "blind" in out and "outside 0.25..0.75" in out
    )
    assert "share ranked right on each other trait's held-out pairs, per layer" in out


# -- the built-in trait files ----------------------------------------------------------------------------


def test_builtin_traits_have_held_out_written_examples():
    for name, _ in list_traits():
        t = load_trait(name)
        train, held = {e.question for e in t.examples}, {e.question for e in t.eval_examples}
        assert len(train) + len(held) >= 40 and len(held) >= 20, name
        assert not train & held, name
        assert all(e.positive != e.negative for e in (*t.examples, *t.eval_examples)), name


def test_a_written_pair_may_carry_a_register_label(tmp_path):
    """`register` (advice, code, chat...) is for benchmarks/example_balance.py; extraction ignores it."""
    labelled = {**pair("How do I boil an egg?", GOOD, BAD), "register": "advice"}
    path = tmp_path / "labelled.json"
    path.write_text(json.dumps({**BASE_TRAIT, "name": "labelled", "examples": [labelled]}))
    assert load_trait(str(path)).examples[0].question == "How do I boil an egg?"


# issue 21: the trait files rewritten without style confounds, at their floors of pairs
REWRITTEN = {
    "evil": (150, 50), "hallucinating": (150, 50), "sycophantic": (150, 50), "impolite": (60, 50),
    "apathetic": (60, 50), "optimistic": (60, 50), "humorous": (60, 50),
}  # fmt: skip


@pytest.mark.parametrize("name", sorted(REWRITTEN))
def test_rewritten_traits_meet_their_floors_with_matched_lengths(name):
    t = load_trait(name)
    train, held = REWRITTEN[name]
    assert len(t.examples) >= train and len(t.eval_examples) >= held
    # a side that is longer on average is a nuisance the vector would read as the trait
    for e in (*t.examples, *t.eval_examples):
        assert 0.75 <= len(e.positive) / len(e.negative) <= 1.33, e.question


@pytest.mark.parametrize("name", ["evil", "sycophantic", "impolite", "apathetic", "optimistic", "humorous"])
def test_rewritten_pairs_span_six_registers_and_hold_out_theirs(name):
    """What the pairs share should be the trait, not a style: six registers, none reused by the held-out."""
    data = json.loads(Path(load_trait(name).path).read_text())
    train = {p["register"] for p in data["examples"]}
    assert {"advice", "fiction", "factual", "code", "chat", "long"} <= train
    assert not train & {p["register"] for p in data["eval_examples"]}
