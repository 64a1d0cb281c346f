"""Containers: a data file's bytes → raw rows (records as parsed, lines that did not parse, and a failure
of the file's content), streamed in order.

JSON lines, JSON (an array streamed one value at a time, even one far larger than memory or cut off
mid-way; one object; or JSON lines under a .json name), CSV (every cell a string, rows with a broken quote
rejected alone) and parquet (one batch at a time); .jsonl/.json/.csv may be gzipped. What the bytes can
make a reader raise is `CONTENT_ERRORS`: the reader turns it into a file-level reject (`file_reason`).
"""

from __future__ import annotations

import bz2
import codecs
import csv
import gzip
import io
import json
import lzma
import os
import re
import warnings
import zlib
from collections.abc import Iterator
from typing import IO, NamedTuple

import pyarrow as pa
import pyarrow.parquet as pq
import zstandard

from screener.datasets.base import (
    BadRecord,
    DatasetFormatError,
    RawRow,
    ReadStats,
    canonical_json,
    content_hash,
)

CHUNK_BYTES = 1 << 20  # read size for streamed JSON; a record larger than this costs a few re-reads
SUFFIXES = (".jsonl", ".json", ".parquet", ".csv", ".tsv")  # all but .parquet may be compressed
COMPRESSIONS = (".gz", ".zst", ".bz2", ".xz", ".lzma")
# The first bytes of each kind of file: they win over the name, so a parquet file named .jsonl, or a
# gzip file without .gz, is read as what it is.
MAGIC = {
    b"\x1f\x8b": ".gz",
    b"\x28\xb5\x2f\xfd": ".zst",
    b"BZh": ".bz2",
    b"\xfd7zXZ\x00": ".xz",
    b"\x5d\x00\x00": ".lzma",  # the legacy .lzma header (its usual properties byte and dictionary size)
}
# what a damaged compressed stream raises; held here, not looked up in the `except`: a reader generator
# closed at interpreter exit would find those modules' attributes already cleared ("catching classes that
# do not inherit from BaseException")
DECOMPRESSION_ERRORS = (EOFError, zlib.error, lzma.LZMAError, zstandard.ZstdError, OSError)
PARQUET_MAGIC = b"PAR1"


def data_suffix(path: str) -> str | None:
    """The data suffix of a file name (after any compression suffix), or None for a file that is not data."""
    name = path.lower()
    compressed = name.endswith(COMPRESSIONS)
    if compressed:
        name = name.rpartition(".")[0]
    suffix = next((s for s in SUFFIXES if name.endswith(s)), None)
    return None if suffix == ".parquet" and compressed else suffix


class CorruptCompression(ValueError):
    """The decompressor refused the file's bytes (or they end mid-stream)."""


# What a file's bytes can make a reader raise. OSErrors count only without an errno: Arrow's IO errors and
# some decompressors' have none, while a missing file, a permission or a disk error has one.
CONTENT_ERRORS = (ValueError, EOFError, zlib.error, csv.Error, RecursionError, pa.ArrowException, OSError)


def file_reason(e: Exception, path: str, n_read: int) -> str:
    """A one-line reason for a file-level reject: what failed, and what was read before it."""
    message = str(e).removeprefix(f"{path}: ").strip().splitlines()
    what = message[0] if message else type(e).__name__
    if isinstance(e, CorruptCompression):
        what = f"corrupt compressed data: {what}"
    elif isinstance(e, pa.ArrowException) or (isinstance(e, OSError) and data_suffix(path) == ".parquet"):
        what = f"not a readable parquet file: {what}"
    elif isinstance(e, RecursionError):
        what = "nested too deeply to parse"
    elif not isinstance(e, DatasetFormatError):
        what = f"{type(e).__name__}: {what}"
    read = f"{n_read} row{'s' * (n_read != 1)} read before it" if n_read else "nothing read"
    return f"unreadable file: {what} ({read})"


def read_file(path: str, stats: ReadStats) -> Iterator[RawRow]:
    """The raw rows of one local file. Its compression and whether it is parquet come from its first
    bytes when they say (else from its name); the row container (jsonl, json, csv, tsv) from its name."""
    with open(path, "rb") as raw:
        head = raw.read(8)
        raw.seek(0)
        compression = next((c for magic, c in MAGIC.items() if head.startswith(magic)), None)
        if compression is None and not head.startswith(PARQUET_MAGIC):
            compression = next((c for c in COMPRESSIONS if path.lower().endswith(c)), None)
        if head.startswith(PARQUET_MAGIC) or (compression is None and data_suffix(path) == ".parquet"):
            yield from _read_parquet(raw, stats)
            return
        stats.position = raw.tell  # compressed bytes, to compare with the file's size
        f = _decompressed(raw, compression) if compression else raw
        try:
            suffix = data_suffix(path)
            if suffix == ".jsonl":
                yield from _read_jsonl(f, stats.lazy)
            elif suffix in (".csv", ".tsv"):
                yield from _read_csv(f, "\t" if suffix == ".tsv" else ",")
            else:
                yield from _read_json(f, path, stats)
        except DECOMPRESSION_ERRORS as e:
            if compression is None or (isinstance(e, OSError) and e.errno is not None):
                raise
            raise CorruptCompression(str(e) or type(e).__name__) from e


def _read_parquet(raw: IO[bytes], stats: ReadStats) -> Iterator[RawRow]:
    with pq.ParquetFile(raw) as parquet:
        size, rows, done = os.fstat(raw.fileno()).st_size, max(parquet.metadata.num_rows, 1), 0
        stats.position = lambda: size * done // rows
        for batch in parquet.iter_batches(batch_size=1024):
            yield from batch.to_pylist()
            done += batch.num_rows


def _decompressed(raw: IO[bytes], compression: str) -> IO[bytes]:
    if compression == ".gz":
        return gzip.GzipFile(fileobj=raw, mode="rb")
    if compression == ".bz2":
        return bz2.BZ2File(raw)
    if compression == ".zst":
        return io.BufferedReader(_Zstd(raw), CHUNK_BYTES)
    return lzma.LZMAFile(raw)  # .xz, .lzma


class _Zstd(io.RawIOBase):
    """A zstd stream (frames one after another) that says when it ends mid-frame (zstandard's stream
    reader returns what it has, silently) and can seek back (the CSV and JSON readers do, to read a row
    again): by decompressing again from the start, as gzip, bz2 and lzma files do."""

    def __init__(self, raw: IO[bytes]):
        self.raw = raw
        self._start()

    def _start(self) -> None:
        self.raw.seek(0)
        self.frame = zstandard.ZstdDecompressor().decompressobj()
        self.pos, self.out, self.taken, self.fed = 0, b"", 0, False

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        while self.taken == len(self.out):
            data = self.raw.read(CHUNK_BYTES)
            if not data:
                if self.fed and not self.frame.eof:
                    raise EOFError("the zstd data ends mid-frame")
                return 0
            self.out, self.taken = self._decompress(data), 0
        n = min(len(b), len(self.out) - self.taken)
        b[:n] = self.out[self.taken : self.taken + n]
        self.taken += n
        self.pos += n
        return n

    def _decompress(self, data: bytes) -> bytes:
        out = []
        while data:
            if self.frame.eof:  # the next frame
                self.frame = zstandard.ZstdDecompressor().decompressobj()
            out.append(self.frame.decompress(data))
            self.fed = True
            data = self.frame.unused_data if self.frame.eof else b""
        return b"".join(out)

    def tell(self) -> int:
        return self.pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        if whence == io.SEEK_CUR:
            offset += self.pos
        elif whence != io.SEEK_SET:
            raise io.UnsupportedOperation("a zstd stream seeks from its start only")
        if offset < self.pos:
            self._start()
        while self.pos < offset and self.read(min(CHUNK_BYTES, offset - self.pos)):
            pass
        return self.pos


def _read_jsonl(f: IO[bytes], lazy: bool = False) -> Iterator[RawRow | Line]:
    """Each line's record; `lazy`: the line unparsed (a `Line`), for the reader to parse if it needs it."""
    for line in f:
        if not line.strip():
            continue
        yield Line(line) if lazy else parse_line(line)


class Line(NamedTuple):
    """A JSON line not parsed yet (`ReadStats.lazy`): a resume skips the records it has finished unread."""

    data: bytes

    def parse(self) -> RawRow:
        return parse_line(self.data)


def parse_line(line: bytes) -> RawRow:
    """A JSON line's record, or the BadRecord that says why it is not one."""
    try:
        record = json.loads(line)
    except ValueError as e:  # JSONDecodeError, or UnicodeDecodeError for bytes that are not UTF-8
        return BadRecord(f"invalid JSON: {e}", content_hash(line.strip()))
    except RecursionError:  # json's C parser recurses once per level
        return BadRecord(_TOO_DEEP, content_hash(line.strip()))
    return record if isinstance(record, dict) else not_an_object(record)


_TOO_DEEP = "invalid JSON: nested too deeply to parse"


def _read_csv(f: IO[bytes], delimiter: str = ",") -> Iterator[RawRow]:
    """CSV rows as dicts of strings, by the header. A row that does not parse is a BadRecord naming what
    is wrong: too few or too many cells, a cell that is not UTF-8, a stray quote. A quote that is never
    closed would swallow the rest of the file into one cell: that row is rejected and reading starts
    again on the line after its first one, so the rows after it are read as rows."""
    # The csv module keeps every cell a string (pyarrow would turn an id "007" into 7); a chat response
    # easily passes its default 128 KiB field limit.
    csv.field_size_limit(2**31 - 1)
    lines = _Lines(f)
    reader = csv.reader(lines, delimiter=delimiter, strict=True)
    try:
        header = next(reader, [])
    except csv.Error as e:
        raise DatasetFormatError(f"the CSV header (line 1) does not parse: {e}") from None
    if _not_utf8(header) is not None:
        raise DatasetFormatError("the CSV header (line 1) is not UTF-8")
    while True:
        lines.start_record()
        try:
            cells = next(reader)
        except StopIteration:
            return
        except csv.Error as e:
            first, last = lines.record[0][0], lines.line
            key = content_hash(lines.first)
            if lines.eof and "unexpected end of data" in str(e):
                span = f"csv line {first}: a quote opened in this row is never closed"
                if last > first:  # read the lines it swallowed again, as rows
                    yield BadRecord(f"{span} (it ran to the end of the file, line {last})", key)
                    lines.restart_at_second_line()
                    reader = csv.reader(lines, delimiter=delimiter, strict=True)
                else:
                    yield BadRecord(span, key)
                continue
            yield BadRecord(f"csv line {first}: {e}", key)
            continue
        if not cells:
            continue
        key = content_hash("\x1f".join(cells).encode("utf-8", "surrogateescape"))
        if len(cells) != len(header):
            reason = f"csv: {len(cells)} cells, the header has {len(header)}"
            first, last = lines.record[0][0], lines.line
            if last > first:
                reason += f" (this row spans lines {first}-{last}: a quote may be unbalanced)"
            yield BadRecord(reason, key)
        elif (bad := _not_utf8(cells)) is not None:
            yield BadRecord(f"{header[bad]}: not UTF-8", key)
        else:
            yield dict(zip(header, cells, strict=True))


def _not_utf8(cells: list[str]) -> int | None:
    """The index of the first cell holding bytes that were not UTF-8 (decoded as surrogates), if any."""
    for i, cell in enumerate(cells):
        try:
            cell.encode("utf-8")
        except UnicodeEncodeError:
            return i
    return None


class _Lines:
    """A binary file's lines, decoded for the csv module (bytes that are not UTF-8 kept as surrogates, so a
    bad row is rejected alone), with the line number and byte offset of each line of the current row.
    Lines end at LF, CRLF or a lone CR, as with open(newline="")."""

    def __init__(self, f: IO[bytes]):
        self.f, self.offset, self.line, self.eof = f, 0, 0, False
        self.pieces: list[tuple[bytes, int]] = []  # lines split off a raw line at a lone \r, and offsets
        self.record: list[tuple[int, int]] = []  # (line number, byte offset) of the current row's lines
        self.first = b""  # the current row's first line, for a stable id of a row that does not parse

    def __iter__(self) -> _Lines:
        return self

    def __next__(self) -> str:
        if not self.pieces:
            data, start = self.f.readline(), self.offset
            if not data:
                self.eof = True
                raise StopIteration
            self.offset = self.f.tell()
            if start == 0 and data.startswith(codecs.BOM_UTF8):
                data, start = data[len(codecs.BOM_UTF8) :], len(codecs.BOM_UTF8)
            for piece in _LONE_CR.split(data) if b"\r" in data else [data]:
                self.pieces.append((piece, start))
                start += len(piece)
        data, start = self.pieces.pop(0)
        if not self.record:
            self.first = data
        self.line += 1
        self.record.append((self.line, start))
        return data.decode("utf-8", "surrogateescape")

    def start_record(self) -> None:
        self.record, self.first = [], b""

    def restart_at_second_line(self) -> None:
        self.line, self.offset = self.record[1][0] - 1, self.record[1][1]
        self.f.seek(self.offset)
        self.pieces, self.eof = [], False


_LONE_CR = re.compile(rb"(?<=\r)(?!\n)(?=.)", re.S)


def _read_json(f: IO[bytes], path: str, stats: ReadStats) -> Iterator[RawRow]:
    """A .json file: an array of records, one (pretty-printed) record, or JSON lines under a .json name."""
    head = f.read(4096).removeprefix(codecs.BOM_UTF8)
    while head and not head.strip():
        head = f.read(4096)
    first = head.strip()[:1]
    f.seek(0)
    if first == b"{":
        # A first line that parses on its own means JSON lines (which reject bad lines one by one).
        line = next((line for line in f if line.strip()), b"")
        f.seek(0)
        try:
            is_lines = isinstance(json.loads(line), dict)
        except (ValueError, RecursionError):
            is_lines = False
        yield from _read_jsonl(f, stats.lazy) if is_lines else _stream_json(f, path, stats, array=False)
    elif first == b"[":
        yield from _stream_json(f, path, stats, array=True)
    elif first:
        raise DatasetFormatError(f"{path}: expected a JSON array or object, found {first!r}")


def not_an_object(value: object) -> BadRecord:
    reason = f"invalid JSON: not an object (got {type(value).__name__})"
    return BadRecord(reason, content_hash(canonical_json(value)))


# ---- streaming a JSON array ------------------------------------------------------------------------


_SEPARATORS = re.compile(r"[\s,]*")


def _looks_cut(e: json.JSONDecodeError) -> bool:
    """Whether a decode error could be the end of the buffer rather than a syntax error in the file."""
    return e.msg.startswith("Unterminated string") or e.pos >= len(e.doc) - 8  # 8: a cut \uXXXX escape


def _stream_json(f: IO[bytes], path: str, stats: ReadStats, *, array: bool) -> Iterator[RawRow]:
    """The values of a JSON array (or of JSON values one after another), decoded one at a time; see
    `_JsonStream`. A file that ends mid-value (a truncated dump) yields every complete record, then is
    reported in `stats` and a warning."""
    stream = _JsonStream(f, path, array)
    yield from stream
    if not stream.complete:
        at = stream.byte_at(stream.done)
        stats.truncated_file, stats.truncated_at_byte, stats.recovered_records = path, at, stream.n_values
        stats.truncated.append((path, at, stream.n_values))
        warnings.warn(
            f"{path}: JSON is truncated; recovered {stream.n_values} complete records, "
            f"ignored everything after byte {at:,}",
            stacklevel=2,
        )


class _JsonStream:
    """Decodes the values of a JSON array (or of concatenated JSON values) from a byte stream.

    The buffer keeps only text not yet decoded. When a value runs past its end we read at least as much
    again, so even a record far larger than a chunk is re-parsed only O(log size) times.
    """

    def __init__(self, f: IO[bytes], path: str, array: bool):
        self.f, self.path, self.array = f, path, array
        self.utf8 = codecs.getincrementaldecoder("utf-8-sig")()
        self.buf = ""
        self.pos = 0  # next character to look at
        self.done = 0  # end of the last complete value
        self.n_read = 0  # bytes read from the file
        self.eof = False
        self.n_values = 0
        self.read_size = CHUNK_BYTES
        self.opened = not array  # an array's "[" is still to be consumed
        self.complete = False  # the input ended where a value may end

    def byte_at(self, i: int) -> int:
        """File offset of buf[i]: all bytes read, less those not yet in the buffer."""
        return self.n_read - len(self.utf8.getstate()[0]) - len(self.buf[i:].encode("utf-8"))

    def _fill(self) -> bool:
        """Read more (dropping what is decoded); False at the end of the file."""
        if self.eof:
            return False
        data = self.f.read(self.read_size)
        self.n_read, self.eof = self.n_read + len(data), not data
        try:
            text = self.utf8.decode(data)  # not final: a cut character is truncation
        except UnicodeDecodeError as e:
            at = self.n_read - len(data) + e.start
            raise DatasetFormatError(f"{self.path}: not UTF-8 near byte {at}") from None
        self.buf, self.pos, self.done = self.buf[self.done :] + text, self.pos - self.done, 0
        return True

    def __iter__(self) -> Iterator[RawRow]:
        decode = json.JSONDecoder().raw_decode
        while True:
            self.pos = _SEPARATORS.match(self.buf, self.pos).end()
            if self.pos == len(self.buf):
                if not self._fill():
                    self.complete = not self.array  # concatenated values may simply end
                    return
            elif not self.opened:  # _read_json saw that the first character is "["
                self.pos = self.done = self.pos + 1
                self.opened = True
            elif self.array and self.buf[self.pos] == "]":
                self.complete = True
                return
            else:
                try:
                    value, end = decode(self.buf, self.pos)
                except RecursionError:  # too deep for json's recursive parser: skip the value, whole
                    end = _value_end(self.buf, self.pos)
                    if end is None:  # it goes on past the buffer
                        self.read_size = max(CHUNK_BYTES, len(self.buf))
                        if not self._fill():
                            return
                        continue
                    key = content_hash(self.buf[self.pos : end].encode("utf-8", "surrogatepass"))
                    self.pos = self.done = end
                    self.n_values, self.read_size = self.n_values + 1, CHUNK_BYTES
                    yield BadRecord(_TOO_DEEP, key)
                    continue
                except json.JSONDecodeError as e:
                    if not _looks_cut(e):
                        at = self.byte_at(e.pos)
                        raise DatasetFormatError(
                            f"{self.path}: invalid JSON in record {self.n_values} at byte {at}: {e.msg}"
                        ) from None
                    self.read_size = max(CHUNK_BYTES, len(self.buf))
                    if not self._fill():
                        return
                    continue
                if end == len(self.buf) and not self.eof:  # a bare number may go on in the next chunk
                    self._fill()
                    continue
                self.pos = self.done = end
                self.n_values, self.read_size = self.n_values + 1, CHUNK_BYTES
                yield value if isinstance(value, dict) else not_an_object(value)


def _value_end(buf: str, pos: int) -> int | None:
    """The end of the JSON array or object starting at buf[pos], found without recursion (brackets
    counted outside strings); None if the buffer ends first."""
    depth, i, n = 0, pos, len(buf)
    in_string = False
    while i < n:
        c = buf[i]
        if in_string:
            if c == "\\":
                i += 1
            elif c == '"':
                in_string = False
        elif c == '"':
            in_string = True
        elif c in "[{":
            depth += 1
        elif c in "]}":
            depth -= 1
            if depth == 0:
                return i + 1
        i += 1
    return None
