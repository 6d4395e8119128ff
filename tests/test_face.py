"""The public face (`import omnilab as ol`): every name resolves to the object its module defines, no name is
also a module directly under omnilab/ (so `ol.X` does not change with what was imported before), `import
omnilab` alone reads neither torch nor pandas, and the numbered notebooks import the face, not submodules."""

from __future__ import annotations

import importlib
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest

import omnilab as ol
from omnilab import regress

PACKAGE = Path(ol.__file__).parent


FACE = [name for name in ol.__all__ if name != "__version__"]


@pytest.mark.parametrize("name", FACE)
def test_every_name_is_its_modules_own(name):
    value = getattr(ol, name)
    if isinstance(value, type(ol)):  # a module of the face
        assert value.__name__.startswith("omnilab.") and importlib.import_module(value.__name__) is value
    else:  # a class or function, the very object its defining module holds under the same name
        assert value.__module__.startswith("omnilab.")
        assert getattr(importlib.import_module(value.__module__), name) is value


def test_no_name_shadows_a_top_level_module():
    """A top-level module becomes an attribute of the package when anything imports it: a face name that is
    not that module would then change meaning."""
    top = {p.stem for p in PACKAGE.glob("*.py")} | {p.name for p in PACKAGE.iterdir() if (p / "__init__.py").exists()}
    assert [n for n in FACE if n in top and getattr(ol, n) is not importlib.import_module(f"omnilab.{n}")] == []


def test_unknown_names_raise_attribute_error():
    with pytest.raises(AttributeError, match="no attribute 'SelectiveMOE'"):
        ol.SelectiveMOE  # noqa: B018
    assert set(ol.__all__) <= set(dir(ol))


def test_import_is_light():
    code = "import sys, omnilab; print(sorted(m for m in ('torch', 'pandas', 'numpy', 'transformers') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={"PYTHONPATH": str(PACKAGE.parent)}).stdout
    assert out.strip() == "[]"


@pytest.mark.parametrize("book", regress.numbered_notebooks(), ids=lambda b: b.stem)
def test_notebooks_import_the_face(book):
    lines = [line for cell in regress.code_cells(nbformat.read(book, as_version=4)) for line in cell.splitlines()]
    imports = [line for line in lines if line.startswith(("import omnilab", "from omnilab"))]
    assert imports == ["import omnilab as ol"]
