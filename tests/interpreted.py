"""Triton's CPU interpreter for the kernel tests (test_fused_moe.py, test_step_kernels.py): a test module's own
`__main__` runs its cases in one subprocess with TRITON_INTERPRET=1 (the interpreter must be chosen before the
kernels are defined, and must not leak into a GPU test of the same pytest run) and writes their results as JSON."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path


def interpreted_results(module_file: str, checkpoint: Path, out: Path) -> dict:
    """Run `python module_file checkpoint out` under the interpreter, the repository importable; its JSON results."""
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "TRITON_INTERPRET": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")]))}
    done = subprocess.run([sys.executable, module_file, str(checkpoint), str(out)], env=env, capture_output=True,
                          text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(out.read_text())
