#!/usr/bin/env bash
# The tests: set up, then the test suite (unit tests, parity against transformers, CLI, the notebooks as files)
# and every notebook executed as its users run it, through nbval (`pytest --nbval-lax notebooks`: a cell that
# raises fails; outputs are not compared). With arguments, pytest runs just those (e.g. tests/test_cli.py).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export MPLBACKEND=Agg
if [ "$#" -gt 0 ]; then
  exec .venv/bin/python -m pytest -q "$@"
fi
exec .venv/bin/python -m pytest -q --nbval-lax tests notebooks
