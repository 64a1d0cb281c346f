"""Every error `screener` reports as one line instead of a traceback, and its exit code.

One hierarchy, one handler (`cli.main`, which prints the message on one line), one table
(docs/exit-codes.md, summed up in the README):

    0    success
    1    QueryError    the results cannot answer the request: no such run, trait or layer, or no finished
                       run; SQL that fails or is refused (read-only); a filter that does not parse; the
                       screened input moved or changed since the screen; a file that holds no screen's
                       results; an output that is already there (without --force), or that would replace
                       the screened input, the database or its WAL
    2    UserError     an input or setting cannot be used: a dataset that is missing or holds no records, a
                       data file that cannot be opened, a model, vector, sidecar or trait file, a database
                       file that is not DuckDB or is damaged, or an option value (the message names the file,
                       row and field)
    3    BusyError     the database is held by another process (DuckDB allows one writer per file)
    4    StorageError  results could not be written (disk full, read-only place, a folder that cannot be
                       created, a final checkpoint that fails); what was committed stays, and rerunning the
                       same command resumes
    5    WorkerError   a model worker failed: it could not load, or kept dying
    130                interrupted (Ctrl-C): the run is recorded as failed ("interrupted"); rerunning the
                       same command resumes
    143                terminated (SIGTERM: `timeout`, `ray job stop`, Kubernetes, systemd), handled as
                       Ctrl-C: the run is recorded as failed ("terminated"); rerunning resumes
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


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread by `cli.main`'s handler: a KeyboardInterrupt, so everything that
    cleans up after Ctrl-C (rollbacks, temporary files, the run's status) does so after SIGTERM too."""

    exit_code = 143  # 128 + SIGTERM, what a shell reports for a process SIGTERM ended


_terminated = _interrupted = False


def raise_terminated(signum: int, frame: object) -> None:
    """The SIGTERM handler `cli.main` installs (and `ray_session.RaySession` keeps over Ray's)."""
    global _terminated
    _terminated = True
    raise Terminated()


def raise_interrupted(signum: int, frame: object) -> None:
    """The Ctrl-C handler `cli.main` installs: Python's own, remembering that the signal came."""
    global _interrupted
    _interrupted = True
    raise KeyboardInterrupt()


def forget_signals() -> None:
    """A new command (`cli.main`): no signal has reached it yet."""
    global _terminated, _interrupted
    _terminated = _interrupted = False


def signalled() -> KeyboardInterrupt | None:
    """The signal the command got (through `cli.main`'s handlers) as its exception, or None. Whatever a
    signal interrupts may fail with its own error (a library's, mid-write) in place of the handler's: the
    command then ends as that signal, not as that error."""
    return Terminated() if _terminated else KeyboardInterrupt() if _interrupted else None


def signal_behind(e: BaseException) -> KeyboardInterrupt | None:
    """The Ctrl-C or SIGTERM that DuckDB turned into its own error, or None.

    A signal that arrives while DuckDB runs a statement (a commit, say) interrupts it, and DuckDB raises
    `Query interrupted` in place of the handler's exception: without this, a well-timed SIGTERM or Ctrl-C
    would end as a traceback (exit 1) instead of exit 143 or 130 with the run marked failed. This project
    never interrupts a query itself, so the message means a signal.
    """
    if isinstance(e, KeyboardInterrupt):
        return None
    if (signal := signalled()) is not None:
        return signal
    return KeyboardInterrupt() if "interrupted" in str(e).lower() else None
