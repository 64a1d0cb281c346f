"""The files the read commands write (export and its manifest, report --out, hist --png, query --out):
never over a screen's input or its database, never over an existing file without --force, never
half-written.

`Protected` lists what no output may replace: the database, its WAL, and the input of every run in it
(a file, the files of a glob, or anything inside a screened folder, where a rerun would read the output
as input). `output_file` and `output_folder` check the target against it, create a missing parent
folder, and hand out a temporary name in the target's own folder, renamed into place only when the block
completes: a failure, Ctrl-C or SIGTERM leaves the old file (or nothing), never a partial one, and what a
killed writer left beside the target is removed by the next write to it.
"""

from __future__ import annotations

import fnmatch
import glob
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, replace
from pathlib import Path

from screener.datasets import is_glob, is_hub_name
from screener.errors import QueryError, StorageError

__all__ = ["OutputError", "Protected", "output_file", "output_folder"]

# what an export folder (--format hf) holds: only such a folder is replaced with --force
EXPORT_FOLDER_MARKS = ("manifest.json", "dataset_info.json", "state.json")


class OutputError(QueryError):
    """An output that is already there (and no --force), or one that would replace a screen's input,
    its database or its WAL (never allowed)."""


@dataclass(frozen=True)
class Protected:
    """Paths no output may replace, each with what it is (for the message)."""

    files: tuple[tuple[str, str], ...] = ()  # (real path, what it is)
    folders: tuple[tuple[str, str], ...] = ()  # screened folders: nothing may be written inside them
    globs: tuple[tuple[str, str], ...] = ()  # screened globs (absolute): no output they would match

    @classmethod
    def of_database(cls, db: str | Path, inputs: Iterable[str] = ()) -> Protected:
        """The database, its WAL, and `inputs`: the input of every run stored in it
        (`results.dataset_uris`)."""
        out = cls().with_file(db, "the results database").with_file(f"{db}.wal", "the results database's WAL")
        return out.with_file(f"{_real(db)}.wal", "the results database's WAL").with_inputs(inputs)

    def with_file(self, path: str | Path, what: str) -> Protected:
        return replace(self, files=(*self.files, (_real(path), what)))

    def with_inputs(self, uris: Iterable[str | None]) -> Protected:
        """Also every file, folder or glob a screen reads for these dataset URIs (hub datasets have
        none here)."""
        out = self
        for uri in filter(None, uris):
            path = Path(uri).expanduser()
            if uri.startswith("hf://") or (is_hub_name(uri) and not path.exists()):
                continue
            if path.is_dir():
                out = replace(out, folders=(*out.folders, (_real(path), f"inside the screened folder {uri}")))
            elif is_glob(uri):
                pattern = os.path.abspath(path)
                out = replace(out, globs=(*out.globs, (pattern, f"matched by the screened input {uri}")))
            else:
                out = out.with_file(path, f"the screened input {uri}")
        return out

    def check(self, out: str | Path, *, force: bool, folder: bool = False) -> None:
        """Refuse `out` if it would replace or hold something protected, or exists and not `force`."""
        out = Path(out)
        real, absolute = _real(out), os.path.abspath(out)
        for path, what in self.files:
            if real == path or _same_file(out, path):
                raise OutputError(f"{out} is {what}: refusing to write over it; choose another output path")
            if folder and path.startswith(real + os.sep):
                raise OutputError(f"{out} holds {what} ({path}): refusing to replace it; choose another path")
        for path, what in self.folders:
            inside = real == path or real.startswith(path + os.sep)
            if inside or (folder and path.startswith(real + os.sep)):
                where = "is " + what if inside else f"holds a screened folder ({path})"
                raise OutputError(
                    f"{out} {where}: a rerun of the screen or export would read it as input; choose "
                    "another output path"
                )
        for pattern, what in self.globs:
            if _glob_matches(real, pattern) or _glob_matches(absolute, pattern):
                raise OutputError(
                    f"{out} is {what}: a rerun of the screen or export would read it as input; choose "
                    "another output path"
                )
        if not out.exists() and not out.is_symlink():
            return
        if folder:
            if not out.is_dir():
                raise OutputError(f"{out} exists and is not a folder; choose another path for --format hf")
            if not any(out.iterdir()):
                return  # an empty folder holds nothing to lose
            if not force:
                raise OutputError(f"{out} exists and is not empty; pass --force to replace it")
            if not any((out / mark).is_file() for mark in EXPORT_FOLDER_MARKS):
                raise OutputError(
                    f"{out} is a folder that is not a dataset export; refusing to replace it, even with "
                    "--force"
                )
        elif out.is_dir():
            raise OutputError(f"{out} is a folder; pass a file name")
        elif not out.is_file():  # a device, a FIFO, a socket, a dangling link: never replaced
            raise OutputError(f"{out} is not a regular file; refusing to replace it, even with --force")
        elif not force:
            raise OutputError(f"{out} exists; pass --force to replace it")


@contextmanager
def output_file(out: str | Path, protected: Protected, *, force: bool = False) -> Iterator[Path]:
    """A temporary path beside `out` to write to, renamed to `out` when the block completes (after the
    checks of `Protected.check`); removed if the block fails."""
    out = Path(out)
    protected.check(out, force=force)
    _make_parent(out)
    remove_stale_temporaries(out)
    fd, tmp = tempfile.mkstemp(prefix=temp_prefix(out), suffix=TEMP_SUFFIX, dir=out.parent)
    os.close(fd)
    try:
        with _write_errors(out):
            yield Path(tmp)
            os.chmod(tmp, 0o666 & ~_umask())  # as a plain open() would have made it, not mkstemp's 0600
            os.replace(tmp, out)
    finally:
        Path(tmp).unlink(missing_ok=True)


@contextmanager
def output_folder(out: str | Path, protected: Protected, *, force: bool = False) -> Iterator[Path]:
    """A temporary folder beside `out` to fill, put in place of `out` when the block completes (a
    previous export there is replaced only with `force`); removed if the block fails."""
    out = Path(out)
    protected.check(out, force=force, folder=True)
    _make_parent(out)
    remove_stale_temporaries(out)
    tmp = Path(tempfile.mkdtemp(prefix=temp_prefix(out), suffix=TEMP_SUFFIX, dir=out.parent))
    try:
        with _write_errors(out):
            yield tmp
            os.chmod(tmp, 0o777 & ~_umask())
            if out.exists():
                old = tmp.with_name(tmp.name.removesuffix(TEMP_SUFFIX) + ".old" + TEMP_SUFFIX)
                os.rename(out, old)
                os.rename(tmp, out)
                shutil.rmtree(old)
            else:
                os.rename(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# Temporary names beside an output: `.NAME.PID.RANDOM.tmp`. The writer's pid lets a later run remove what a
# killed one (kill -9, a power cut) left, and never the files of a run still writing.
TEMP_SUFFIX = ".tmp"


def temp_prefix(out: Path) -> str:
    return f".{out.name}.{os.getpid()}."


def remove_stale_temporaries(out: Path) -> None:
    """Remove the temporary files and folders beside `out` left by writers that are no longer running."""
    try:
        found = list(out.parent.glob(f".{glob.escape(out.name)}.*{TEMP_SUFFIX}"))
    except OSError:
        return
    for path in found:
        pid = path.name[len(out.name) + 2 :].partition(".")[0]
        if not pid.isdigit() or _running(int(pid)):
            continue
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            with suppress(OSError):
                path.unlink()


def _running(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def _make_parent(out: Path) -> None:
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise StorageError(f"{out}: cannot create its folder {out.parent} ({e.strerror or e})") from None


@contextmanager
def _write_errors(out: Path) -> Iterator[None]:
    """A system error while writing (a full disk, a read-only place) as one line naming the output."""
    try:
        yield
    except OSError as e:
        if e.errno is None:
            raise
        raise StorageError(f"{out}: could not write it ({e.strerror}); nothing was replaced") from None


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _real(path: str | Path) -> str:
    return os.path.realpath(os.path.expanduser(path))


def _same_file(a: Path, b: str) -> bool:
    """Hard links to one file are one file."""
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def _glob_matches(path: str, pattern: str) -> bool:
    """Whether a glob would match `path`: `*` within a path component, `**` across them."""
    if "**" in pattern:
        return fnmatch.fnmatchcase(path, pattern)
    parts, pattern_parts = Path(path).parts, Path(pattern).parts
    return len(parts) == len(pattern_parts) and all(
        fnmatch.fnmatchcase(p, q) for p, q in zip(parts, pattern_parts, strict=True)
    )
