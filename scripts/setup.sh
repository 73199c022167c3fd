#!/usr/bin/env bash
# Creates .venv (once) and installs clipmatch with the PyTorch side, the CPU
# onnxruntime, the Triton client and server, and the test tools. Safe to run
# again: pip skips what is there.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
. .venv/bin/activate
python -m pip install -q --upgrade pip
# torch is pinned to the CPU build; installing it first keeps pip from
# considering any other build while resolving the rest.
python -m pip install -q "torch==2.13.0"
python -m pip install -q -e ".[export,cpu,triton,server,index,test]"
