#!/usr/bin/env bash
# The tests: set up, then the test suite (unit tests, parity against transformers, CLI, the notebooks as committed)
# and every notebook executed as its users run it, through nbval (`pytest --nbval-lax`, one notebook at a time: a
# cell that raises fails; outputs are not compared). Each phase is named as it starts and timed as it ends, and
# the slowest tests of all phases are listed at the end. With arguments, pytest runs just those
# (e.g. tests/test_cli.py).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export MPLBACKEND=Agg
if [ "$#" -gt 0 ]; then
  exec .venv/bin/python -m pytest -q "$@"
fi
reports=$(mktemp -d)
trap 'rm -rf "$reports"' EXIT
books=(notebooks/[0-9][0-9]_*.ipynb)
phases=$((1 + ${#books[@]}))
failed=()
phase() {  # phase N NAME REPORT PYTEST-ARGS...: one pytest run, named and timed
  local n=$1 name=$2 report=$3
  shift 3
  local start=$SECONDS
  echo "[test] $n/$phases $name"
  if .venv/bin/python -m pytest -q -o console_output_style=count --junitxml="$reports/$report.xml" "$@"; then
    echo "[test] $n/$phases $name: passed ($((SECONDS - start)) s)"
  else
    echo "[test] $n/$phases $name: FAILED ($((SECONDS - start)) s)"
    failed+=("$name")
  fi
}
phase 1 "unit tests (tests/)" unit tests
n=1
export OMNILAB_HEADLESS=1  # unattended: explorers draw their first view and open no widget (omnilab.plots.headless)
for book in "${books[@]}"; do
  n=$((n + 1))
  phase "$n" "notebook $(basename "$book") through nbval" "nb$n" --nbval-lax "$book"
done
.venv/bin/python - "$reports" <<'PY'
import sys, pathlib, xml.etree.ElementTree as ET
cases = [(float(c.get("time", 0)), f"{c.get('classname', '')}::{c.get('name', '')}")
         for f in sorted(pathlib.Path(sys.argv[1]).glob("*.xml")) for c in ET.parse(f).iter("testcase")]
print(f"[test] the slowest of {len(cases)} tests:")
for t, name in sorted(cases, reverse=True)[:15]:
    print(f"  {t:8.1f} s  {name}")
PY
if [ "${#failed[@]}" -gt 0 ]; then
  printf '[test] FAILED: %s\n' "${failed[@]}"
  exit 1
fi
echo "[test] all $phases phases passed"
