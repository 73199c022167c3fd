#!/usr/bin/env bash
# The test suite on a fresh machine: set up, then run pytest (extra arguments go to pytest).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff check .   # the house linter (pyproject.toml), before the tests
.venv/bin/python -m pytest -q "$@"
