"""Batch sizes that fit the hardware, chosen from the run's own first batches and remembered per machine.

The best batch size depends on the machine far more than on the data: on a 2-core AVX2 CPU in fp32 the
proxy scorer ran 1.35x faster at 1,024 padded tokens a batch than at 8,192 (cache-bound), while a CPU with
native bf16 or a GPU wants far larger batches. So the first batches of a run compare growing sizes, two
at a time on interleaved batches (`Tuner`), each timed by the useful work it did (FLOPs of real tokens,
so padding waste counts against big batches), and the best size is kept for the rest of the run and
written to `$SCREENER_CACHE/tuning.json` under a key
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
MIN_SECONDS = 1.0  # each size of a compared pair is timed at least this long...
MIN_BATCHES = 2  # ...over at least this many batches


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
    """Proposes a size for each batch: the fixed one, the cached one, or one of the pair being compared.

    Sizes are compared two neighbours at a time (`candidates[i]`, `candidates[i + 1]`) on matched pairs
    of batches: a run's batches come in order of length, and timing one size after the other compared
    short samples with long ones (attention makes long ones slower per FLOP, and large batches suit short
    samples: the smallest or the largest size won by accident). So the scorer takes each pair of
    batches from one stretch of the length order (`pairing`), the stretches spread over short and long
    samples, and the sizes alternate a b b a. When both have been timed long enough, the larger one
    moves on to be compared with the next size if it did more work per second, and otherwise the better
    of the two is kept. `record(size, work, seconds)` reports a batch's useful work (FLOPs or tokens)
    and time.
    """

    key: str
    what: str  # "batch_tokens" | "generate_batch_size"
    candidates: tuple[int, ...]
    fixed: int | None = None  # given by the user: never tuned
    measured: dict[int, float] = field(default_factory=dict)  # size -> work per second, as last compared
    _at: int = 0  # the pair under comparison is candidates[_at], candidates[_at + 1]
    _work: dict[int, float] = field(default_factory=dict)
    _seconds: dict[int, float] = field(default_factory=dict)
    _batches: dict[int, int] = field(default_factory=dict)
    _n: int = 0  # batches measured in the current comparison
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
        elif len(self.candidates) == 1:
            self._chosen = self.candidates[0]

    @property
    def done(self) -> bool:
        return self._chosen is not None

    def _pair(self) -> tuple[int, int]:
        return self.candidates[self._at], self.candidates[self._at + 1]

    def size(self) -> int:
        """The size for the next batch: the chosen one, else the pair's members in the order a b b a."""
        if self._chosen is not None:
            return self._chosen
        small, large = self._pair()
        return (small, large, large, small)[self._n % 4]

    @property
    def pairing(self) -> bool:
        """Whether the next batch is the second of a matched pair: the batches should then come from the
        same stretch of lengths as the last one, so both sizes are timed on like samples."""
        return self._chosen is None and self._n % 2 == 1

    def record(self, size: int, work: float, seconds: float) -> None:
        if self._chosen is not None or size not in self._pair():
            return
        if not self._warm:
            self._warm = True
            return
        self._work[size] = self._work.get(size, 0.0) + work
        self._seconds[size] = self._seconds.get(size, 0.0) + seconds
        self._batches[size] = self._batches.get(size, 0) + 1
        self._n += 1
        small, large = self._pair()
        if self._n % 4 or not (self._timed_enough(small) and self._timed_enough(large)):
            return  # decide on whole a b b a blocks only
        rates = {x: self._work[x] / self._seconds[x] for x in (small, large)}
        self.measured.update(rates)
        if rates[large] > rates[small] and self._at + 2 < len(self.candidates):
            self._at += 1  # the larger one won: compare it with the next, on fresh batches
            self._work, self._seconds, self._batches, self._n = {}, {}, {}, 0
            return
        self._chosen = max(rates, key=rates.__getitem__)
        rounded = {k: f"{v:.3g}" for k, v in self.measured.items()}
        log.info("%s: %d (measured %s)", self.what, self._chosen, rounded)
        _write_cache(self.key, self.what, self._chosen, self.measured)

    def _timed_enough(self, size: int) -> bool:
        return self._seconds.get(size, 0.0) >= MIN_SECONDS and self._batches.get(size, 0) >= MIN_BATCHES

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
