#!/usr/bin/env bash
# The main job: set up, then execute every numbered notebook with papermill on the embedded default model
# (data/omni-tiny), writing executed notebooks, figures and metrics to runs/latest/ and checking the metrics
# against notebooks/baselines.json.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export MPLBACKEND=Agg
exec .venv/bin/omnilab regress --out "${1:-runs/latest}"
