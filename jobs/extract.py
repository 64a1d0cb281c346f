"""Ray job entry point for persona-vector extraction: the same command as `screener extract`.

    ray job submit --working-dir . -- python jobs/extract.py evil --model Qwen/Qwen2.5-7B-Instruct

Inside a Ray job, RAY_ADDRESS is set, so the actors run on the cluster. Errors are reported as by
`screener` itself: one line in `ray job logs`, and the exit code of the README's table.
"""

from __future__ import annotations

import sys
from pathlib import Path

# Import the uploaded working dir's `screener`, as the actors do (Ray puts the working dir on their path).
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from screener.cli import main

if __name__ == "__main__":
    sys.exit(main(["extract", *sys.argv[1:]]))
