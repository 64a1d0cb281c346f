"""A run: one screen's configuration (its identity) and, once stored, its state.

The identity is everything that determines the values: the model's weights, the dataset, the mode, the
layers, the traits and the settings (dtype, max tokens, turns, split, vector files, generation). Its hash
is the `run_id`, so rerunning the same configuration resumes the same run. `settings["runtime"]` (batch
sizes, workers: how the work was done, not what it computes) is stored but left out of the hash.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime

from screener.errors import QueryError
from screener.records import MODES

STATUSES = ("running", "failed", "finished")
# settings keys that record how a run was executed, not what it computes: not part of its identity
RUNTIME_KEY = "runtime"


@dataclass(frozen=True)
class Run:
    """A screen's identity (the first seven fields) and, when read back from a database, its state."""

    model: str  # the model spec as given (path, hub id or "default")
    model_sha256: str
    dataset_uri: str
    mode: str  # one of records.MODES
    layers: tuple[int, ...]
    traits: tuple[str, ...]
    settings: dict = field(default_factory=dict, hash=False, compare=False)
    # state, as stored: not part of the identity
    status: str = field(default="running", compare=False)
    error: str | None = field(default=None, compare=False)
    started_at: datetime | None = field(default=None, compare=False)
    finished_at: datetime | None = field(default=None, compare=False)
    n_scored: int = field(default=0, compare=False)
    n_rejected: int = field(default=0, compare=False)
    n_unreadable_files: int = field(default=0, compare=False)
    n_skipped: int = field(default=0, compare=False)  # assistant turns with tool calls only
    # rows the finished screen read to the input's end (None: --limit stopped it, not finished, or an
    # earlier version's run): a row past them was added to the input since
    input_rows: int | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, not {self.mode!r}")
        # callers pass lists or numpy ints: normalise so equal configurations hash equal
        object.__setattr__(self, "layers", tuple(int(x) for x in self.layers))
        object.__setattr__(self, "traits", tuple(str(t) for t in self.traits))

    @property
    def run_id(self) -> str:
        """First 16 hex of the sha256 of the canonical JSON of the identity: same configuration, same id."""
        identity = {
            "model": self.model,
            "model_sha256": self.model_sha256,
            "dataset_uri": self.dataset_uri,
            "mode": self.mode,
            "layers": list(self.layers),
            "traits": list(self.traits),
            "settings": {k: v for k, v in self.settings.items() if k != RUNTIME_KEY},
        }
        canonical = json.dumps(identity, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
        return hashlib.sha256(canonical.encode()).hexdigest()[:16]

    @property
    def metric(self) -> str:
        """The run's headline score: ΔP when it generated natural responses, else its proxy."""
        return "delta_p" if self.mode == "natural" else "delta_p_proxy"

    def describe(self) -> str:
        """One line for the read commands: which run they read, and its state."""
        when = f"{self.finished_at:%Y-%m-%d %H:%M} UTC" if self.finished_at else None
        counts = f"{self.n_scored:,} scored, {self.n_rejected:,} rejected"
        if self.n_skipped:
            counts += f", {self.n_skipped:,} tool-call turns skipped"
        if self.n_unreadable_files:
            counts += f", {self.n_unreadable_files:,} unreadable file{'s' * (self.n_unreadable_files != 1)}"
        if self.status == "finished":
            state = f"finished {when}" if when else "finished"
        elif self.status == "failed":
            state = f"FAILED: {self.error}" if self.error else "FAILED"
        else:
            state = "NOT FINISHED (still running, or stopped)"
        return f"run {self.run_id} ({state}; {counts})"

    def layer(self, layer: int | None, trait: str | None = None) -> int:
        """The given layer, checked against the run; else `trait`'s own vector layer when the run recorded
        it (vectors chosen at different layers are each read at their own); else the run's first layer."""
        if layer is None:
            own = (self.settings.get("vectors") or {}).get(trait or "", {}).get("layer")
            return own if own in self.layers else self.layers[0]
        if layer not in self.layers:
            raise QueryError(f"run {self.run_id} has layers {list(self.layers)}, not {layer}")
        return layer

    def by_layer(self, traits: Sequence[str] = (), layer: int | None = None) -> dict[int, list[str]]:
        """`traits` (default: every trait of the run), checked, grouped by the layer each is read at
        (`layer` for all, else each its own vector's layer: `layer()`), in the run's trait order."""
        groups: dict[int, list[str]] = {}
        for trait in [self.check_trait(t) for t in traits] or list(self.traits):
            groups.setdefault(self.layer(layer, trait), []).append(trait)
        return groups

    def check_trait(self, trait: str) -> str:
        if trait not in self.traits:
            raise QueryError(f"run {self.run_id} has traits {list(self.traits)}, not {trait!r}")
        return trait
