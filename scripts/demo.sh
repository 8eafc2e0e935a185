#!/usr/bin/env bash
# Run the demo (installs into .venv first if needed). Extra args go to `tpr demo`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
export TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 RAY_USAGE_STATS_ENABLED=0
exec .venv/bin/tpr demo "$@"
