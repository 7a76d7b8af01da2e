#!/usr/bin/env bash
# The main job: sets up .venv, then generates a picture for a prompt with the shipped Shapes pipeline
# (pipelines/mmdit-shapes), offline. Usage: bash scripts/run.sh ["a prompt"] [generate options...]
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
prompt="${1:-a red circle left of a blue square}"
shift || true
# the shipped model is tiny: one thread is faster than two fighting over small matmuls
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
.venv/bin/mmdit-diffusers generate "$prompt" "$@"
