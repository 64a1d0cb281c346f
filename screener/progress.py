"""Progress of a long job that people can trust: one tqdm bar on a terminal, plain lines otherwise (Ray job
logs and CI capture stderr, where carriage-return redraws are unreadable), and a line per phase before it.

It counts samples as model batches finish (not as chunks commit). The total is what the caller counted
ahead of the model (`set_total`, from a reader running beside the screen), so the ETA is the work left
over the rate of the work done; without a count it falls back to the share of the input's bytes read, and
says so. The rate is measured from the first report on: the first batch's own time includes warming up
(and the model's load, on actors), so there is no ETA before the second report rather than a wrong one.
"""

from __future__ import annotations

import sys
import threading
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
        clock: Callable[[], float] = time.monotonic,
        tty: bool | None = None,
    ):
        self.total, self.enabled, self.unit, self.every = total, enabled, unit, every
        self.fraction = fraction  # share of the input read, when the total is not known
        self.clock = clock
        self.tty = sys.stderr.isatty() if tty is None else tty
        self.initial = 0  # done before this invocation (a resume): shown, not part of the rate
        self.done = 0  # this invocation
        self._first: tuple[float, int] | None = None  # (time, done) at the first report
        self._bar: tqdm | None = None
        self._last: float | None = None  # when a plain line was last printed
        self._start = clock()
        self._lock = threading.Lock()  # set_total may come from the counting thread

    def __enter__(self) -> Progress:
        return self

    def phase(self, text: str) -> None:
        """A line saying what the job is doing now (loading the model, starting workers...)."""
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.write(text, file=sys.stderr)
        else:
            print(text, file=sys.stderr, flush=True)

    def set_total(self, total: int, initial: int | None = None) -> None:
        """The work in all, once counted (and how much of it was done before, on a resume)."""
        with self._lock:
            self.total = total
            if initial is not None:
                self.initial = initial
            if self._bar is not None:
                self._bar.total = total
                self._bar.refresh()

    def update(self, n: int) -> None:
        with self._lock:
            self.done += n
            now = self.clock()
            if self._first is None:
                self._first = (now, self.done)
            if not self.enabled:
                return
            if self.tty:
                self._update_bar(n)
            elif self._last is None or now - self._last >= self.every:
                self._last = now
                print(self.line(), file=sys.stderr, flush=True)

    def _update_bar(self, n: int) -> None:
        if self._bar is None:  # from the first report on, so its rate is the scoring's own
            self._bar = tqdm(
                total=self.total,
                initial=self.initial + self.done,
                unit=f" {self.unit}",
                dynamic_ncols=True,
                smoothing=0.1,
                file=sys.stderr,
            )
        else:
            self._bar.update(n)
        if self.total is None and (share := self._share()) is not None:
            self._bar.set_postfix_str(share, refresh=False)

    def rate(self) -> float | None:
        """Samples per second since the first report (None before a second one)."""
        if self._first is None:
            return None
        t0, n0 = self._first
        elapsed = self.clock() - t0
        return (self.done - n0) / elapsed if elapsed > 0 and self.done > n0 else None

    def eta(self) -> float | None:
        """Seconds left: the work not done over the rate; None while either is unknown."""
        rate = self.rate()
        if self.total is None or rate is None:
            return None
        return max(self.total - self.initial - self.done, 0) / rate

    def _share(self) -> str | None:
        share = self.fraction() if self.fraction is not None else None
        return None if share is None else f"{share:.0%} of the input's bytes read"

    def line(self) -> str:
        """The plain progress line: done/total, rate, ETA (or the share of bytes read when not counted)."""
        done = self.initial + self.done
        text = f"{done:,}" + (f"/{self.total:,}" if self.total is not None else "") + f" {self.unit}"
        if (rate := self.rate()) is not None:
            text += f", {rate:.2f} {self.unit}/s"
        if (eta := self.eta()) is not None:
            text += f", ETA {tqdm.format_interval(eta)}"
        elif self.total is None and (share := self._share()) is not None:
            text += f", {share}"
        return text

    def __exit__(self, *exc: object) -> None:
        if self._bar is not None:
            self._bar.close()
        elif self.enabled and not self.tty and self.done:
            elapsed = tqdm.format_interval(self.clock() - self._start)
            print(self.line() + f", done in {elapsed}", file=sys.stderr, flush=True)
