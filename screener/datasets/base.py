"""What every part of the reader shares: its errors, the stats of a read, and the raw rows a container
yields before they are numbered (a record, or a line that did not parse)."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass, field

from screener.errors import UserError


class DatasetFormatError(UserError, ValueError):
    """The dataset cannot be used as is; the message names the file (and row when relevant)."""


class DatasetNotFoundError(UserError, FileNotFoundError):
    """The dataset URI names no file, folder, glob match or hub dataset."""


class DatasetReadError(UserError):
    """A file of the dataset cannot be opened or read at all (permissions, I/O error)."""


@dataclass
class ReadStats:
    """What a read did, filled in while streaming; the caller prints it in its summary."""

    records: int = 0  # rows read (records, and lines that did not parse), over every file
    samples: int = 0
    rejects: int = 0  # records and turns that cannot be scored (Reject kind "bad")
    skipped: int = 0  # assistant turns with nothing to score: tool calls only (kind "skipped")
    files: list[str] = field(default_factory=list)  # in the order read
    per_file: dict[str, int] = field(default_factory=dict)  # rows read from each file
    formats: dict[str, str] = field(default_factory=dict)  # each file's row format (from its first record)
    unreadable: dict[str, str] = field(default_factory=dict)  # file → why it could not be read (to its end)
    ignored: list[str] = field(default_factory=list)  # files of a folder or glob that are not data (by name)
    truncated: list[tuple[str, int, int]] = field(default_factory=list)  # (file, byte, records recovered)
    # the last truncated JSON file: where its last complete record ends, and how many were recovered
    truncated_file: str | None = None
    truncated_at_byte: int | None = None
    recovered_records: int | None = None
    # how far through the input the read is, for a progress estimate when the sample count is not known
    bytes_total: int = 0  # of the local files, known when the read starts (0 for hub datasets)
    bytes_done: int = 0  # of the files finished
    position: Callable[[], int] | None = field(default=None, repr=False)  # bytes into the current file
    # JSON lines come unparsed (containers.Line) for the reader to parse only the rows it needs (a resume
    # skips the records it finished unread)
    lazy: bool = False
    cut_row: int | None = None  # the row whose later items a `limit` left unread (read_samples)

    def fraction(self) -> float | None:
        """The share of the input's bytes read so far, or None when the input's size is not known."""
        if not self.bytes_total:
            return None
        current = self.position() if self.position is not None else 0
        return min(1.0, (self.bytes_done + current) / self.bytes_total)

    @property
    def format(self) -> str | None:
        """The row format read: one name, or "mixed (a, b)" when the files differ."""
        found = list(dict.fromkeys(self.formats.values()))
        if len(found) <= 1:
            return found[0] if found else None
        return f"mixed ({', '.join(found)})"

    @property
    def empty_files(self) -> list[str]:
        """Files read to their end that held no rows at all."""
        return [f for f in self.files if not self.per_file.get(f) and f not in self.unreadable]


@dataclass(slots=True)
class BadRecord:
    """A record that did not parse into a JSON object; it keeps its row number and becomes a Reject."""

    reason: str
    sample_id: str


RawRow = dict | BadRecord  # what a container yields; a failure of the file's content is raised


def content_hash(data: bytes) -> str:
    """The short stable key of some bytes: the id of a record that has none, or of a row that failed."""
    return hashlib.sha256(data).hexdigest()[:16]


def canonical_json(value: object) -> bytes:
    """A value's JSON with sorted keys, as bytes: what a record without an id is keyed by (a lone
    surrogate, which JSON can carry, kept as its own bytes rather than refused)."""
    return json.dumps(value, sort_keys=True, ensure_ascii=False, default=str).encode("utf-8", "surrogatepass")
