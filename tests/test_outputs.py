"""screener.outputs: what no output may replace (the database, its WAL, every run's input), and outputs
written whole or not at all."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from screener.errors import StorageError
from screener.outputs import OutputError, Protected, output_file, output_folder


def test_the_database_its_wal_and_the_inputs_are_protected(tmp_path: Path) -> None:
    data = tmp_path / "d.jsonl"
    data.write_text("{}\n")
    folder = tmp_path / "shards"
    folder.mkdir()
    (tmp_path / "parts").mkdir()
    glob = str(tmp_path / "parts" / "*.jsonl")
    db = tmp_path / "s.duckdb"
    protected = Protected.of_database(db, [str(data), str(folder), glob, "org/name", "hf://org/x"])
    for path, what in (
        (db, "the results database"),
        (f"{db}.wal", "the results database's WAL"),
        (data, f"the screened input {data}"),
    ):
        with pytest.raises(OutputError, match=f"is {what}: refusing to write over it"):
            protected.check(path, force=True)
    with pytest.raises(OutputError, match="inside the screened folder"):
        protected.check(folder / "out.jsonl", force=True)
    with pytest.raises(OutputError, match="holds the results database"):
        protected.check(tmp_path, force=True, folder=True)  # an export folder replacing the database's
    with pytest.raises(OutputError, match="holds a screened folder"):
        Protected().with_inputs([str(folder)]).check(tmp_path, force=True, folder=True)
    with pytest.raises(OutputError, match="matched by the screened input"):
        protected.check(tmp_path / "parts" / "clean.jsonl", force=True)
    protected.check(tmp_path / "parts" / "clean.parquet", force=False)  # the glob does not match it
    protected.check(tmp_path / "new.jsonl", force=False)  # hub ids protect nothing here


def test_a_hard_link_or_symlink_to_a_protected_file_is_that_file(tmp_path: Path) -> None:
    data = tmp_path / "d.jsonl"
    data.write_text("{}\n")
    protected = Protected().with_inputs([str(data)])
    os.link(data, tmp_path / "hard.jsonl")
    (tmp_path / "soft.jsonl").symlink_to(data)
    for alias in ("hard.jsonl", "soft.jsonl"):
        with pytest.raises(OutputError, match="is the screened input"):
            protected.check(tmp_path / alias, force=True)


def test_an_output_is_renamed_into_place_whole_or_not_at_all(tmp_path: Path) -> None:
    out = tmp_path / "sub" / "out.txt"
    with output_file(out, Protected()) as tmp:
        assert tmp.parent == out.parent and tmp != out
        tmp.write_text("first")
        assert not out.exists()  # not before the block completes
    assert out.read_text() == "first"
    assert (out.stat().st_mode & 0o777) == 0o666 & ~_umask()
    with pytest.raises(OutputError, match="exists; pass --force"), output_file(out, Protected()):
        pass
    with pytest.raises(RuntimeError), output_file(out, Protected(), force=True) as tmp:
        tmp.write_text("half")
        raise RuntimeError("killed mid-write")
    assert out.read_text() == "first" and sorted(p.name for p in out.parent.iterdir()) == ["out.txt"]
    with output_file(out, Protected(), force=True) as tmp:
        tmp.write_text("second")
    assert out.read_text() == "second"


def test_a_folder_is_replaced_only_when_it_is_an_export(tmp_path: Path) -> None:
    out = tmp_path / "hf"
    with output_folder(out, Protected()) as tmp:
        (tmp / "manifest.json").write_text("{}")
    assert (out / "manifest.json").is_file()
    with pytest.raises(OutputError, match="not empty; pass --force"), output_folder(out, Protected()):
        pass
    with output_folder(out, Protected(), force=True) as tmp:
        (tmp / "manifest.json").write_text('{"again": 1}')
    assert (out / "manifest.json").read_text() == '{"again": 1}'
    other = tmp_path / "mine"
    other.mkdir()
    (other / "notes.txt").write_text("keep")
    with (
        pytest.raises(OutputError, match="not a dataset export"),
        output_folder(other, Protected(), force=True),
    ):
        pass
    assert (other / "notes.txt").read_text() == "keep"
    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputError, match="is not a folder"):
        Protected().check(tmp_path / "file", force=True, folder=True)
    with pytest.raises(OutputError, match="is a folder; pass a file name"):
        Protected().check(other, force=True)


def test_a_write_failure_is_one_line_naming_the_output(tmp_path: Path) -> None:
    out = tmp_path / "o.txt"
    full = r"o\.txt: could not write it \(No space left on device\)"
    with pytest.raises(StorageError, match=full), output_file(out, Protected()):
        raise OSError(28, "No space left on device")
    assert not out.exists()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
