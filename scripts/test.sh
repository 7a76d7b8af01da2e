#!/usr/bin/env bash
# The test command: sets up .venv and runs the whole suite on CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export TOKENIZERS_PARALLELISM=false
.venv/bin/python -m pytest tests "$@"
