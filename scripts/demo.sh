#!/usr/bin/env bash
# The main job on a fresh machine: set up, then build, export, load, score and time the tiny model.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/clipmatch demo "$@"
