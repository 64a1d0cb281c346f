"""`screener explain` and the report's per-token view on real tiny screens (fp32): per-token values against
a plain `output_hidden_states` pass, the stored scores recovered from them, `--turns all` ids, a moved or
changed input, changed weights and vector files refused, and the HTML rendered in headless Chromium."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import duckdb
import helpers
import numpy as np
import pytest
import torch
from conftest import random_vectors
from helpers import cli, make_screen, openai_records, sharegpt_records, write_jsonl
from test_report import run_chromium

from screener.explain import (
    MAX_SPAN,
    explain_samples,
    read_back,
    sentence_spans,
    stored_samples,
    token_pieces,
)
from screener.models import chat_ids, load_model, resolve_model
from screener.results import open_db, pick_run
from screener.scoring import GenerationSettings
from screener.screen import ScreenConfig, screen

RTOL, ATOL = 1e-4, 1e-5
LAYERS = (1, 3)
TRAITS = ("evil", "kind")
LONG = (
    "Here is a long answer. It has several sentences! Does it end? Evil plans, cruel words and "
    "sycophantic praise: the traits we screen for.\nA new line starts here. " * 3
)


def records() -> list[dict]:
    def chat(rid: str, *turns: str, system: str | None = None) -> dict:
        messages = [{"role": "system", "content": system}] if system else []
        for i, text in enumerate(turns):
            messages.append({"role": "user" if i % 2 == 0 else "assistant", "content": text})
        return {"id": rid, "messages": messages}

    return [
        chat("single", "Tell me about the quick brown fox.", "The fox is quick. The dog is lazy."),
        chat(
            "multi", "one?", "First answer, kindly.", "two?", "Second answer: evil plans!", system="Be nice."
        ),
        chat("long", "Write a lot, please.", LONG),
        chat("uni", "Unicode: ü✓ — 日本?", "Sure: ü✓ — 日本語 ☃ are characters."),
        chat("esc", "Colours?", "Red \x1b[31mred\x1b[0m and a bell \x07."),
        chat("empty", "Say nothing.", "   "),  # rejected: empty response
    ]


def screen_config(data: Path, db: Path, model: Path, vectors: list[str], **kw) -> ScreenConfig:
    return ScreenConfig(
        dataset=str(data),
        db=str(db),
        model=str(model),
        vectors=vectors,
        layers=list(LAYERS),
        actors=0,
        dtype="float32",
        progress=False,
        **kw,
    )


def save_vectors(model: Path, folder: Path) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    args = []
    for name, v in zip(TRAITS, random_vectors(model, 2), strict=True):
        torch.save(v, folder / f"{name}.pt")
        args.append(f"{name}={folder / f'{name}.pt'}")
    return args


@pytest.fixture(scope="module")
def proxy(tiny_llama, tmp_path_factory) -> Path:
    """A proxy screen, every assistant turn, with max_tokens cutting the long sample: its database."""
    folder = tmp_path_factory.mktemp("explain")
    data = write_jsonl(folder / "d.jsonl", records())
    vectors = save_vectors(tiny_llama, folder / "vectors")
    screen(screen_config(data, folder / "p.duckdb", tiny_llama, vectors, max_tokens=96))
    return folder / "p.duckdb"


def explain_json(capsys, *argv: object) -> list[dict]:
    assert cli("explain", *argv, "--format", "json") == 0, capsys.readouterr().err
    return [json.loads(line) for line in capsys.readouterr().out.splitlines()]


def db_rows(db: Path, sql: str) -> list[tuple]:
    with duckdb.connect(str(db), read_only=True) as con:
        return con.sql(sql).fetchall()


def test_per_token_values_equal_a_plain_forward_pass(proxy, tiny_llama, capsys) -> None:
    model, tok = load_model(str(tiny_llama))
    prompt = db_rows(proxy, "SELECT prompt, response FROM samples WHERE sample_id = 'multi#1'")[0]
    p = chat_ids(tok, json.loads(prompt[0]))
    r = tok(prompt[1], add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        hidden = model(torch.tensor([p + r]), output_hidden_states=True).hidden_states
    vectors = {t: torch.load(proxy.parent / "vectors" / f"{t}.pt") for t in TRAITS}
    for layer in LAYERS:
        got = explain_json(capsys, "multi#1", "--db", proxy, "--layer", layer)
        assert [g["trait"] for g in got] == list(TRAITS)
        for g in got:
            v = vectors[g["trait"]][layer].double()
            want = (hidden[layer][0].double() @ (v / v.norm())).numpy()
            np.testing.assert_allclose(g["projections"], want, rtol=RTOL, atol=ATOL)
            assert g["layer"] == layer and g["response_start"] == len(p)
            assert len(g["tokens"]) == len(p) + len(r)
            assert "".join(g["tokens"]) == tok.decode(p + r)


def test_the_stored_scores_are_the_mean_and_the_last_prompt_token(proxy, capsys) -> None:
    """For every scored sample (turns read from a shared pass, truncated ones, unicode) and layer: the mean
    over the response is the stored proj_response and the token before it the stored proj_prompt_last."""
    with open_db(proxy) as store:
        run = pick_run(store.con)
        ids = [r[0] for r in store.con.execute("SELECT sample_id FROM samples ORDER BY ALL").fetchall()]
        stored = {layer: stored_samples(store.con, run, ids, layer, run.traits) for layer in LAYERS}
    assert ids == ["esc", "long", "multi#0", "multi#1", "single", "uni"]
    truncated = {s.sample_id for s in stored[1] if s.truncated}
    assert truncated == {"long"}
    explained = explain_samples(run, stored, dict.fromkeys(LAYERS, TRAITS))  # every layer at once
    for layer in LAYERS:
        for s, e in zip(stored[layer], explained[layer], strict=True):
            assert e.layer == layer
            k = e.response_start
            assert (k, len(e.tokens) - k) == (s.prompt_tokens, s.response_tokens)
            assert e.truncated == s.truncated
            for trait in TRAITS:
                t = e.traits[trait]
                np.testing.assert_allclose(
                    [t.projections[k:].mean(), t.projections[k - 1]],
                    [s.scores[trait]["proj_response"], s.scores[trait]["proj_prompt_last"]],
                    rtol=RTOL,
                    atol=ATOL,
                )
                assert abs(t.diff("proj_response")) < 1e-4 and abs(t.diff("proj_prompt_last")) < 1e-4
    # the JSON says the same, with the differences
    (g,) = explain_json(capsys, "long", "--db", proxy, "--trait", "kind", "--layer", 3)
    k = g["response_start"]
    assert g["truncated"] and g["sample_id"] == "long" and g["trait"] == "kind"
    assert np.mean(g["projections"][k:]) == pytest.approx(g["proj_response"], rel=RTOL, abs=ATOL)
    assert g["projections"][k - 1] == pytest.approx(g["proj_prompt_last"], rel=RTOL, abs=ATOL)
    assert g["check"]["proj_response_diff"] == pytest.approx(
        g["check"]["proj_response"] - g["proj_response"], abs=1e-12
    )
    assert abs(g["check"]["proj_prompt_last_diff"]) < 1e-4
    assert g["delta_p_proxy"] == pytest.approx(g["proj_response"] - g["proj_prompt_last"])
    assert set(g) >= {"tokens", "projections", "response_start", "spans", "scale", "layer", "run_id"}


def test_traits_at_different_layers_load_the_model_and_read_the_data_once(
    tiny_llama, tmp_path: Path, capsys, monkeypatch
) -> None:
    """Vectors chosen at different layers (evil at 1, kind at 3): `explain` and `report` load the model
    once and read the dataset once for both layers, and give each trait the values it has alone."""
    from screener import explain
    from screener.models import ModelRef
    from screener.vectors import save_vector

    data = write_jsonl(tmp_path / "d.jsonl", records()[:3])
    specs = []
    for name, v, layer in zip(TRAITS, random_vectors(tiny_llama, 2), LAYERS, strict=True):
        specs.append(f"{name}={save_vector(tmp_path / 'v' / f'{name}.pt', v, {'chosen_layer': layer})}")
    db = tmp_path / "s.duckdb"
    config = screen_config(data, db, tiny_llama, specs)
    config.layers = []  # each vector at its own chosen layer
    screen(config)
    loads, reads = [], []
    load, read_back = ModelRef.load, explain.read_back
    monkeypatch.setattr(
        ModelRef, "load", lambda self, *a, **k: loads.append(self.path) or load(self, *a, **k)
    )
    monkeypatch.setattr(explain, "read_back", lambda *a, **k: reads.append(a[0]) or read_back(*a, **k))
    both = explain_json(capsys, "multi#1", "--db", db)
    assert [(g["trait"], g["layer"]) for g in both] == [("evil", 1), ("kind", 3)]
    assert (len(loads), len(reads)) == (1, 1)
    for g in both:
        (alone,) = explain_json(capsys, "multi#1", "--db", db, "--trait", g["trait"])
        assert alone["layer"] == g["layer"]  # the same, up to the rounding of a one-trait matmul
        np.testing.assert_allclose(alone["projections"], g["projections"], rtol=1e-6, atol=1e-6)
    loads.clear(), reads.clear()
    out = tmp_path / "r.html"
    assert cli("report", "--db", db, "--out", out, "--explain-k", 2) == 0
    assert (len(loads), len(reads)) == (1, 1)
    page = out.read_text()
    assert page.count("<div class='explained'>") == 2 * len(TRAITS) and "Not computed" not in page


def test_turns_all_sample_ids(proxy, capsys) -> None:
    got = {}
    for sid, turn in (("multi#0", 0), ("multi#1", 1), ("single", 0)):
        (got[sid],) = explain_json(capsys, sid, "--db", proxy, "--trait", "evil")
        assert (got[sid]["sample_id"], got[sid]["turn"]) == (sid, turn)
    first, second = got["multi#0"], got["multi#1"]
    assert "".join(first["tokens"][first["response_start"] :]) == "First answer, kindly."
    assert second["tokens"][: len(first["tokens"])] == first["tokens"]  # turn 0 is a prefix of turn 1
    for sid, message in (
        ("single#0", "no sample 'single#0' in run"),
        ("multi", "this record's turns are multi#0, multi#1"),
        ("empty", "sample 'empty' was rejected by run"),
    ):
        assert cli("explain", sid, "--db", proxy) == 1
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err and err.count("\n") == 1, err
    assert cli("explain", "single", "--db", proxy, "--trait", "nice") == 1
    assert "not 'nice'" in capsys.readouterr().err
    assert cli("explain", "single", "--db", proxy, "--layer", 2) == 1
    assert "layers [1, 3], not 2" in capsys.readouterr().err


def test_spans_are_the_sentences_with_the_highest_mean() -> None:
    pieces = ["Q", ">", "Hello", " world", ".", " Bad", " evil", " words", "!", "\n", "ok", " fine", "."]
    values = np.array([9, 9, 1, 1, 1, 5, 6, 7, 5, 0, 2, 2, 2], dtype=float)
    spans = sentence_spans(pieces, values, 2)
    # "Hello world." | " Bad evil words!" + the lone newline merged into it | "ok fine."
    assert [(s.start, s.end) for s in spans] == [(5, 10), (10, 13), (2, 5)]
    assert spans[0].mean == pytest.approx(np.mean([5, 6, 7, 5, 0]))
    assert sentence_spans(pieces, values, 2, top=1)[0].start == 5
    # a decimal point is not a sentence end; a long run without one is cut every MAX_SPAN tokens
    assert [(s.start, s.end) for s in sentence_spans(["3", ".", "14", " is", " pi"], np.ones(5), 0)] == [
        (0, 5)
    ]
    spans = sentence_spans(["a"] * (2 * MAX_SPAN + 1), np.arange(2.0 * MAX_SPAN + 1), 0, top=5)
    assert sorted((s.start, s.end) for s in spans) == [(0, MAX_SPAN), (MAX_SPAN, 2 * MAX_SPAN + 1)]
    # a list: numbers and abbreviations are no sentences, items never merge across lines, and a line of
    # fewer than 3 tokens is not ranked
    items = ["1", ".", " Foo", " Co", ".", " Ltd", ".\n", "2", ".", " Bar", "\n", "x", "\n"]
    values = np.array([1, 1, 1, 1, 1, 1, 1, 3, 3, 3, 3, 9, 9], dtype=float)
    assert [(s.start, s.end) for s in sentence_spans(items, values, 0)] == [(7, 11), (0, 7)]
    assert [(s.start, s.end) for s in sentence_spans(["ok", "!"], np.ones(2), 0)] == [(0, 2)]


def test_token_pieces_join_into_the_text(tiny_llama) -> None:
    _, tok = load_model(str(tiny_llama))
    text = "Sure: ü✓ — 日本語 ☃ and\nnew lines."
    ids = tok(text, add_special_tokens=False)["input_ids"]
    pieces = token_pieces(tok, ids)
    assert len(pieces) == len(ids) and "".join(pieces) == text
    assert "" in pieces  # a character split over several byte tokens goes to the token that completes it
    assert not any("\ufffd" in p for p in pieces)


def test_text_output_shades_on_a_terminal_and_marks_without(proxy, capsys) -> None:
    assert cli("explain", "esc", "--db", proxy, "--color", "always") == 0
    coloured = capsys.readouterr().out
    assert "\x1b[48;2;" in coloured and coloured.count("== ") == len(TRAITS)
    assert "\x1b[31m" not in coloured and "\\x1b[31m" in coloured  # the data's escapes are shown, not run
    assert cli("explain", "long", "--db", proxy, "--trait", "evil") == 0  # not a terminal: marks
    out = capsys.readouterr().out
    assert "\x1b" not in out
    assert out.startswith("== evil · layer 1 · sample long (row 2)")
    for line in ("stored:     proj_response", "recomputed: proj_response", "(diff ", "marks: {+…+} ≥"):
        assert line in out
    assert "truncated to --max-tokens" in out and "{+" in out and "top spans" in out
    assert re.search(r"^  1\. .* tokens \d+-\d+  ", out, re.M)


def test_html_renders_in_chromium(proxy, tmp_path: Path, capsys) -> None:
    out = tmp_path / "x.html"
    assert cli("explain", "uni", "--db", proxy, "--format", "html") == 1
    assert "--format html needs --out" in capsys.readouterr().err
    assert cli("explain", "uni", "--db", proxy, "--format", "html", "--out", out) == 0
    page = out.read_text()
    assert "<script" not in page and "http" not in page  # self-contained
    n_tokens = len(explain_json(capsys, "uni", "--db", proxy, "--trait", "evil")[0]["tokens"])
    if not shutil.which("chromium"):
        pytest.skip("needs chromium (apt-get install chromium)")
    dom, console = run_chromium(out.as_uri(), tmp_path, "--dump-dom")
    assert console == []
    for trait in TRAITS:
        assert f'<section id="trait-{trait}">' in dom
    assert dom.count('<span style="background:') == n_tokens * len(TRAITS)  # prompt and response
    assert "日本語" in dom and "☃" in dom


def test_report_shows_the_top_samples_shaded(proxy, tmp_path: Path, capsys) -> None:
    out = tmp_path / "r.html"
    assert cli("report", "--db", proxy, "--out", out, "--explain-k", 2) == 0
    page = out.read_text()
    for trait in TRAITS:
        assert f'id="explain-{trait}"' in page and f"Per-token view: {trait}" in page
    assert page.count("<div class='explained'>") == 2 * len(TRAITS) and "class='scale'" in page
    assert "<script" not in page
    if shutil.which("chromium"):
        dom, console = run_chromium(out.as_uri(), tmp_path, "--dump-dom")
        assert console == [] and dom.count('<div class="explained">') == 2 * len(TRAITS)
    assert cli("report", "--db", proxy, "--out", out, "--no-explain", "--force") == 0
    assert "explain-" not in out.read_text()


def test_report_of_a_run_without_recorded_vectors_says_so(screens, tmp_path: Path) -> None:
    natural, _ = screens  # synthetic screens: no model, no vector files
    out = tmp_path / "r.html"
    assert cli("report", "--db", natural.db, "--run", natural.run_id, "--out", out) == 0
    page = out.read_text()
    assert page.count("Not computed: run") == 2 and "does not record its vectors" in page


def test_a_moved_or_changed_input(tiny_llama, tmp_path: Path, capsys) -> None:
    data = write_jsonl(tmp_path / "d.jsonl", records()[:3])
    vectors = save_vectors(tiny_llama, tmp_path / "v")
    screen(screen_config(data, tmp_path / "m.duckdb", tiny_llama, vectors))
    db, moved = tmp_path / "m.duckdb", tmp_path / "elsewhere.jsonl"
    data.rename(moved)
    assert cli("explain", "multi#1", "--db", db) == 1
    err = capsys.readouterr().err
    assert "the screened dataset is not here" in err and "--input" in err
    (g,) = explain_json(capsys, "multi#1", "--db", db, "--input", moved, "--trait", "kind")
    assert abs(g["check"]["proj_response_diff"]) < 1e-4
    changed = records()[:3]
    changed[1]["messages"][-1]["content"] = "Another answer."
    write_jsonl(tmp_path / "changed.jsonl", changed)
    assert cli("explain", "multi#1", "--db", db, "--input", tmp_path / "changed.jsonl") == 1
    assert "row 1: not the record the screen scored as 'multi#1'" in capsys.readouterr().err
    write_jsonl(tmp_path / "short.jsonl", records()[:1])
    assert cli("explain", "multi#1", "--db", db, "--input", tmp_path / "short.jsonl") == 1
    assert "has no row 1" in capsys.readouterr().err
    out = tmp_path / "r.html"
    assert cli("report", "--db", db, "--out", out) == 0  # the report says why, and is written
    assert "Not computed: the screened dataset is not here" in out.read_text()
    assert cli("report", "--db", db, "--out", out, "--input", moved, "--force") == 0
    assert "Not computed" not in out.read_text()


def test_a_folder_of_mixed_row_formats_reads_back_as_screened(tmp_path: Path) -> None:
    """Each file has its own row format, for explain as for the screen (not the first record's)."""
    data = tmp_path / "mixed"
    data.mkdir()
    write_jsonl(data / "a.jsonl", openai_records(6)[:2])
    (data / "b.json").write_text(
        json.dumps([{**r, "id": f"s{i}"} for i, r in enumerate(sharegpt_records(6)[:2])])
    )
    (data / "c.csv").write_text("id,prompt,response\np1,Why?,Because.\np2,How?,Carefully.\n")
    fake = make_screen(tmp_path / "m.duckdb", data)
    assert len(fake.samples) == 6 and not fake.rejects
    ids = [s.sample_id for s in fake.samples]
    with open_db(tmp_path / "m.duckdb") as store:
        stored = stored_samples(store.con, fake.run, ids, helpers.LAYERS[0], helpers.TRAITS)
    back = read_back(fake.run, stored)
    assert [(back[i].prompt, back[i].response) for i in ids] == [(s.prompt, s.response) for s in fake.samples]


def test_changed_weights_or_vectors_are_refused(tiny_llama, tmp_path: Path, capsys) -> None:
    from safetensors.torch import load_file, save_file

    model = tmp_path / "model"
    shutil.copytree(tiny_llama, model)
    data = write_jsonl(tmp_path / "d.jsonl", records()[:2])
    vectors = save_vectors(model, tmp_path / "v")
    screen(screen_config(data, tmp_path / "w.duckdb", model, vectors))
    db = tmp_path / "w.duckdb"
    (run_sha,) = db_rows(db, "SELECT model_sha256 FROM runs")[0]
    assert cli("explain", "single", "--db", db, "--format", "json") == 0
    capsys.readouterr()

    vec = tmp_path / "v" / "kind.pt"
    original = vec.read_bytes()
    torch.save(torch.load(vec) * 2, vec)  # the same direction, other bytes: refused all the same
    assert cli("explain", "single", "--db", db) == 2
    err = capsys.readouterr().err
    assert f"{vec}: the 'kind' vector file changed since the screen" in err and err.count("\n") == 1
    assert re.search(r"sha256 [0-9a-f]{12} now, [0-9a-f]{12} in run", err)
    assert cli("explain", "single", "--db", db, "--trait", "evil", "--format", "json") == 0  # not used
    capsys.readouterr()
    vec.write_bytes(original)

    weights = next(model.glob("*.safetensors"))
    tensors = load_file(weights)
    name = next(iter(tensors))
    tensors[name] = tensors[name] + 1e-3
    save_file(tensors, weights, metadata={"format": "pt"})
    now = resolve_model(str(model)).sha256
    assert now != run_sha
    assert cli("explain", "single", "--db", db) == 2
    err = capsys.readouterr().err
    assert f"model {model}: its weights changed since the screen" in err
    assert f"sha256 {now[:12]} now, {run_sha[:12]} in run" in err
    out = tmp_path / "r.html"
    assert cli("report", "--db", db, "--out", out) == 0
    assert out.read_text().count("its weights changed since the screen") == len(TRAITS)


def test_natural_mode_reads_the_stored_natural_answer(tiny_llama, tmp_path: Path, capsys) -> None:
    data = write_jsonl(tmp_path / "d.jsonl", records()[:4])
    vectors = save_vectors(tiny_llama, tmp_path / "v")
    cfg = screen_config(
        data, tmp_path / "n.duckdb", tiny_llama, vectors, mode="natural", generation=GenerationSettings(8)
    )
    screen(cfg)
    db = tmp_path / "n.duckdb"
    sid, prompt, natural, n_generated = db_rows(
        db,
        "SELECT sample_id, prompt, natural_response, natural_tokens FROM samples "
        "WHERE natural_tokens > 0 ORDER BY sample_id LIMIT 1",
    )[0]
    got = explain_json(capsys, sid, "--db", db, "--layer", 3)
    model, tok = load_model(str(tiny_llama))
    p = chat_ids(tok, json.loads(prompt))
    ids = tok(natural, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        hidden = model(torch.tensor([p + ids]), output_hidden_states=True).hidden_states[3][0, len(p) :]
    for g in got:
        nat = g["natural"]
        assert "teacher-forced" in nat["method"] and nat["tokens_stored"] == n_generated
        assert "".join(nat["tokens"]) == natural and len(nat["projections"]) == len(ids)
        v = torch.load(tmp_path / "v" / f"{g['trait']}.pt")[3].double()
        np.testing.assert_allclose(nat["projections"], (hidden.double() @ (v / v.norm())).numpy(), rtol=RTOL)
        assert nat["proj_natural"] == pytest.approx(np.mean(nat["projections"]))
        assert nat["proj_natural_diff"] == pytest.approx(nat["proj_natural"] - nat["proj_natural_stored"])
        assert g["scale"]["centre_is"] == "proj_natural"
        assert g["scale"]["centre"] == pytest.approx(nat["proj_natural_stored"])
    assert cli("explain", sid, "--db", db, "--trait", "evil") == 0
    assert "natural answer (" in capsys.readouterr().out


def test_the_text_and_html_views_draw_one_view_model(proxy) -> None:
    """The explanation was drawn twice from the raw arrays (render.format_explanation and
    report.explanation_html); both now draw `Explanation.view`, so they show the same numbers."""
    from screener.api import open_run
    from screener.render import format_explanation
    from screener.report import explanation_html

    (e,) = open_run(proxy).explain("long", "evil")
    v = e.view("evil")
    t = e.traits["evil"]
    k = e.response_start
    assert v.response[0] == e.tokens[k:] and v.prompt[0] == e.tokens[:k]
    assert np.array_equal(v.response[2], t.normalised(t.projections)[k:])
    assert v.recomputed["proj_response"] == (t.proj_response, t.diff("proj_response"))
    assert [s.text for s in v.spans] == ["".join(e.tokens[s.start : s.end]) for s in t.spans]
    text, page = format_explanation(e, "evil", color=False), explanation_html(e, "evil")
    for column, (value, _) in v.recomputed.items():
        assert f"{column} {value:.6g}" in text and f"{column} {value:.6g}" in page
    for s in v.spans:
        assert f"tokens {s.start}-{s.end - 1}" in text and f"tokens {s.start}–{s.end - 1}" in page
