"""JSON in and out, the project's one way: atomic writes (a unique temporary name, fsync, then rename:
omnilab.outdir) and a `default` that turns numpy / torch / pandas values into JSON values."""

from __future__ import annotations

import json
from pathlib import Path


def write_json(path: Path, obj, indent: int = 2) -> None:
    """Write JSON under a unique temporary name, fsync, then rename: a killed run never leaves a half-written
    file, and two writers never share a temporary."""
    from omnilab.outdir import atomic_write

    atomic_write(Path(path), json.dumps(obj, indent=indent, default=jsonable) + "\n")


def jsonable(x):
    """json.dumps' `default` for numpy / torch scalars and arrays and pandas objects."""
    if hasattr(x, "item"):
        return x.item()
    if hasattr(x, "tolist"):
        return x.tolist()
    if hasattr(x, "to_dict"):
        return x.to_dict()
    return str(x)
