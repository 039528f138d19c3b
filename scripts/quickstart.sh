#!/usr/bin/env bash
# Installs DiLaServe into .venv and runs the main job on a small model built on the fly.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
model_dir="runs/quickstart-model"
.venv/bin/dilaserve init-model "$model_dir" --family llada
.venv/bin/dilaserve generate --model "$model_dir" --prompt "What is 12 + 30?" --gen-length 32 \
  --block-length 8 --threshold 0.9 --cache dual --json
