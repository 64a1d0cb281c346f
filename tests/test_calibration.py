"""Calibration: the stored distribution is exactly the reference screen's, a screen copies it in when the
vector file and model weights match, `scored.ref_percentile` interpolates in it as `percentile_of` does,
`export --threshold pNN` drops above it, and the packaged ShareGPT file's first 5,000 records are refused."""

from __future__ import annotations

import json
from pathlib import Path

import duckdb
import numpy as np
import pytest
import torch
from conftest import random_vectors, write_chat_jsonl
from helpers import cli, make_screen, openai_records, write_jsonl

from screener.calibration import (
    CalibrateConfig,
    CalibrationError,
    calibrate,
    check_start,
    reference_samples,
)
from screener.datasets import packaged_sharegpt
from screener.reference import distribution, percentile_of
from screener.results import open_db
from screener.scoring import GenerationSettings
from screener.screen import ScreenConfig, screen
from screener.store import Store
from screener.vectors import load_vector


def test_distribution_and_percentile_by_hand():
    d = distribution([float(x) for x in range(101)] + [float("nan")])
    assert d["n"] == 101 and d["quantiles"] == [float(x) for x in range(101)] and d["mean"] == 50.0
    assert percentile_of(37.25, d["quantiles"]) == pytest.approx(37.25)
    assert percentile_of(-1, d["quantiles"]) == 0.0 and percentile_of(100, d["quantiles"]) == 100.0
    q = [0.0] * 50 + [1.0] * 51  # ties: a value at a tied quantile takes the highest of them
    assert percentile_of(0.0, q) == pytest.approx(49.0) and percentile_of(0.5, q) == pytest.approx(49.5)
    assert distribution([])["n"] == 0


def test_the_first_5000_packaged_records_are_refused():
    with pytest.raises(CalibrationError, match="first 5,000 records of the packaged ShareGPT"):
        check_start(str(packaged_sharegpt()), 0)
    samples, read = reference_samples(str(packaged_sharegpt()), 5000, 3, "last")
    assert read["rows"][0] >= 5000 and all(s.source_row >= 5000 for s in samples) and len(samples) == 3


@pytest.fixture(scope="module")
def calibrated(tiny_llama, tmp_path_factory):
    """A vector calibrated on 9 reference turns at layers 1 and 3, and the reference screen kept."""
    folder = tmp_path_factory.mktemp("cal")
    vec = folder / "a_response_avg_diff.pt"
    torch.save(random_vectors(tiny_llama, 1)[0], vec)
    (folder / "a_response_avg_diff.json").write_text(json.dumps({"trait": "a", "chosen_layer": 3}))
    ref = write_chat_jsonl(folder / "ref.jsonl", 12)
    cfg = CalibrateConfig(
        vectors=[str(vec)], reference=str(ref), start=2, limit=9, model=str(tiny_llama), layers=[1, 3],
        dtype="float32", actors=0, db=str(folder / "ref.duckdb"), progress=False, batch_tokens=8192,
    )  # fmt: skip
    out = calibrate(cfg)
    return folder, vec, ref, out[str(vec)]


def test_calibration_is_the_reference_screens_distribution(calibrated):
    folder, vec, _, cal = calibrated
    side = load_vector(vec).sidecar
    assert side["calibration"] == cal and side["chosen_layer"] == 3  # the rest of the sidecar kept
    assert cal["reference"]["rows"] == [2, 10] and cal["reference"]["samples"] == 9
    assert len(cal["reference"]["samples_sha256"]) == 64 and cal["vector_sha256"] == load_vector(vec).sha256
    with duckdb.connect(str(folder / "ref.duckdb"), read_only=True) as con:
        for layer in (1, 3):
            values = [
                r[0]
                for r in con.execute("SELECT delta_p_proxy FROM scores WHERE layer = ?", [layer]).fetchall()
            ]
            assert len(values) == 9
            got = cal["distributions"]["delta_p_proxy"][str(layer)]
            np.testing.assert_allclose(got["quantiles"], np.percentile(values, np.arange(101)), atol=1e-5)
    assert "delta_p" not in cal["distributions"]  # proxy only without --natural


def test_natural_delta_p_on_the_first_samples(tiny_llama, tmp_path):
    vec = tmp_path / "a.pt"
    torch.save(random_vectors(tiny_llama, 1)[0], vec)
    ref = write_chat_jsonl(tmp_path / "ref.jsonl", 6)
    cfg = CalibrateConfig(
        vectors=[str(vec)], reference=str(ref), limit=5, natural=True, natural_limit=3, model=str(tiny_llama),
        layers=[2], dtype="float32", actors=0, db=str(tmp_path / "ref.duckdb"), progress=False,
        generation=GenerationSettings(max_new_tokens=4),
    )  # fmt: skip
    cal = calibrate(cfg)[str(vec)]
    assert cal["distributions"]["delta_p_proxy"]["2"]["n"] == 5 and cal["reference"]["scored_natural"] == 3
    with duckdb.connect(str(tmp_path / "ref.duckdb"), read_only=True) as con:
        natural = con.execute(
            "SELECT delta_p FROM scores JOIN runs USING (run_id) "
            "WHERE mode = 'natural' AND delta_p IS NOT NULL"
        ).fetchall()
    got = cal["distributions"]["delta_p"]["2"]
    assert got["n"] == len(natural) > 0
    np.testing.assert_allclose(
        got["quantiles"], np.percentile([r[0] for r in natural], np.arange(101)), atol=1e-5
    )
    assert cal["settings"]["natural"]["samples"] == 3


def test_a_screen_gives_ref_percentile(calibrated, tiny_llama, tmp_path, capsys):
    _, vec, ref, cal = calibrated
    db = tmp_path / "s.duckdb"
    cfg = ScreenConfig(
        dataset=str(ref), db=str(db), model=str(tiny_llama), vectors=[f"a={vec}"], layers=[1, 3],
        dtype="float32", actors=0, progress=False, batch_tokens=8192,
    )  # fmt: skip
    screen(cfg)
    with open_db(db) as store:
        rows = store.con.execute("SELECT layer, metric, ref_percentile FROM scored").fetchall()
    assert len(rows) == 24
    for layer, metric, pct in rows:
        q = cal["distributions"]["delta_p_proxy"][str(layer)]["quantiles"]
        assert pct == pytest.approx(percentile_of(metric, q), abs=1e-6)
    # the ends are reached (rows 0, 1, 11 are outside the reference); a reference row scored in another
    # batch differs in float32 rounding, so the extreme may be it, a rounding away from 0 or 100
    pcts = [p for *_, p in rows]
    assert all(0.0 <= p <= 100.0 for p in pcts)
    assert min(pcts) == pytest.approx(0.0, abs=1e-4) and max(pcts) == pytest.approx(100.0, abs=1e-4)
    capsys.readouterr()
    assert cli("hist", "--db", db, "--layer", 3) == 0  # the reference beside the dataset
    assert "reference: ordinary chat (n = 9)" in capsys.readouterr().out

    # calibrated with other weights: the run gets no reference (a warning), ref_percentile stays NULL
    side = json.loads(vec.with_suffix(".json").read_text())
    other = tmp_path / "b.pt"
    other.write_bytes(vec.read_bytes())
    side["calibration"]["model_sha256"] = "0" * 64
    other.with_suffix(".json").write_text(json.dumps(side))
    db2 = tmp_path / "s2.duckdb"
    screen(ScreenConfig(**{**cfg.__dict__, "db": str(db2), "vectors": [f"a={other}"]}))
    with open_db(db2) as store:
        assert store.con.execute("SELECT count(ref_percentile), count(*) FROM scored").fetchone() == (0, 24)


def test_export_threshold_at_a_reference_percentile(tmp_path: Path):
    data = write_jsonl(tmp_path / "in.jsonl", openai_records(30))
    fake = make_screen(tmp_path / "s.duckdb", data, mode="proxy")
    quantiles = [float(x) for x in np.linspace(-2, 2, 101)]
    rows = [
        {"trait": t, "layer": 10, "metric": "delta_p_proxy", "n": 101, "quantiles": quantiles,
         "reference": "{}", "reference_sha256": "0" * 64}
        for t in ("evil", "sycophantic")
    ]  # fmt: skip
    out = tmp_path / "o.jsonl"
    # the run's traits are read at layer 10 (--layer); without a reference at that layer: a clear error
    assert cli("export", out, "--db", fake.db, "--threshold", "p95", "--layer", 10) == 1
    with Store(fake.db) as store:
        store.write_references(fake.run_id, rows)
    assert cli("export", out, "--db", fake.db, "--threshold", "p95", "--layer", 10) == 0
    over = set()
    for trait in ("evil", "sycophantic"):
        cut = np.percentile(quantiles, 95)
        over |= {s for s, v in fake.values("delta_p_proxy", trait, 10).items() if v > cut}
    kept = {json.loads(line)["id"] for line in out.read_text().splitlines()}
    ids = {s.sample_id: s for s in fake.samples}
    assert kept == {i for i in ids if i not in over} | {r["id"] for r in openai_records(30)} - set(ids)
    assert over and cli("export", out, "--db", fake.db, "--threshold", "p101", "--force", "--layer", 10) == 1


def test_an_older_database_reads_without_the_table(tmp_path: Path):
    data = write_jsonl(tmp_path / "in.jsonl", openai_records(8))
    fake = make_screen(tmp_path / "s.duckdb", data, mode="proxy")
    with duckdb.connect(str(fake.db)) as con:
        con.execute("DROP VIEW IF EXISTS scored CASCADE; DROP TABLE reference_distributions")
    with open_db(fake.db) as store:
        assert store.con.execute("SELECT count(*), count(ref_percentile) FROM scored").fetchone()[1] == 0
