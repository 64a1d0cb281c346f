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
import numpy as np
import pytest
import torch

from screener.records import Sample

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

CHATML = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a tiny test assistant.<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "You are a helpful assistant. Answer the question politely and truthfully.",
    "I think that is a wonderful idea, you are absolutely right!",
    "Evil plans, cruel words and sycophantic praise: the traits we screen for.",
    "Hello, how can I help you today? Here is a short answer with some numbers 12345.",
]


def make_tokenizer(folder: Path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(CORPUS * 4, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|im_end|>", bos_token="<|endoftext|>"
    )
    fast.chat_template = CHATML
    fast.save_pretrained(folder)
    return fast


def make_model(kind: str, folder: Path, vocab_size: int, eos_id: int, seed: int = 0) -> Path:
    """A 4-block random model of the given architecture, saved to `folder` with the test tokenizer."""
    from transformers import LlamaConfig, Qwen2Config

    common = dict(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        eos_token_id=eos_id,
        pad_token_id=eos_id,
        bos_token_id=0,
        tie_word_embeddings=False,
    )
    cfg = LlamaConfig(**common) if kind == "llama" else Qwen2Config(**common)
    from helpers import random_model

    random_model(cfg, seed).save_pretrained(folder)
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
        out = model(input_ids=torch.tensor([ids]), output_hidden_states=True)
    return torch.stack(out.hidden_states)[:, 0].float()


def random_vectors(folder: Path, n: int, seed: int = 1) -> list[torch.Tensor]:
    """`n` random float32 `[num_layers+1, hidden]` persona vectors for the model in `folder`."""
    cfg = json.loads((folder / "config.json").read_text())
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(cfg["num_hidden_layers"] + 1, cfg["hidden_size"], generator=g) for _ in range(n)]


# ---- shared helpers -------------------------------------------------------------------------------


def reference(model, tok, sample: Sample, vectors, layers) -> tuple[np.ndarray, np.ndarray]:
    """One sample at a time, the whole model, `output_hidden_states=True`: the paper's procedure."""
    text = tok.apply_chat_template(sample.prompt, add_generation_prompt=True, tokenize=False)
    p = tok(text, add_special_tokens=False)["input_ids"]
    r = tok(sample.response, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        out = model(torch.tensor([p + r], device=model.device), output_hidden_states=True)
    hs = [h.cpu() for h in out.hidden_states]
    resp = np.zeros((len(layers), len(vectors)))
    last = np.zeros((len(layers), len(vectors)))
    for i, layer in enumerate(layers):
        for k, v in enumerate(vectors):
            u = (v[layer] / v[layer].norm()).double()
            resp[i, k] = (hs[layer][0, len(p) :].double() @ u).mean().item()
            last[i, k] = (hs[layer][0, len(p) - 1].double() @ u).item()
    return resp, last


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
