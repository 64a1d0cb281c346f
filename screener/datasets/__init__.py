"""Dataset URI (or records in memory) → numbered rows → normalised `Sample`s (and `Reject`s), streamed.

    sources     what a URI names: local files, a folder or glob of them, a hub dataset, or in-memory data
    containers  a file's bytes → raw records: jsonl, json (streamed), csv, parquet; gzip
    formats     a record → samples: OpenAI `messages`, ShareGPT `conversations`, LMSYS `conversation`,
                `prompt` + `response`
    reader      the one streaming reader (`read_rows`, `Rebuild`) and the screen's `read_samples`
    base        the errors, `ReadStats`, and the raw row types the parts share

Every container yields raw dict records in order, numbered over the whole dataset. Each file's row format
is detected from its first record; each record then becomes one Sample per scored assistant turn, or a
Reject whose reason names the field. Nothing larger than one record (one parquet batch) is held in memory,
not even for a huge JSON array.

Entry points. `read_rows(data)` yields `Row(file, row, format, record | Reject)` for every row;
`Rebuild(turns)` turns each row, in order, into the samples the screen scores (ids unique over the read);
`read_samples(data, turns=...)` is the two together, for the screen. `data` is a URI, or records already
in memory: a list of dicts, a `datasets.Dataset` or `IterableDataset`, any iterable of mappings (one
source named `MEMORY`; a failure there raises, as for a hub dataset).

Nothing is lost quietly: a record that does not parse is a Reject with its row number; a file whose content
cannot be read (corrupt compression, not parquet, a JSON array broken mid-way) is one file-level Reject
after the rows read before the failure, and the other files are read. Such a failure is a function of the
file's bytes, so it happens at the same row on every read and the rows after it keep their numbers (resume
and export rely on that). A file that cannot be opened at all (permissions, I/O errors) stops the read
instead: skipping it would renumber the rows of the files after it once it can be read.
"""

from screener.datasets.base import DatasetFormatError, DatasetNotFoundError, DatasetReadError, ReadStats
from screener.datasets.containers import SUFFIXES, data_suffix
from screener.datasets.formats import CHAT_FORMATS, ROLES, SUPPORTED, detect_format, record_to_samples
from screener.datasets.reader import Done, Rebuild, Row, iter_records, read_rows, read_samples
from screener.datasets.sources import (
    MEMORY,
    canonical_uri,
    check_input,
    is_glob,
    is_hub_name,
    local_files,
    packaged_sharegpt,
)

__all__ = [
    "CHAT_FORMATS",
    "MEMORY",
    "ROLES",
    "SUFFIXES",
    "SUPPORTED",
    "DatasetFormatError",
    "DatasetNotFoundError",
    "DatasetReadError",
    "Done",
    "ReadStats",
    "Rebuild",
    "Row",
    "canonical_uri",
    "check_input",
    "data_suffix",
    "detect_format",
    "is_glob",
    "is_hub_name",
    "iter_records",
    "local_files",
    "packaged_sharegpt",
    "read_rows",
    "read_samples",
    "record_to_samples",
]
