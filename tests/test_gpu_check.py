"""benchmarks/gpu_check.py runs where the GPU machine's packages are all there is: torch and transformers,
no Ray, DuckDB, polars, datasets or gguf (they are blocked here); `--device cpu --tiny` stands in for it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
# a subprocess prelude that makes the packages the GPU machine lacks unimportable
BLOCK = """
import importlib.abc, sys
BLOCKED = {"ray", "duckdb", "polars", "datasets", "gguf"}
class Blocker(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.partition(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"No module named {name!r} (blocked)", name=name)
sys.meta_path.insert(0, Blocker())
"""


def run_blocked(code: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", BLOCK + code], cwd=REPO, capture_output=True, text=True, timeout=timeout
    )


def test_scorer_and_models_import_without_ray_duckdb_polars():
    out = run_blocked(
        "import screener.scoring, screener.models, screener.records\n"
        "loaded = sorted(m for m in sys.modules if m.partition('.')[0] in BLOCKED | {'pyarrow'})\n"
        "print('loaded:', loaded)\n"
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "loaded: []" in out.stdout


def test_blocker_blocks():
    out = run_blocked("import duckdb\n")
    assert out.returncode != 0 and "blocked" in out.stderr


def test_gpu_check_runs_on_cpu_with_tiny_shapes(tmp_path):
    report = tmp_path / "gpu_check.json"
    argv = ["benchmarks/gpu_check.py", "--device", "cpu", "--tiny", "--json", str(report)]
    out = run_blocked(
        f"import runpy; sys.argv = {argv!r}\nrunpy.run_path('benchmarks/gpu_check.py', run_name='__main__')\n"
    )
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    assert out.stdout.startswith("machine: ")
    got = json.loads(report.read_text())
    assert got["ok"] and set(got["exactness"]) == {"llama", "qwen2"}
    for kind in got["exactness"].values():
        assert kind["ok"] and kind["natural_checked"] >= 3 and kind["one_pass_turns"] == 9
    assert set(got["models"]) == {"Qwen2.5-7B", "Llama-3.1-8B"}
    for model in got["models"].values():
        assert [r["batch_tokens"] for r in model["proxy"]] == [256, 1024]
        assert all(r["tokens_per_s"] > 0 and r["mfu_measured"] > 0 for r in model["proxy"])
        assert model["natural"] and model["natural"][0]["new_tokens"] > 0
        assert model["peak_memory_gib"] > 0
