"""Every error `screener` reports as one line instead of a traceback, and its exit code.

One hierarchy, one handler (`cli.main`), one table (README, "Exit codes"):

    0    success
    1    QueryError    the results cannot answer the request: no such run, trait or layer; SQL that fails
                       or is refused (read-only); a filter that does not parse; the screened input moved or
                       changed since the screen; an output that is already there
    2    UserError     an input or setting cannot be used: a dataset, model, vector, sidecar or trait file,
                       or an option value (the message names the file, row and field)
    3    BusyError     the database is held by another process (DuckDB allows one writer per file)
    4    StorageError  results could not be written (disk full, read-only place); what was committed stays,
                       and rerunning the same command resumes
    5    WorkerError   a model worker failed: it could not load, or kept dying
    130                interrupted (Ctrl-C); rerunning the same command resumes
"""

from __future__ import annotations


class ScreenerError(Exception):
    """A failure the user can act on; the message says what and where."""

    exit_code = 1


class QueryError(ScreenerError):
    """The stored results cannot answer this request (no such run, bad SQL, input moved...)."""

    exit_code = 1


class UserError(ScreenerError):
    """Bad input or configuration: the message says what and where (file, row, field)."""

    exit_code = 2


class BusyError(ScreenerError):
    """The DuckDB file is held by another process."""

    exit_code = 3


class StorageError(ScreenerError):
    """Results could not be written (no space, read-only location): nothing half-written is left."""

    exit_code = 4


class WorkerError(ScreenerError):
    """A model worker could not be set up, or kept dying before it finished its work."""

    exit_code = 5
