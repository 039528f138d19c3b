#!/usr/bin/env bash
# Installs DiLaServe into .venv and runs the main job: the demo (a static baseline and
# DiLaServe serving the embedded model on a local Ray cluster, same bursty trace).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/dilaserve demo --out runs/demo "$@"
