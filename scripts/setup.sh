#!/usr/bin/env bash
# Set up (or refresh) the project's virtual environment in .venv: idempotent, fast when nothing changed.
# Installs PyTorch first, then omnilab itself, editable, with everything pyproject.toml lists (JupyterLab,
# papermill, nbval...), and the git filter that commits notebooks/*.ipynb without their outputs.
# One line per step; pip's own output goes to $VENV/setup.log, whose tail is printed if a step fails.
#
# Which torch: torch==$OMNILAB_TORCH (default 2.13.0) from pip's configured index. On this workplace's machines
# that index holds a CPU build. Elsewhere, PyPI's Linux `torch` is the CUDA build (several GB of CUDA
# libraries); for a CPU-only machine ask PyTorch's CPU index instead:
#   OMNILAB_TORCH_INDEX=https://download.pytorch.org/whl/cpu bash scripts/setup.sh
# (pip's --index-url; any other PyTorch wheel index, e.g. .../whl/cu126, picks that CUDA build). A torch already
# in the environment is kept.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=${OMNILAB_VENV:-.venv}
PY="$VENV/bin/python"
stamp="$VENV/.omnilab-setup"
want="$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)"
# the notebook output filter (cheap, idempotent; outside a git checkout it says so and goes on)
said="$("$PYTHON" scripts/nbclean.py --install 2>&1 || echo "notebook output filter not installed")"
[ -z "$said" ] || echo "[setup] $said"
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
  torch_spec="torch==${OMNILAB_TORCH:-2.13.0}"
  if [ -n "${OMNILAB_TORCH_INDEX:-}" ]; then
    step "installing $torch_spec from $OMNILAB_TORCH_INDEX" "$PY" -m pip install --index-url "$OMNILAB_TORCH_INDEX" "$torch_spec"
  else
    echo "[setup] (for a CPU-only build from PyTorch's index: OMNILAB_TORCH_INDEX=https://download.pytorch.org/whl/cpu)"
    step "installing $torch_spec from pip's configured index" "$PY" -m pip install "$torch_spec"
  fi
fi
step "installing omnilab (editable) and its dependencies from pyproject.toml" "$PY" -m pip install -e .
echo "$want" > "$stamp"
echo "[setup] ready: $VENV/bin/omnilab, $VENV/bin/jupyter lab ($(cat "$log" | wc -l) lines of pip output in $log)"
