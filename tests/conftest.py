"""Shared fixtures: tiny checkpoints written by transformers' own classes (omnilab.testing.synth), made once per session.

`make_checkpoint(kind, **text_overrides)` returns the folder of a tiny "omni" or "moe" checkpoint with those
text-decoder overrides, cached per (kind, overrides) so that several test files share one copy. Tests that
break a checkpoint must copy it first (`copy_checkpoint`).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from omnilab.testing import synth


@pytest.fixture(scope="session")
def make_checkpoint(tmp_path_factory):
    made: dict[str, Path] = {}

    def make(kind: str = "omni", **text) -> Path:
        key = kind + json.dumps(text, sort_keys=True)
        if key not in made:
            out = tmp_path_factory.mktemp(f"tiny-{kind}")
            build = synth.tiny_qwen3_omni if kind == "omni" else synth.tiny_qwen3_moe
            made[key] = build(out, **text)
        return made[key]

    return make


@pytest.fixture(scope="session")
def tiny_omni(make_checkpoint) -> Path:
    return make_checkpoint("omni")


@pytest.fixture(scope="session")
def tiny_moe(make_checkpoint) -> Path:
    return make_checkpoint("moe")


@pytest.fixture
def copy_checkpoint(tmp_path):
    """copy_checkpoint(src) -> a private copy in this test's tmp_path, safe to break."""

    def copy(src: Path) -> Path:
        dst = tmp_path / Path(src).name
        shutil.copytree(src, dst)
        return dst

    return copy
