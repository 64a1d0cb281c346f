"""What every step of an extraction shares: its settings, its error, the method names and a read."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from screener.choices import READ_CONTEXTS
from screener.errors import UserError
from screener.scoring import MEANS
from screener.work import Work

METHODS = MEANS  # the vector methods: the mean activations the teacher-forced reader gives


POS, NEG = "pos", "neg"


CONTROL = "control:"  # the group prefix of a style control's reads (a trait name cannot hold a colon)


Read = tuple[list[int], list[int]]  # (prompt ids, response ids): one teacher-forced read


class ExtractError(UserError, RuntimeError):
    """An extraction that cannot produce a vector (e.g. the judge kept no pair)."""


@dataclass(frozen=True)
class ExtractSettings:
    samples: int = 5  # responses per (instruction pair, question, polarity)
    max_new_tokens: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int = 0
    threshold: float = 50.0
    coherence_min: float = 50.0
    batch_size: int = 32  # generation rows per batch
    batch_tokens: int = 8192  # padded tokens per activation forward
    dtype: str = "auto"
    device: str = "auto"
    # generated answers are read after their system prompt and question ("system"), or the question alone
    read_context: str = "system"
    max_tokens: int = 2048  # examples longer than this are cut as the screen cuts them

    def __post_init__(self) -> None:
        if self.read_context not in READ_CONTEXTS:
            raise ExtractError(f"read context must be one of {READ_CONTEXTS}, not {self.read_context!r}")

    def work(self) -> Work:
        """The device and dtype resolved ("auto" as the stages will run it)."""
        return Work.resolve(self.device, self.dtype)

    @property
    def generation_method(self) -> str:
        """The sidecar's `extraction_method` for generated answers read in this context."""
        return "generation" if self.read_context == "system" else "generation_question_only"


def batched(items: Sequence, size: int) -> Iterator[list]:
    """Consecutive slices of at most `size` items."""
    for i in range(0, len(items), size):
        yield list(items[i : i + size])
