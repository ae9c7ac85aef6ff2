"""Where the tests find their data files: the vendored ``Testing/data`` first, then the reference folder ``shared``
beside the checkout (``../shared``), then ``/work/shared``.

``data_file("golden/surf3d/volume_a.nii.gz")`` returns the first existing path, or skips the test (saying where it
looked) when none exists.
"""
from __future__ import annotations

from pathlib import Path

import pytest

ROOTS = (Path(__file__).resolve().parent / "data", Path(__file__).resolve().parents[2] / "shared",
         Path("/work/shared"))


def data_file(relative: str) -> Path:
    """Path of a test data file given relative to a data root, e.g. ``"real/example_ct_sm.nii.gz"``."""
    for root in ROOTS:
        if (root / relative).is_file():
            return root / relative
    pytest.skip(f"test data {relative!r} not found under {', '.join(str(r) for r in ROOTS)}")
