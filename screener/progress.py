"""A progress line for long screens: tqdm on a terminal, a plain log line otherwise (Ray job logs and CI
capture stderr, where carriage-return redraws are unreadable).

It moves per model batch, not per committed chunk. Its ETA comes from the sample count when it is known
(`--limit`), else from the share of the input's bytes read so far.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable

from tqdm import tqdm


class Progress:
    def __init__(
        self,
        total: int | None = None,
        enabled: bool = True,
        unit: str = "samples",
        every: float = 10.0,
        fraction: Callable[[], float | None] | None = None,
    ):
        self.total, self.enabled, self.unit, self.every = total, enabled, unit, every
        self.fraction = fraction  # share of the input read, when the total is not known
        self.done = 0
        self._bar: tqdm | None = None
        self._start = time.monotonic()
        self._last: float | None = None  # the first update prints at once

    def __enter__(self) -> Progress:
        if self.enabled and sys.stderr.isatty():
            self._bar = tqdm(total=self.total, unit=f" {self.unit}", dynamic_ncols=True, smoothing=0.1)
        return self

    def update(self, n: int) -> None:
        self.done += n
        if self._bar is not None:
            self._bar.update(n)
            if self.total is None and (eta := self._eta_from_input()) is not None:
                self._bar.set_postfix_str(eta, refresh=False)
        elif self.enabled and (self._last is None or time.monotonic() - self._last >= self.every):
            self._last = time.monotonic()
            print(self.line(), file=sys.stderr, flush=True)

    def _eta_from_input(self) -> str | None:
        share = self.fraction() if self.fraction is not None else None
        if not share:
            return None
        elapsed = time.monotonic() - self._start
        return f"{share:.0%} of input, ETA {tqdm.format_interval(elapsed / share * (1 - share))}"

    def line(self) -> str:
        elapsed = max(time.monotonic() - self._start, 1e-9)
        rate = self.done / elapsed
        text = (
            f"{self.done}"
            + (f"/{self.total}" if self.total else "")
            + f" {self.unit}, {rate:.2f} {self.unit}/s"
        )
        if self.total and rate > 0:
            text += f", ETA {tqdm.format_interval(max(self.total - self.done, 0) / rate)}"
        elif (eta := self._eta_from_input()) is not None:
            text += f", {eta}"
        return text

    def __exit__(self, *exc: object) -> None:
        if self._bar is not None:
            self._bar.close()
        elif self.enabled and self.done:
            print(
                self.line() + f", done in {tqdm.format_interval(time.monotonic() - self._start)}",
                file=sys.stderr,
                flush=True,
            )
