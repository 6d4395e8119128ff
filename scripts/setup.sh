#!/usr/bin/env bash
# Set up (or refresh) the project's virtual environment in .venv: idempotent, fast when nothing changed.
# Installs PyTorch's CPU build first (torch==2.13.0; a bare `torch` requirement would pull a multi-GB CUDA
# build), then omnilab itself, editable, with everything pyproject.toml lists (JupyterLab, papermill, nbval...).
# One line per step; pip's own output goes to $VENV/setup.log, whose tail is printed if a step fails.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=${OMNILAB_VENV:-.venv}
PY="$VENV/bin/python"
stamp="$VENV/.omnilab-setup"
want="$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && "$PY" -c "import omnilab, torch, transformers" 2>/dev/null; then
  exit 0
fi
log="$VENV/setup.log"
step() {  # step DESCRIPTION COMMAND...: one line, the command's output into the log
  local what=$1
  shift
  echo "[setup] $what"
  if ! "$@" >>"$log" 2>&1; then
    echo "[setup] FAILED: $what; the end of $log:" >&2
    tail -n 25 "$log" >&2
    exit 1
  fi
}
if [ ! -x "$PY" ]; then
  echo "[setup] creating $VENV with $($PYTHON --version 2>&1)"
  "$PYTHON" -m venv "$VENV"
fi
: > "$log"
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_WARN_SCRIPT_LOCATION=1
step "upgrading pip" "$PY" -m pip install --upgrade pip
if ! "$PY" -c "import torch" 2>/dev/null; then
  step "installing torch ${OMNILAB_TORCH:-2.13.0} (CPU build)" \
    bash -c "'$PY' -m pip install 'torch==${OMNILAB_TORCH:-2.13.0}' || '$PY' -m pip install torch"
fi
step "installing omnilab (editable) and its dependencies from pyproject.toml" "$PY" -m pip install -e .
echo "$want" > "$stamp"
echo "[setup] ready: $VENV/bin/omnilab, $VENV/bin/jupyter lab ($(cat "$log" | wc -l) lines of pip output in $log)"
