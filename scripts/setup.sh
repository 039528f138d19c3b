#!/usr/bin/env bash
# Creates (or reuses) the virtual environment at .venv and installs DiLaServe into it.
# Usage: bash scripts/setup.sh [extras]     e.g. bash scripts/setup.sh test
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-}"
python="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$python" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip >/dev/null
# Install the CPU build of torch first when none is present: asked for by a range, pip would
# pull a multi-GB CUDA build. On GPU machines install your CUDA torch before this script.
if ! .venv/bin/python -c "import torch" >/dev/null 2>&1; then
  .venv/bin/python -m pip install -q "torch==2.13.0" 2>&1 | grep -v "is ignored" || true
fi
if [ -n "$extras" ]; then
  .venv/bin/python -m pip install -q -e ".[$extras]" 2>&1 | grep -v "is ignored" || true
else
  .venv/bin/python -m pip install -q -e . 2>&1 | grep -v "is ignored" || true
fi
.venv/bin/python -c "import dilaserve, torch; print(f'dilaserve {dilaserve.__version__} ready in .venv (torch {torch.__version__})')"
