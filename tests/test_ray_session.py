"""The Ray session: an embedded Ray is private to its driver and leaves nothing behind."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import psutil


def test_embedded_ray_leaves_nothing_behind():
    """A fresh process (this one may hold a session): its workers run at the driver's niceness (not Ray's
    15), it starts quietly, and its private Ray and temp dir are gone after exit."""
    code = (
        "import os, ray; from screener.ray_session import RaySession\n"
        "os.nice(3)\n"
        "with RaySession(num_cpus=1) as s:\n"
        "    assert s.embedded\n"
        "    print('niceness', ray.get(ray.remote(lambda: os.nice(0)).remote()), os.nice(0), flush=True)\n"
        "    print(ray._private.worker._global_node.get_temp_dir_path(), flush=True)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    worker, driver = out.stdout.split("niceness ")[1].split()[:2]
    assert worker == driver != "0"  # the driver's own (3 above whatever this suite runs at), not Ray's +15
    assert "Token authentication" not in out.stderr
    temp_dir = out.stdout.split()[-1]
    assert Path(temp_dir).name.startswith("screener-ray-")
    deadline = time.monotonic() + 10
    while Path(temp_dir).exists() and time.monotonic() < deadline:  # the reaper runs on after the exit
        time.sleep(0.2)
    assert not Path(temp_dir).exists()
    left = [p for p in psutil.process_iter() if _holds_files_in(p, temp_dir)]
    assert not left, left


def _holds_files_in(proc: psutil.Process, folder: str) -> bool:
    try:
        return any(f.path.startswith(folder) for f in proc.open_files())
    except psutil.Error:
        return False
