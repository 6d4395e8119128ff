#!/usr/bin/env bash
# The tests: set up, then run the test suite (unit tests, parity against transformers, CLI, notebooks' code paths).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export MPLBACKEND=Agg
exec .venv/bin/python -m pytest -q "$@"
