#!/usr/bin/env bash
# The GPU test suite (tests/gpu/, every test skipped without CUDA) on a GPU machine, e.g. through the device tool:
#   bash scripts/gpu_tests.sh            # writes $OUT/gpu_tests.md (default bench/results/) and its log
# Newer wheels the machine lacks (transformers, huggingface_hub, ...) are installed from .whl/ when it is there.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-bench/results}
PY=${PYTHON:-python3}
mkdir -p "$out"
if compgen -G ".whl/*.whl" >/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || exit 1
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
gpu=$(nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null | head -1)
versions=$("$PY" -c "import torch, transformers; print(f'torch {torch.__version__}, transformers {transformers.__version__}')")
start=$SECONDS
"$PY" -m pytest -q -p no:cacheprovider -rA tests/gpu "$@" 2>&1 | tee "$out/gpu_tests.log"
rc=${PIPESTATUS[0]}
{
  echo "GPU test suite, $(date -u +%Y-%m-%d), ${gpu:-no GPU}; $versions; commit ${COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo '?')}"
  echo
  echo "\`bash scripts/gpu_tests.sh $*\` (pytest -q -rA tests/gpu), exit $rc, $((SECONDS - start)) s"
  echo
  # counted from -rA's lines (with -q given twice pytest prints no 'N passed' line)
  for outcome in PASSED FAILED ERROR SKIPPED; do echo "$outcome: $(grep -c "^$outcome" "$out/gpu_tests.log")"; done
  echo
  echo '```'
  grep -E "^(PASSED|FAILED|ERROR|SKIPPED)|passed|failed" "$out/gpu_tests.log"
  echo '```'
} > "$out/gpu_tests.md"
exit "$rc"
