"""The records that flow through a screen: dataset → `Sample` → model work → `Scored` → DuckDB.

Layer convention (written down once, tested in tests/test_scoring.py): layer L means
`hidden_states[L]` as transformers returns it. L = 0 is the embedding output, L in 1..n-1 is the raw
output of decoder block L (`model.layers[L-1]`), and L = n (num_layers) is the output after the final
norm. Vector files are indexed the same way: row L of a `[num_layers+1, hidden]` tensor.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from screener.choices import MODES as MODES
from screener.choices import TURNS as TURNS

# {"role": "system"|"user"|"assistant"|"tool", "content": str}; an assistant message may carry
# "tool_calls" (OpenAI's list of calls), a tool message "tool_call_id" and "name", as chat templates take them
Message = dict[str, Any]
# Why a record, turn or file has no scores (the `kind` column of `rejects`):
#   bad      a record or turn that cannot be scored (the reason names the field)
#   skipped  an assistant turn with nothing to score: tool calls only, no text
#   file     a file that could not be read (source_row -1, sample_id the file); the rows before the
#            failure, if any, were read as usual
REJECT_KINDS = ("bad", "skipped", "file")


@dataclass(slots=True)
class Sample:
    """One scored assistant turn: the messages before it (the prompt) and its content (the response)."""

    sample_id: str
    source_row: int  # 0-based record index over the whole dataset (all files, in order)
    turn: int  # 0-based index of the scored turn among the record's assistant turns
    prompt: list[Message]
    response: str
    source_file: str = ""


def content_sha256(prompt: list[Message], response: str) -> str:
    """The hash of a sample's content as the model reads it: its prompt's messages and its response. The
    store keeps it per sample, so a reader of the input later (export, explain) knows a record was edited
    since the screen even when its id and row are the same."""
    return _sha256(_canonical([prompt, response]))


def _canonical(value: object) -> str:
    return json.dumps(value, ensure_ascii=False, sort_keys=True, separators=(",", ":"))


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()


def content_sha256s(samples: Sequence[Sample]) -> list[str]:
    """`content_sha256` of each sample, the same hashes, with each message encoded once: the turns of a
    record share their prompts' message objects (turn k's prompt is a prefix of turn k+1's), and encoding
    every prompt whole again was quadratic in a conversation's turns. The JSON of a list under these
    separators is its items' JSON joined by ",", so the text hashed is the one `content_sha256` hashes."""
    encoded: dict[int, str] = {}  # id(message) -> its JSON; the samples hold every message alive meanwhile
    out = []
    for s in samples:
        parts = []
        for m in s.prompt:
            if (text := encoded.get(id(m))) is None:
                text = encoded[id(m)] = _canonical(m)
            parts.append(text)
        out.append(_sha256("[[" + ",".join(parts) + "]," + _canonical(s.response) + "]"))
    return out


@dataclass(slots=True)
class Reject:
    """A record, turn or file that could not be scored, and why (the reason names the field)."""

    source_row: int
    sample_id: str
    reason: str
    source_file: str = ""
    kind: str = "bad"  # one of REJECT_KINDS


@dataclass(slots=True)
class Scored:
    """Per-sample scalars returned by the model work; never hidden states.

    Arrays are `[n_layers, n_traits]` in the order of the run's `layers` and `traits`.
    `proj_natural` is None in proxy mode, and NaN where the natural response was empty.
    """

    sample_id: str
    source_row: int
    turn: int
    prompt_tokens: int
    response_tokens: int
    truncated: bool
    proj_response: np.ndarray
    proj_prompt_last: np.ndarray
    proj_natural: np.ndarray | None = None
    natural_response: str | None = None
    natural_tokens: int | None = None
    source_file: str = ""
    extra: dict = field(default_factory=dict)
