#!/usr/bin/env bash
# Installs DiLaServe with its test dependencies into .venv and runs the whole CPU test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh test
exec .venv/bin/python -m pytest tests "$@"
