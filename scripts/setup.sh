#!/usr/bin/env bash
# Set up (or refresh) the project's virtual environment in .venv: idempotent, fast when nothing changed.
# Installs PyTorch's CPU build first (torch==2.13.0; a bare `torch` requirement would pull a multi-GB CUDA
# build), then omnilab itself, editable, with everything pyproject.toml lists.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=${OMNILAB_VENV:-.venv}
if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating $VENV with $($PYTHON --version)"
  "$PYTHON" -m venv "$VENV"
fi
PY="$VENV/bin/python"
stamp="$VENV/.omnilab-setup"
want="$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && "$PY" -c "import omnilab, torch, transformers" 2>/dev/null; then
  exit 0
fi
"$PY" -m pip install -q --upgrade pip
if ! "$PY" -c "import torch" 2>/dev/null; then
  echo "[setup] installing torch (CPU build)"
  "$PY" -m pip install -q "torch==${OMNILAB_TORCH:-2.13.0}" || "$PY" -m pip install -q torch
fi
echo "[setup] installing omnilab and its dependencies"
"$PY" -m pip install -q -e .
echo "$want" > "$stamp"
