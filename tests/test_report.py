"""Tests for `screener hist`, `top` and `report` (text and PNG histograms, top samples) and for
screener.report, the HTML report, also rendered in Chromium."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from helpers import TRAITS, cli, make_screen, openai_records, write_jsonl

from screener.report import html_report
from screener.results import Histogram, ReportData, TraitReport
from screener.runs import Run

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_hist_text_matches_numpy_and_writes_png(screens, tmp_path: Path, capsys) -> None:
    natural, _ = screens
    png = tmp_path / "h.png"
    args = ["--trait", "evil", "--layer", 20, "--bins", 7, "--png", png, "--run", natural.run_id]
    assert cli("hist", "--db", natural.db, *args) == 0
    out = capsys.readouterr().out.splitlines()
    x = np.array(list(natural.values("delta_p", "evil", 20).values()))
    assert out[0] == f"evil · delta_p · layer 20 · run {natural.run_id} · n = {len(x)}"
    counts = [int(line.rsplit(" ", 1)[1]) for line in out[1:]]
    assert counts == np.histogram(x, bins=7)[0].tolist()
    assert out[-1].startswith("[") and "]" in out[-1] and "█" in out[-1]  # last bin closed, bars drawn
    assert all(len(line) <= 100 for line in out)
    data = png.read_bytes()
    assert data.startswith(PNG_MAGIC) and len(data) > 5000


def test_hist_defaults_to_the_latest_run_and_its_proxy_metric(screens, tmp_path: Path, capsys) -> None:
    natural, proxy = screens
    assert cli("hist", "--db", natural.db, "--png", tmp_path / "all.png") == 0
    out = capsys.readouterr().out
    for trait in TRAITS:  # every trait, layer 10, delta_p_proxy: a proxy run has no delta_p
        assert f"{trait} · delta_p_proxy · layer 10 · run {proxy.run_id} · n = {len(proxy.samples)}" in out
        assert (tmp_path / f"all-{trait}.png").read_bytes().startswith(PNG_MAGIC)
    assert cli("hist", "--db", natural.db, "--metric", "delta_p", "--trait", "evil") == 0
    assert "NULL for every sample" in capsys.readouterr().out
    assert cli("hist", "--db", natural.db, "--trait", "kind") == 1
    assert "not 'kind'" in capsys.readouterr().err
    assert cli("hist", "--db", natural.db, "--layer", 3) == 1
    assert "layers [10, 20]" in capsys.readouterr().err


def test_bins_below_one_is_a_one_line_error(screens, tmp_path: Path, capsys) -> None:
    natural, _ = screens
    # refused where the arguments are parsed (exit code 2, as for every option value), one line
    for argv in (["hist", "--bins", 0], ["report", "--bins", -1, "--out", tmp_path / "r.html"]):
        with pytest.raises(SystemExit) as e:
            cli(*argv, "--db", natural.db)
        assert e.value.code == 2
        value = argv[2]
        assert capsys.readouterr().err == (
            f"error: screener {argv[0]}: argument --bins: takes a whole number of at least 1; not "
            f"'{value}' (see screener {argv[0]} --help)\n"
        )
    assert not (tmp_path / "r.html").exists()


def test_top_orders_and_shows_excerpts(screens, capsys) -> None:
    natural, proxy = screens
    assert cli("top", "--db", natural.db, "--run", natural.run_id, "--trait", "sycophantic", "-k", 5) == 0
    out = capsys.readouterr().out
    heads = re.findall(r"^#(\d+)\s+delta_p=(\S+)\s+(\S+) \(row (\d+)\)", out, re.M)
    want = sorted(natural.values("delta_p", "sycophantic", 10).items(), key=lambda kv: (-kv[1], kv[0]))[:5]
    assert [h[2] for h in heads] == [k for k, _ in want]
    assert [float(h[1]) for h in heads] == pytest.approx([v for _, v in want], rel=1e-3)
    by_id = {s.sample_id: s for s in natural.samples}
    first = by_id[heads[0][2]]
    assert f"prompt:   {first.prompt[-1]['content'].split()[0]}" in out  # the last user message
    assert "response: Answer" in out and "natural:  Natural answer" in out
    assert "…" in out  # long responses are cut
    assert all(len(line) <= 100 for line in out.splitlines())
    assert cli("top", "--db", natural.db, "-k", 3) == 0  # latest run: proxy, no natural responses
    out = capsys.readouterr().out
    assert f"top 3 by delta_p_proxy · layer 10 · run {proxy.run_id}" in out and "natural:" not in out
    assert out.count("\n#") + out.startswith("#") == 3 * len(TRAITS)


def test_hist_and_top_read_each_trait_at_its_own_vector_layer(tmp_path, capsys) -> None:
    """Vectors chosen at different layers: without --layer, each trait is shown at its own vector's layer
    (recorded by the screen), a layer the run lacks falls back to the first, and --layer sets one for all."""
    data = write_jsonl(tmp_path / "in.jsonl", openai_records(12))
    vectors = {"evil": {"path": "e.pt", "sha256": "0", "layer": 20}, "sycophantic": {"layer": 7}}
    screen = make_screen(tmp_path / "s.duckdb", data, mode="proxy", settings={"vectors": vectors})
    assert cli("top", "--db", screen.db, "-k", 3) == 0
    out = capsys.readouterr().out
    assert "== evil: top 3 by delta_p_proxy · layer 20" in out
    assert "== sycophantic: top 3 by delta_p_proxy · layer 10" in out  # 7 is not among the run's layers
    best = max(screen.values("delta_p_proxy", "evil", 20).items(), key=lambda kv: kv[1])
    assert re.search(rf"^#1\s+delta_p_proxy=\S+\s+{re.escape(best[0])} ", out, re.M)
    assert cli("hist", "--db", screen.db, "--trait", "evil") == 0
    assert "evil · delta_p_proxy · layer 20" in capsys.readouterr().out
    assert cli("top", "--db", screen.db, "-k", 1, "--layer", 10) == 0
    assert capsys.readouterr().out.count("· layer 10 ·") == 2


def run_chromium(url: str, tmp: Path, *extra: str) -> tuple[str, list[str]]:
    """(rendered DOM, console messages) of a page in headless Chromium."""
    cmd = [
        shutil.which("chromium"),
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        f"--user-data-dir={tmp / 'profile'}",
        "--enable-logging=stderr",
        "--v=0",
        *extra,
        url,
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr[-2000:]
    console = [line for line in proc.stderr.splitlines() if ":CONSOLE" in line]  # console.* and JS errors
    return proc.stdout, console


def test_report_html(screens, tmp_path: Path, capsys) -> None:
    natural, _ = screens
    out = tmp_path / "report.html"
    assert cli("report", "--db", natural.db, "--run", natural.run_id, "--out", out, "-k", 4) == 0
    page = out.read_text()
    for section in (
        "run-metadata",
        "dataset-summary",
        *(f"{p}-{t}" for t in TRAITS for p in ("hist", "top")),
    ):
        assert f'id="{section}"' in page
    assert "<script" not in page and "&lt;script&gt;" in page  # data is escaped, the page has no scripts
    assert "http://" not in page.replace('xmlns="http://www.w3.org/2000/svg"', "")  # self-contained
    assert natural.run_id in page and "Natural answer" in page


def test_report_renders_data_without_a_database() -> None:
    run = Run("m", "00" * 32, "d.jsonl", "proxy", (3,), ("evil", "kind<"), {"seed": 1}, n_scored=2)
    top = {
        "rank": 1,
        "value": 1.5,
        "sample_id": "s1",
        "source_row": 0,
        "prompt": [{"role": "user", "content": "q & a"}],
        "response": "r",
        "natural_response": None,
    }
    evil = TraitReport(Histogram(run.run_id, "evil", 3, "delta_p_proxy", [0.0], [1.5], [2]), None, [top])
    empty = TraitReport(Histogram(run.run_id, "kind<", 3, "delta_p_proxy", [], [], []), None, [])
    page = html_report(ReportData(run, 3, "delta_p_proxy", [], {"evil": evil, "kind<": empty}))
    assert 'id="hist-evil"' in page and 'id="top-kind-"' in page and "Top samples: kind&lt;" in page
    assert page.count("<rect") == 1 and "No values: this score is NULL for every sample." in page
    assert "q &amp; a" in page and "No scored samples." in page and "No samples with a delta_p_proxy" in page
    assert run.run_id in page and "<td>samples scored</td><td>2</td>" in page
    assert "polyline" not in page  # no reference distribution: nothing drawn beside the bars


def test_report_draws_the_reference_beside_the_dataset() -> None:
    run = Run("m", "00" * 32, "d.jsonl", "proxy", (3,), ("evil",), {"seed": 1}, n_scored=4)
    quantiles = [x / 50 - 1 for x in range(101)]  # uniform on [-1, 1]: p95 0.9
    h = Histogram(run.run_id, "evil", 3, "delta_p_proxy", [0.0, 0.5], [0.5, 1.0], [1, 3], quantiles, 200)
    page = html_report(ReportData(run, 3, "delta_p_proxy", [], {"evil": TraitReport(h, None, [])}))
    assert page.count("<polyline") == 1 and "ordinary chat (reference, n = 200)" in page
    assert "reference p95 0.9" in page and "its p95 0.9" in page
    assert "15.0% of this dataset lies above it" in page  # a fifth of the 3 samples in [0.5, 1], of 4


@pytest.mark.skipif(not shutil.which("chromium"), reason="needs chromium (apt-get install chromium)")
def test_report_renders_in_chromium(screens, tmp_path: Path) -> None:
    natural, _ = screens
    out = tmp_path / "report.html"
    assert cli("report", "--db", natural.db, "--run", natural.run_id, "--out", out) == 0
    dom, console = run_chromium(out.as_uri(), tmp_path, "--dump-dom")
    assert console == []
    for section in (
        "run-metadata",
        "dataset-summary",
        *(f"{p}-{t}" for t in TRAITS for p in ("hist", "top")),
    ):
        assert re.search(f'<section id="{section}">', dom), section
    assert dom.count("<svg") == len(TRAITS) and dom.count("<rect") == 30 * len(TRAITS)
    assert dom.count("<details") == 3 * 10 * len(TRAITS)  # prompt, response, natural per top sample
    # The console capture works: a page with a script error is caught.
    bad = tmp_path / "bad.html"
    bad.write_text("<!DOCTYPE html><p>x</p><script>console.error('boom'); notDefined();</script>")
    _, console = run_chromium(bad.as_uri(), tmp_path, "--dump-dom")
    assert any("boom" in line for line in console) and any("notDefined" in line for line in console)


# ---- outputs and the run read (issue 17) ---------------------------------------------------------------


def test_report_and_hist_never_write_over_the_database(screens, tmp_path: Path, capsys) -> None:
    """`screener report --out s.duckdb --db s.duckdb` destroyed the results database."""
    natural, _ = screens
    db_bytes = natural.db.read_bytes()
    for argv in (["report", "--out", natural.db], ["hist", "--trait", "evil", "--png", natural.db]):
        for force in ([], ["--force"]):
            assert cli(*argv, *force, "--db", natural.db) == 1
            err = capsys.readouterr().err
            assert err.endswith(
                f"error: {natural.db} is the results database: refusing to write over it; "
                "choose another output path\n"
            )
    assert natural.db.read_bytes() == db_bytes


def test_report_and_hist_create_their_folder_and_replace_only_with_force(
    screens, tmp_path: Path, capsys
) -> None:
    natural, proxy = screens
    report, png = tmp_path / "new" / "r.html", tmp_path / "other" / "sub" / "h.png"
    assert cli("report", "--db", natural.db, "--out", report) == 0
    assert cli("hist", "--db", natural.db, "--trait", "evil", "--png", png) == 0
    assert report.read_text().startswith("<!DOCTYPE html>") and png.read_bytes().startswith(PNG_MAGIC)
    err = capsys.readouterr().err
    assert err.count(f"reading run {proxy.run_id} (finished ") == 2  # each says which run it read
    for argv, out in (
        (["report", "--out", report], report),
        (["hist", "--trait", "evil", "--png", png], png),
    ):
        before = out.read_bytes()
        assert cli(*argv, "--db", natural.db) == 1
        assert capsys.readouterr().err.endswith(f"error: {out} exists; pass --force to replace it\n")
        assert out.read_bytes() == before
        assert cli(*argv, "--db", natural.db, "--force", "--run", natural.run_id) == 0
        assert out.read_bytes() != before and len(list(out.parent.iterdir())) == 1  # no temp file left


def test_top_after_a_failed_screen_reads_the_finished_run_or_says_there_is_none(
    tmp_path: Path, capsys
) -> None:
    """After a failed screen, `top` printed "top 0" with exit code 0."""
    from helpers import make_screen, openai_records, write_jsonl

    from screener.store import Store

    data = write_jsonl(tmp_path / "in.jsonl", openai_records(8))
    first = make_screen(tmp_path / "s.duckdb", data, mode="proxy", finish=False)
    with Store(tmp_path / "s.duckdb") as store:
        store.fail_run(first.run_id, "VectorError: zero")
    assert cli("top", "--db", tmp_path / "s.duckdb") == 1
    assert capsys.readouterr().err == (
        f"error: no finished run in this database; the latest is run {first.run_id} (FAILED: VectorError: "
        f"zero; 6 scored, 2 rejected): pass --run {first.run_id} to read what it stored\n"
    )
    assert cli("top", "--db", tmp_path / "s.duckdb", "--run", first.run_id, "-k", 1) == 0
    captured = capsys.readouterr()
    assert f"top 1 by delta_p_proxy · layer 10 · run {first.run_id}" in captured.out
    assert captured.err.startswith(f"reading run {first.run_id} (FAILED: VectorError: zero;")
    done = make_screen(tmp_path / "s.duckdb", data, mode="natural")  # a later run that finished
    assert cli("top", "--db", tmp_path / "s.duckdb", "-k", 1) == 0
    assert f"run {done.run_id}" in capsys.readouterr().out
    later = make_screen(tmp_path / "s.duckdb", data, mode="natural", turns="all", finish=False)
    assert cli("top", "--db", tmp_path / "s.duckdb", "-k", 1) == 0
    captured = capsys.readouterr()
    assert f"run {done.run_id}" in captured.out and later.run_id not in captured.out
    assert (
        captured.err.splitlines()[1]
        == f"note: 1 later run did not finish ({later.run_id}); read one with --run ID"
    )
