"""Batch sizes that fit the hardware, chosen from the run's own first batches and remembered per machine.

The best batch size depends on the machine far more than on the data: on a 2-core AVX2 CPU in fp32 the
proxy scorer ran 1.35x faster at 1,024 padded tokens a batch than at 8,192 (cache-bound), while a CPU with
native bf16 or a GPU wants far larger batches. So the first batches of a run try growing sizes, each is
timed by the useful work it did (FLOPs of real tokens, so padding waste counts against big batches), and
the best size is kept for the rest of the run and written to `$SCREENER_CACHE/tuning.json` under a key
that names the machine, device, dtype and model shape, so the next run starts with it. Values never depend
on the batch size (tested); a `--batch-tokens` / `--batch-size` given by the user is used as is.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

log = logging.getLogger(__name__)

CPU_TOKENS = (512, 1024, 2048, 4096, 8192, 16384)
GPU_TOKENS = (8192, 16384, 32768, 65536, 131072)
CPU_GENERATE_ROWS = (4, 8, 16, 32)
GPU_GENERATE_ROWS = (32, 64, 128, 256)
MIN_SECONDS = 0.2  # a candidate's measurement runs at least this long (small batches repeat)
WORSE = 0.85  # stop trying larger sizes once throughput falls below this share of the best so far


def machine_key(device: torch.device, dtype: torch.dtype, model_shape: str) -> str:
    """What a tuned size depends on: the processor (or GPU), threads, device, dtype and model shape."""
    if device.type == "cuda":
        hardware = torch.cuda.get_device_name(device)
    else:
        hardware = _cpu_name() + f" x{torch.get_num_threads()} threads"
    return f"{hardware} | {device.type} | {str(dtype).removeprefix('torch.')} | {model_shape}"


def _cpu_name() -> str:
    info = Path("/proc/cpuinfo")
    if info.is_file():
        for line in info.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def _cache_file() -> Path:
    """`$SCREENER_TUNING` (tests point it at a temp file), else `$SCREENER_CACHE/tuning.json`."""
    from screener.models import cache_dir

    return Path(os.environ.get("SCREENER_TUNING") or cache_dir() / "tuning.json")


def _read_cache() -> dict:
    try:
        return json.loads(_cache_file().read_text())
    except (OSError, ValueError):
        return {}


def _write_cache(key: str, what: str, value: int, measured: dict[int, float]) -> None:
    """Atomically, so workers tuning at once never leave a torn file (the last writer wins)."""
    data = _read_cache()
    data.setdefault(key, {})[what] = {
        "value": value,
        "measured": {str(k): round(v, 3) for k, v in measured.items()},
    }
    path = _cache_file()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".tuning.", dir=path.parent)
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=2, sort_keys=True)
        os.replace(tmp, path)
    except OSError as e:  # a read-only cache costs a re-tune next time, nothing else
        log.debug("could not write %s: %s", path, e)


@dataclass
class Tuner:
    """Proposes a size for each batch: the fixed one, the cached one, or the next candidate to measure.

    `record(size, work, seconds)` reports a batch's useful work (FLOPs or tokens) and time. Candidates are
    tried in increasing order until throughput falls clearly below the best; the best is then kept.
    """

    key: str
    what: str  # "batch_tokens" | "generate_batch_size"
    candidates: tuple[int, ...]
    fixed: int | None = None  # given by the user: never tuned
    measured: dict[int, float] = field(default_factory=dict)  # size -> work per second
    _work: dict[int, float] = field(default_factory=dict)
    _seconds: dict[int, float] = field(default_factory=dict)
    _chosen: int | None = None
    _warm: bool = False  # the first batch pays one-off costs (allocation, kernel set-up): not measured
    source: str = "tuned"  # how the size was chosen: "fixed" | "cached" | "tuned"

    def __post_init__(self) -> None:
        if self.fixed is not None:
            self._chosen, self.source = self.fixed, "fixed"
            return
        cached = _read_cache().get(self.key, {}).get(self.what)
        if cached and cached.get("value") in self.candidates:
            self._chosen, self.source = int(cached["value"]), "cached"

    @property
    def done(self) -> bool:
        return self._chosen is not None

    def size(self) -> int:
        """The size for the next batch."""
        if self._chosen is not None:
            return self._chosen
        return next(c for c in self.candidates if self._seconds.get(c, 0.0) < MIN_SECONDS)

    def record(self, size: int, work: float, seconds: float) -> None:
        if self._chosen is not None or size not in self.candidates:
            return
        if not self._warm:
            self._warm = True
            return
        self._work[size] = self._work.get(size, 0.0) + work
        self._seconds[size] = self._seconds.get(size, 0.0) + seconds
        if self._seconds[size] < MIN_SECONDS:
            return
        self.measured[size] = self._work[size] / self._seconds[size]
        best = max(self.measured, key=self.measured.get)
        last = size == self.candidates[-1]
        if last or self.measured[size] < WORSE * self.measured[best]:
            self._chosen = best
            log.info(
                "%s: %d (measured %s)", self.what, best, {k: f"{v:.3g}" for k, v in self.measured.items()}
            )
            _write_cache(self.key, self.what, best, self.measured)

    def describe(self) -> dict:
        """For the run's settings: the size in use and how it was chosen."""
        return {
            "value": self.size(),
            "source": self.source,
            "measured": {str(k): round(v, 3) for k, v in self.measured.items()},
        }


class Stopwatch:
    """Wall time of a block with the device's queued work included."""

    def __init__(self, device: torch.device):
        self.device = device
        self.seconds = 0.0

    def __enter__(self) -> Stopwatch:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self._t = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.seconds = time.perf_counter() - self._t
