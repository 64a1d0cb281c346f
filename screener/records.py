"""The records that flow through a screen: dataset → `Sample` → model work → `Scored` → DuckDB.

Layer convention (written down once, tested in tests/test_scoring.py): layer L means
`hidden_states[L]` as transformers returns it. L = 0 is the embedding output, L in 1..n-1 is the raw
output of decoder block L (`model.layers[L-1]`), and L = n (num_layers) is the output after the final
norm. Vector files are indexed the same way: row L of a `[num_layers+1, hidden]` tensor.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

Message = dict[str, str]  # {"role": "system"|"user"|"assistant", "content": str}
MODES = ("proxy", "natural")  # ΔP against the last prompt token, or against the model's own answer
TURNS = ("last", "all")  # which assistant turns of a record are scored


@dataclass(slots=True)
class Sample:
    """One scored assistant turn: the messages before it (the prompt) and its content (the response)."""

    sample_id: str
    source_row: int  # 0-based record index over the whole dataset (all files, in order)
    turn: int  # 0-based index of the scored turn among the record's assistant turns
    prompt: list[Message]
    response: str
    source_file: str = ""


@dataclass(slots=True)
class Reject:
    """A record or turn that could not be scored, and why (the reason names the field)."""

    source_row: int
    sample_id: str
    reason: str
    source_file: str = ""


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
