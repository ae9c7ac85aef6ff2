"""The package's public surface: lazy exports, and a light ``import SCONetLib`` (no torch at import time)."""
import subprocess
import sys

import pytest

import SCONetLib


def test_import_does_not_load_torch():
    code = "import sys, SCONetLib; sys.exit(int('torch' in sys.modules))"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


@pytest.mark.parametrize("name", SCONetLib.__all__)
def test_public_names_resolve(name):
    assert getattr(SCONetLib, name).__name__ == name


def test_unknown_name_is_an_attribute_error():
    with pytest.raises(AttributeError, match="has no attribute 'segmenter'"):
        SCONetLib.segmenter
