"""Tiny random-weight models built from a config, saved as HF folders: fast, deterministic, offline; and
the synthetic screens the results tests share (tests/helpers.py)."""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path

import duckdb
import pytest
import torch
from tiny import CHATML, CORPUS, make_tokenizer, random_model, reference, tiny_config  # noqa: F401

# the installed command, as a user runs it
SCREENER = str(Path(sys.executable).parent / "screener")

# Keep tests hermetic: no hub, no model cache of the user's.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
# batch sizes tuned by test screens are remembered here, not in the user's cache
os.environ.setdefault(
    "SCREENER_TUNING", os.path.join(tempfile.mkdtemp(prefix="screener-tuning-"), "tuning.json")
)

# The scorer's exact tests (test_scoring.py) run on this device: `SCREENER_TEST_DEVICE=cuda` checks the GPU
# path against the same fp32 references. CI has no GPU, so the default is the CPU.
TEST_DEVICE = torch.device(os.environ.get("SCREENER_TEST_DEVICE", "cpu"))


def make_model(kind: str, folder: Path, vocab_size: int, eos_id: int, seed: int = 0) -> Path:
    """A 4-block random model of the given architecture, saved to `folder` with the test tokenizer."""
    random_model(tiny_config(kind, vocab_size, eos_id), seed).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    """{"llama": folder, "qwen2": folder}: HF folders loadable with `screener.models.load_model`."""
    root = tmp_path_factory.mktemp("tiny")
    out = {}
    for kind in ("llama", "qwen2"):
        folder = root / kind
        tok = make_tokenizer(folder)
        make_model(kind, folder, vocab_size=len(tok), eos_id=tok.convert_tokens_to_ids("<|im_end|>"))
        out[kind] = folder
    return out


@pytest.fixture(scope="session")
def tiny_llama(tiny_models) -> Path:
    return tiny_models["llama"]


def tiny_ref(folder: Path):
    """A `ModelRef` for a tiny model folder, without the hub or the default-model cache."""
    from screener.models import ModelRef, weights_sha256

    cfg = json.loads((folder / "config.json").read_text())
    return ModelRef(
        str(folder), folder.name, str(folder), weights_sha256(folder), cfg["num_hidden_layers"], 64
    )


def plain_hidden_states(model, ids: list[int]) -> torch.Tensor:
    """`[num_layers+1, T, H]` from an unpadded full-model forward: the reference for everything."""
    with torch.no_grad():
        out = model(input_ids=torch.tensor([ids], device=model.device), output_hidden_states=True)
    return torch.stack(out.hidden_states)[:, 0].float()


def random_vectors(folder: Path, n: int, seed: int = 1) -> list[torch.Tensor]:
    """`n` random float32 `[num_layers+1, hidden]` persona vectors for the model in `folder`."""
    cfg = json.loads((folder / "config.json").read_text())
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(cfg["num_hidden_layers"] + 1, cfg["hidden_size"], generator=g) for _ in range(n)]


# ---- shared helpers -------------------------------------------------------------------------------


def write_chat_jsonl(path: Path, n: int) -> Path:
    with path.open("w") as f:
        for i in range(n):
            messages = [
                {"role": "user", "content": f"Question {i} about the quick brown fox"},
                {"role": "assistant", "content": "Answer " + "word " * (i % 13)},
            ]
            f.write(json.dumps({"id": f"r{i}", "messages": messages}) + "\n")
    return path


@pytest.fixture(scope="module")
def vector_file(tiny_llama, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("vec") / "a.pt"
    torch.save(random_vectors(tiny_llama, 1)[0], path)
    return path


def screen_args(data: Path, model: Path, vector: Path, db: Path, *extra: str) -> list[str]:
    """A `screener screen` command line. The batch size is fixed, so screens that batch the same chunks
    give bitwise-equal values (tuned sizes change batches, and with them fp32 rounding, run to run)."""
    return [
        SCREENER, "screen", str(data), "--model", str(model), "--vector", f"a={vector}",
        "--layer", "1,3", "--dtype", "float32", "--batch-tokens", "8192", "--db", str(db), *extra,
    ]  # fmt: skip


def scores(db: Path) -> list[tuple]:
    with duckdb.connect(str(db), read_only=True) as con:
        return con.execute(
            "SELECT sample_id, layer, trait, proj_response, proj_prompt_last FROM scores ORDER BY ALL"
        ).fetchall()


@pytest.fixture(scope="module")
def screens(tmp_path_factory):
    """A natural-mode run, then a proxy-mode run (the latest) of one 30-record dataset (two unscorable
    rows), in one database: helpers.FakeScreen each."""
    from helpers import make_screen, openai_records, write_jsonl

    folder = tmp_path_factory.mktemp("screens")
    data = write_jsonl(folder / "in.jsonl", openai_records(30))
    natural = make_screen(folder / "s.duckdb", data, mode="natural", seed=0)
    time.sleep(0.01)  # distinct started_at: the proxy run is the latest
    proxy = make_screen(folder / "s.duckdb", data, mode="proxy", seed=1)
    return natural, proxy
