"""The project's own set-up: pyproject.toml and environment.yml agree; the console command exists."""

import subprocess
import sys
import tomllib
from pathlib import Path

import yaml  # papermill's own dependency

from packaging.requirements import Requirement

REPO = Path(__file__).resolve().parent.parent


def _normalise(specs):
    out = {}
    for s in specs:
        if s.startswith("-e"):
            continue
        r = Requirement(s)
        out[r.name.lower().replace("_", "-")] = str(r.specifier)
    return out


def test_environment_yml_matches_pyproject():
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    env = yaml.safe_load((REPO / "environment.yml").read_text())
    pip_deps = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict) and "pip" in d)
    assert _normalise(pip_deps) == _normalise(pyproject)


def test_module_entry_point_runs():
    out = subprocess.run([sys.executable, "-m", "omnilab", "--help"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    for verb in ("inspect", "verify", "synth", "compare", "generate", "extract", "regress"):
        assert verb in out.stdout


def test_readme_names_the_commands_ci_runs():
    readme = (REPO / "README.md").read_text()
    ci = (REPO / ".ci" / "run").read_text()
    for command in ("bash scripts/test.sh", "bash scripts/main.sh"):
        assert command in readme and command in ci
