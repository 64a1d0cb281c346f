"""`screener shift` on tiny random models: exact zeros, a known nudge, LoRA adapters, refusals, the table."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import duckdb
import numpy as np
import pytest
import torch
from conftest import TEST_DEVICE, random_vectors, reference, write_chat_jsonl
from helpers import random_model

from screener import cli
from screener.errors import UserError
from screener.models import ModelRef, load_model, sha256_file
from screener.records import Sample
from screener.scoring import GenerationSettings, Scorer, ScoreSettings
from screener.shift import IncompatibleModelsError, ShiftConfig, measure
from screener.vectors import unit_vectors

LAYER = 2  # hidden_states[2]: the output of block 2 (model.layers[1]) of the 4-block tiny models


def save_vectors(
    folder: Path, out: Path, names: list[str], rows: dict[str, torch.Tensor] | None = None
) -> list[str]:
    """`NAME=PATH` arguments for random vectors of the model in `folder`; `rows[name]` replaces row LAYER."""
    out.mkdir(parents=True, exist_ok=True)
    args = []
    for name, v in zip(names, random_vectors(folder, len(names), seed=3), strict=True):
        if rows and name in rows:
            v[LAYER] = rows[name]
        torch.save(v, out / f"{name}.pt")
        args.append(f"{name}={out / f'{name}.pt'}")
    return args


def config(base: Path, finetuned: Path, vectors: list[str], db: Path, **kw) -> ShiftConfig:
    kw = {"layers": [LAYER], "dtype": "float32", "device": str(TEST_DEVICE), "actors": 0, **kw}
    return ShiftConfig(str(base), str(finetuned), db=str(db), vectors=vectors, **kw)


def llama(folder: Path, like: Path, seed: int = 0, **overrides) -> torch.nn.Module:
    """A random model with the config of the model in `like`, changed by `overrides`, and its tokenizer,
    saved to `folder` (weights scaled as conftest's are)."""
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(like)
    for k, v in overrides.items():
        setattr(cfg, k, v)
    model = random_model(cfg, seed)
    save(model, folder, like)
    return model


def save(model: torch.nn.Module, folder: Path, like: Path) -> Path:
    from transformers import AutoTokenizer

    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(like).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def nudged(tiny_llama, tmp_path_factory) -> tuple[Path, Path, torch.Tensor]:
    """(base, fine-tuned, δ): the fine-tuned copy adds δ to block LAYER's MLP output bias, the last thing the
    block adds to the residual stream, so hidden_states[LAYER] moves by exactly δ at every position and
    every layer below it is unchanged."""
    root = tmp_path_factory.mktemp("nudged")
    model = llama(root / "base", tiny_llama, mlp_bias=True)
    delta = torch.randn(model.config.hidden_size, generator=torch.Generator().manual_seed(7)) * 3
    with torch.no_grad():
        model.model.layers[LAYER - 1].mlp.down_proj.bias += delta
    save(model, root / "finetuned", tiny_llama)
    return root / "base", root / "finetuned", delta


@pytest.fixture(scope="module")
def lora(tiny_llama, tmp_path_factory) -> Path:
    """A LoRA adapter for tiny_llama with random (non-zero) A and B, so it changes the model."""
    from peft import LoraConfig, get_peft_model

    model, _ = load_model(str(tiny_llama))
    torch.manual_seed(5)
    peft_model = get_peft_model(
        model,
        LoraConfig(
            r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False
        ),
    )
    folder = tmp_path_factory.mktemp("lora") / "adapter"
    peft_model.save_pretrained(folder)
    return folder


def read_shifts(db: Path) -> list[dict]:
    with duckdb.connect(str(db), read_only=True) as con:
        rel = con.sql("SELECT * FROM shifts ORDER BY trait, layer, measure")
        return [dict(zip(rel.columns, row, strict=True)) for row in rel.fetchall()]


# -- the measurement -------------------------------------------------------------------------------


def test_identical_models_shift_exactly_zero(tiny_llama, tmp_path):
    """Same weights, same token ids, same kernels: every paired difference is exactly 0, for both measures
    and every trait; the default prompts are each trait's evaluation questions."""
    vectors = save_vectors(tiny_llama, tmp_path / "v", ["evil", "hallucinating"])
    gen = GenerationSettings(max_new_tokens=6)
    cfg = config(
        tiny_llama, tiny_llama, vectors, tmp_path / "s.duckdb", layers=[1, 4], generate=True, generation=gen
    )
    result = measure(cfg)
    assert {(s.trait, s.layer, s.measure) for s in result.shifts} == {
        (t, layer, m)
        for t in ("evil", "hallucinating")
        for layer in (1, 4)
        for m in ("prompt_last", "response_avg")
    }
    for s in result.shifts:
        assert s.shift == 0.0 and s.stderr == 0.0, s
        assert s.base_mean == s.finetuned_mean
    prompt_last = [s for s in result.shifts if s.measure == "prompt_last"]
    assert {s.n_prompts for s in prompt_last} == {20}  # the trait files' 20 evaluation questions
    assert result.plan.prompt_sets["evil"].source.startswith("evil eval_questions")


def test_nudged_model_moves_by_the_known_delta(nudged, tmp_path):
    """hidden_states[LAYER] moves by δ at every position: the shift on v̂ is δ·v̂ (sign and magnitude), with
    no spread over prompts, and the layer below is exactly unchanged."""
    base, finetuned, delta = nudged
    other = torch.randn(delta.shape, generator=torch.Generator().manual_seed(11))
    rows = {"toward": delta, "away": -delta, "other": other}
    vectors = save_vectors(base, tmp_path / "v", list(rows), rows)
    data = write_chat_jsonl(tmp_path / "q.jsonl", 9)
    result = measure(
        config(
            base, finetuned, vectors, tmp_path / "s.duckdb", layers=[LAYER - 1, LAYER], questions=str(data)
        )
    )
    got = {(s.trait, s.layer): s for s in result.shifts}
    for name, row in rows.items():
        expected = float(delta.double() @ (row.double() / row.double().norm()))
        s = got[(name, LAYER)]
        assert s.n_prompts == 9
        assert s.shift == pytest.approx(expected, rel=1e-4, abs=1e-3), name
        assert s.stderr < 1e-3 * abs(delta).max().item()
        assert got[(name, LAYER - 1)].shift == 0.0  # blocks before LAYER are the same
    assert got[("toward", LAYER)].shift == pytest.approx(delta.norm().item(), rel=1e-4)
    assert got[("away", LAYER)].shift == pytest.approx(-delta.norm().item(), rel=1e-4)


def test_project_prompts_is_proj_prompt_last(tiny_llama):
    """The shift's prompt-only projection is the screen's proj_prompt_last (same code path), and both match
    a plain output_hidden_states pass."""
    model, tok = load_model(str(tiny_llama), TEST_DEVICE)
    vecs = random_vectors(tiny_llama, 2)
    layers = (1, 3)
    scorer = Scorer(model, tok, unit_vectors(vecs, layers), ScoreSettings(layers=layers, batch_tokens=64))
    samples = [
        Sample(f"s{i}", i, 0, [{"role": "user", "content": "word " * (1 + 3 * i)}], "an answer " * (i + 1))
        for i in range(6)
    ]
    toks = [scorer.tokenize(s) for s in samples]
    _, prompt_last = scorer.project([t.prompt for t in toks], [t.response for t in toks])
    alone = scorer.project_prompts([t.prompt for t in toks])
    np.testing.assert_allclose(alone, prompt_last, rtol=1e-4, atol=1e-4)
    for s, row in zip(samples, alone, strict=True):
        np.testing.assert_allclose(row, reference(model, tok, s, vecs, layers)[1], rtol=1e-4, atol=1e-4)


def test_lora_adapter_merges(tiny_llama, lora, tmp_path):
    """An adapter folder is applied to BASE and merged on load: its shift is the merged model's, and the
    row records the adapter's sha256 beside the base's."""
    from peft import PeftModel

    model, _ = load_model(str(tiny_llama))
    merged = save(
        PeftModel.from_pretrained(model, str(lora)).merge_and_unload(), tmp_path / "merged", tiny_llama
    )
    vectors = save_vectors(tiny_llama, tmp_path / "v", ["evil", "hallucinating"])
    via_adapter = measure(config(tiny_llama, lora, vectors, tmp_path / "a.duckdb", layers=[1, LAYER, 4]))
    via_merged = measure(config(tiny_llama, merged, vectors, tmp_path / "m.duckdb", layers=[1, LAYER, 4]))
    assert [s.shift for s in via_adapter.shifts] == pytest.approx(
        [s.shift for s in via_merged.shifts], rel=1e-5, abs=1e-5
    )
    assert all(abs(s.shift) > 1e-3 for s in via_adapter.shifts)  # the adapter changes the model
    row = read_shifts(tmp_path / "a.duckdb")[0]
    assert row["finetuned_kind"] == "adapter"
    assert row["finetuned_sha256"] == sha256_file(lora / "adapter_model.safetensors")
    assert row["base_sha256"] == via_adapter.plan.base.sha256
    assert json.loads(row["settings"])["adapter"]["peft_type"] == "LORA"


# -- refusals, before any weights load -----------------------------------------------------------


@pytest.fixture
def no_weights(monkeypatch):
    """Loading any model fails the test: a refusal must come before the weights."""

    def boom(*_a, **_k):
        raise AssertionError("weights were loaded before the refusal")

    monkeypatch.setattr(ModelRef, "load", boom)


def variant(tiny_llama: Path, folder: Path, **overrides) -> Path:
    llama(folder, tiny_llama, **overrides)
    return folder


@pytest.mark.parametrize(
    ("overrides", "named"),
    [
        ({"num_hidden_layers": 3}, "layer count: 4 in the base, 3 in the fine-tuned model"),
        (
            {"hidden_size": 32, "intermediate_size": 64},
            "hidden size: 64 in the base, 32 in the fine-tuned model",
        ),
    ],
)
def test_mismatched_models_refused(tiny_llama, tmp_path, no_weights, overrides, named):
    other = variant(tiny_llama, tmp_path / "other", **overrides)
    vectors = save_vectors(tiny_llama, tmp_path / "v", ["evil"])
    with pytest.raises(IncompatibleModelsError, match=named):
        measure(config(tiny_llama, other, vectors, tmp_path / "s.duckdb"))
    assert not (tmp_path / "s.duckdb").exists()


def test_other_architecture_refused(tiny_models, tmp_path, no_weights):
    vectors = save_vectors(tiny_models["llama"], tmp_path / "v", ["evil"])
    with pytest.raises(
        IncompatibleModelsError, match="architecture: llama LlamaForCausalLM in the base, qwen2"
    ):
        measure(config(tiny_models["llama"], tiny_models["qwen2"], vectors, tmp_path / "s.duckdb"))


def test_other_tokenizer_refused(tiny_llama, tmp_path, no_weights):
    """Same weights, another chat template; then another vocabulary."""
    from transformers import AutoTokenizer

    other = tmp_path / "other"
    shutil.copytree(tiny_llama, other)
    tok = AutoTokenizer.from_pretrained(tiny_llama)
    tok.chat_template = tok.chat_template.replace("You are a tiny test assistant.", "Be brief.")
    tok.save_pretrained(other)
    vectors = save_vectors(tiny_llama, tmp_path / "v", ["evil"])
    with pytest.raises(
        IncompatibleModelsError, match="chat template: a probe conversation renders differently"
    ):
        measure(config(tiny_llama, other, vectors, tmp_path / "s.duckdb"))

    tok = AutoTokenizer.from_pretrained(tiny_llama)
    tok.add_tokens(["<|persona|>"])
    tok.save_pretrained(other)
    with pytest.raises(
        IncompatibleModelsError, match=r"tokenizer vocabulary: \d+ tokens in the base, \d+ in the"
    ):
        measure(config(tiny_llama, other, vectors, tmp_path / "s.duckdb"))


@pytest.mark.parametrize(
    ("overrides", "named"),
    [
        ({"num_hidden_layers": 6}, "layer count: the adapter changes decoder layer 6, the base has 4"),
        (
            {"hidden_size": 32, "intermediate_size": 64},
            "hidden size: model.layers.0.self_attn.q_proj has 32 inputs",
        ),
    ],
)
def test_adapter_for_another_model_refused(tiny_llama, tmp_path, no_weights, overrides, named):
    from peft import LoraConfig, get_peft_model

    model = llama(tmp_path / "other", tiny_llama, **overrides)
    adapter = tmp_path / "adapter"
    get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj", "v_proj"])).save_pretrained(adapter)
    vectors = save_vectors(tiny_llama, tmp_path / "v", ["evil"])
    with pytest.raises(IncompatibleModelsError, match=named):
        measure(config(tiny_llama, adapter, vectors, tmp_path / "s.duckdb"))


def test_vector_without_trait_needs_questions(tiny_llama, tmp_path, no_weights):
    vectors = save_vectors(tiny_llama, tmp_path / "v", ["mytrait"])
    with pytest.raises(UserError, match=r"vector .mytrait.: no trait file .* pass --questions DATA"):
        measure(config(tiny_llama, tiny_llama, vectors, tmp_path / "s.duckdb"))


# -- the table and the command -------------------------------------------------------------------


def test_shifts_table_round_trips(nudged, tmp_path, capsys):
    """The command prints the table and stores the rows; a rerun of the same measurement replaces them;
    `screener query` reads them back."""
    base, finetuned, _ = nudged
    vectors = save_vectors(base, tmp_path / "v", ["evil", "hallucinating"])
    db = tmp_path / "s.duckdb"
    args = ["shift", str(base), str(finetuned), "--layer", f"{LAYER - 1},{LAYER}", "--dtype", "float32"]
    args += ["--device", str(TEST_DEVICE), "--actors", "0", "--db", str(db), "--limit", "5"]
    args += [a for v in vectors for a in ("--vector", v)]
    assert cli.main(args) == 0
    out = capsys.readouterr().out
    assert "trait" in out and "stderr" in out and "evil eval_questions" in out
    assert "{" not in out  # no JSON line among the text (--json prints one instead)
    first = read_shifts(db)
    assert len(first) == 4  # 2 traits x 2 layers x prompt_last
    assert cli.main([*args, "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert {r["shift_id"] for r in first} == set(printed["shift_ids"])
    assert len(printed["shifts"]) == 4
    assert {s["trait"] for s in printed["shifts"]} == {"evil", "hallucinating"}
    for r in first:
        assert r["base"] == str(base) and r["finetuned"] == str(finetuned) and r["finetuned_kind"] == "model"
        assert r["n_prompts"] == 5 and r["measure"] == "prompt_last" and r["created_at"] is not None
        assert len(r["base_sha256"]) == 64 and len(r["finetuned_sha256"]) == 64
        assert r["prompts"].startswith(f"{r['trait']} eval_questions")
        assert json.loads(r["settings"])["dtype"] == "float32"
        if r["layer"] == LAYER - 1:
            assert r["shift"] == 0.0
        else:
            assert r["shift"] != 0.0 and r["stderr"] is not None
            assert r["shift"] == pytest.approx(r["finetuned_mean"] - r["base_mean"], abs=1e-6)

    assert cli.main(args) == 0  # the same measurement again: replaced, not duplicated
    capsys.readouterr()
    again = read_shifts(db)
    assert [(r["shift_id"], r["shift"]) for r in again] == [(r["shift_id"], r["shift"]) for r in first]
    assert all(b["created_at"] > a["created_at"] for a, b in zip(first, again, strict=True))

    assert (
        cli.main(
            [
                "query",
                "SELECT trait, layer, shift FROM shifts ORDER BY ALL",
                "--db",
                str(db),
                "--format",
                "csv",
            ]
        )
        == 0
    )
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0] == "trait,layer,shift" and len(lines) == 5


def test_command_refusal_is_one_line(tiny_models, tmp_path, capsys):
    vectors = save_vectors(tiny_models["llama"], tmp_path / "v", ["evil"])
    code = cli.main(
        [
            "shift",
            str(tiny_models["llama"]),
            str(tiny_models["qwen2"]),
            "--vector",
            vectors[0],
            "--db",
            str(tmp_path / "s.duckdb"),
        ]
    )
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err.startswith("error: ") and "architecture" in err and "\n" not in err


def test_on_ray_actors_both_models_at_once(nudged, tmp_path):
    """Two actors: the two models run at the same time, one actor each; the result is the in-process one."""
    base, finetuned, _ = nudged
    vectors = save_vectors(base, tmp_path / "v", ["evil"])
    in_process = measure(config(base, finetuned, vectors, tmp_path / "a.duckdb"))
    on_actors = measure(config(base, finetuned, vectors, tmp_path / "b.duckdb", actors=2))
    assert [s.shift for s in on_actors.shifts] == pytest.approx(
        [s.shift for s in in_process.shifts], rel=1e-5
    )
