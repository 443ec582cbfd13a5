#!/usr/bin/env bash
# Set up Genesis in ./.venv on a fresh machine (CPU or GPU).
# NOTE: torch is installed FIRST and pinned: on a CPU box `pip install torch==2.13.0` takes the local CPU
# wheel, whereas letting the project's dependencies pull torch would download several GB of CUDA wheels.
set -euo pipefail
cd "$(dirname "$0")"
PYTHON="${PYTHON:-python3.11}"
command -v "$PYTHON" >/dev/null || PYTHON=python3
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
    .venv/bin/python -m pip install -q "torch==${GENESIS_TORCH_VERSION:-2.13.0}"
fi
.venv/bin/python -m pip install -q -e ".[dev]"
.venv/bin/python -c "import torch, genesis; print(f'genesis ready: torch {torch.__version__}')"
