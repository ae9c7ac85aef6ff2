"""Docstrings: every example runs (or is marked ``+SKIP``) and sources are public (never the project's ``shared/``)."""
import doctest
import importlib
import re
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "SCONetLib"
MODULES = sorted(".".join(p.relative_to(PACKAGE.parent).with_suffix("").parts).removesuffix(".__init__")
                 for p in PACKAGE.rglob("*.py") if p.name != "__main__.py")


@pytest.mark.parametrize("name", MODULES)
def test_doctests_pass_or_are_skipped(name):
    module = importlib.import_module(name)
    results = doctest.testmod(module, verbose=False, report=False)
    assert results.failed == 0, f"{name}: {results.failed} of {results.attempted} doctest examples fail"


def test_doctest_examples_exist_and_are_checked():
    """The examples of the package docstring are collected (so the test above can fail)."""
    import SCONetLib

    examples = doctest.DocTestFinder().find(SCONetLib, "SCONetLib")[0].examples
    assert len(examples) >= 4 and all(e.options.get(doctest.SKIP) for e in examples)


@pytest.mark.parametrize("path", sorted(PACKAGE.rglob("*.py")), ids=lambda p: p.relative_to(PACKAGE).as_posix())
def test_sources_cite_public_references_only(path):
    assert not re.search(r"\bshared/", path.read_text(encoding="utf-8")), \
        f"{path.name} cites shared/, which is not part of the repository; cite the paper or a public repository"


def test_points_surf3d_function_does_not_hide_its_module():
    import SCONetLib.points as points

    module = importlib.import_module("SCONetLib.points.surf")
    assert callable(points.surf3d) and points.surf3d is module.surf3d and points.surf is module
