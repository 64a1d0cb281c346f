"""The Ray session model workers run in: attached to a cluster, or a private local Ray.

`RaySession` attaches to `address` / `$RAY_ADDRESS` (a cluster, or inside `ray job submit`), else starts
an embedded Ray private to this process: its own temp dir, and a small reaper process that kills what is
left of it and removes the dir when the driver exits, even by SIGKILL (Ray's own fate-sharing takes the
raylet, GCS and workers down, but leaves its agents behind). Either way the driver keeps its own SIGTERM
handler over the ones `ray.init` installs.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

log = logging.getLogger(__name__)


class RaySession:
    """Attach to `address` / `$RAY_ADDRESS` (a cluster, or inside `ray job submit`), else start a private
    local Ray in its own temp dir and shut it down on exit (a reaper cleans up if the driver is killed)."""

    def __init__(self, address: str | None = None, num_cpus: int | None = None):
        self.address = address or os.environ.get("RAY_ADDRESS")
        self.num_cpus = num_cpus
        self._started = False
        self._reaper: subprocess.Popen | None = None

    @property
    def embedded(self) -> bool:
        return self._started

    def __enter__(self) -> RaySession:
        import ray

        if ray.is_initialized():
            return self
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        with _own_sigterm_handler():
            return self._init(ray)

    def _init(self, ray) -> RaySession:
        if self.address:
            ray.init(address=self.address, log_to_driver=True)
            return self
        temp_dir = tempfile.mkdtemp(prefix="screener-ray-")
        self._reaper = _start_reaper(temp_dir)
        # Ray 2.60 warns on every start that token auth is on; for a private Ray the user never set up,
        # that is noise on each screen (attaching to a cluster keeps the warning)
        logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)
        try:
            # address="local" ignores a stale cluster file left by an earlier `ray start`
            ray.init(
                address="local",
                num_cpus=self.num_cpus or os.cpu_count(),
                include_dashboard=False,
                _temp_dir=temp_dir,
                logging_level=logging.WARNING,
                # Ray renices workers by +15 over the raylet (which inherits this process's niceness), so
                # a screen's model work would yield to every other process on the machine; the actors are
                # the screen: they run at the user's own niceness (`nice screener screen ...` still works)
                _system_config={"worker_niceness": 0},
            )
        except BaseException:
            self._stop_reaper()
            raise
        self._started = True
        return self

    def __exit__(self, *exc: object) -> None:
        if self._started:
            import ray

            ray.shutdown()
            self._started = False
        self._stop_reaper()

    def _stop_reaper(self) -> None:
        if self._reaper is not None:
            self._reaper.stdin.close()  # EOF: the reaper removes the temp dir and exits
            try:
                self._reaper.wait(timeout=30)
            except subprocess.TimeoutExpired:
                log.warning("the Ray temp-dir reaper (pid %d) did not exit", self._reaper.pid)
            self._reaper = None


@contextlib.contextmanager
def _own_sigterm_handler() -> Iterator[None]:
    """Keep the driver's SIGTERM handler over the ones `ray.init` installs (`sys.exit`, or for an embedded
    Ray one that kills its processes and exits 1 mid-write): the command's own handler fails the run as
    'terminated' and leaves through `__exit__`, which shuts Ray down as cleanly."""
    main = threading.current_thread() is threading.main_thread()
    handler = signal.getsignal(signal.SIGTERM) if main else None
    try:
        yield
    finally:
        if main and callable(handler):  # the program's own, not SIG_DFL (a library caller keeps Ray's)
            signal.signal(signal.SIGTERM, handler)


def _start_reaper(temp_dir: str) -> subprocess.Popen:
    """A process that waits for EOF on its stdin (this driver exiting, however it exits), then kills the
    processes that still hold files in `temp_dir` and removes it. In its own session, so a Ctrl-C or a
    kill of the driver's process group does not take it down before it has cleaned up."""
    package_root = str(Path(__file__).resolve().parent.parent)
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")])),
    }
    return subprocess.Popen(
        [sys.executable, "-c", "from screener.ray_session import _reap; _reap()", temp_dir, str(os.getpid())],
        stdin=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
        env=env,
    )


def _reap() -> None:
    import psutil  # a Ray dependency

    temp_dir, driver = sys.argv[1], int(sys.argv[2])
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    sys.stdin.buffer.read()  # returns at EOF
    time.sleep(0.5)  # let a clean ray.shutdown() finish first
    spare = {os.getpid(), driver}  # a driver that lives on after ray.shutdown() keeps its log open
    for proc in psutil.process_iter():
        try:
            if proc.pid not in spare and any(f.path.startswith(temp_dir) for f in proc.open_files()):
                proc.kill()
        except psutil.Error:
            pass
    shutil.rmtree(temp_dir, ignore_errors=True)
