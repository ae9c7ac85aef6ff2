"""Shared pytest fixtures: small synthetic CTs that every module's tests can use.

Fixtures (session-scoped, built once per test run; treat the images as read-only, copy with ``sitk.Image(img)``
before modifying):

``small_phantom``
    ``(ct, labels)`` from ``make_phantom(7, size=(96, 96, 32), spacing=(4.0, 4.0, 3.5),
    random_orientation=False)``: identity direction, 96 × 96 × 32 voxels of 4 × 4 × 3.5 mm (384 × 384 × 112 mm),
    ct int16 HU, labels uint8 with all four organs present. Builds in well under a second.
``small_phantom_oblique``
    The same anatomy (same seed) on a randomly oriented grid: x axis flipped and tilted by a few degrees
    (direction not identity, not axis-aligned); same size and spacing. Resampling one onto the other gives the
    same organs up to voxel sampling, which makes the pair useful for orientation tests.
``tiny_weights``
    Path of a checkpoint of a seeded random (untrained) SCONet, configuration A, with metadata ``{"note": "test"}``:
    a stand-in for the bundled model where only the plumbing matters.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from SCONetLib.phantom import make_phantom

SMALL_PHANTOM_SEED = 7
SMALL_PHANTOM_KWARGS = {"size": (96, 96, 32), "spacing": (4.0, 4.0, 3.5)}


@pytest.fixture(scope="session")
def small_phantom():
    """(ct int16 HU, labels uint8) of a small axis-aligned phantom (see module docstring)."""
    return make_phantom(SMALL_PHANTOM_SEED, random_orientation=False, **SMALL_PHANTOM_KWARGS)


@pytest.fixture(scope="session")
def small_phantom_oblique():
    """(ct, labels) of the ``small_phantom`` anatomy on a flipped, slightly oblique grid."""
    return make_phantom(SMALL_PHANTOM_SEED, random_orientation=True, **SMALL_PHANTOM_KWARGS)


@pytest.fixture(scope="session")
def tiny_weights(tmp_path_factory):
    """A seeded random SCONet saved as a checkpoint (see module docstring)."""
    import torch  # here, not at module level: the Python 3.9 leg runs the torch-free tests without torch

    from SCONetLib.checkpoint import save_checkpoint
    from SCONetLib.model import SCONet

    torch.manual_seed(2)
    return save_checkpoint(tmp_path_factory.mktemp("weights") / "tiny.pt", SCONet(), metadata={"note": "test"})


@pytest.fixture
def fake(tmp_path, monkeypatch):
    """``fake(**settings)`` (e.g. ``delay=…``, ``fail_in=…``) steers the ``FakeSegmenter`` of
    ``Testing/segmenter_factories.py`` in worker processes started after this fixture (they find the module
    through ``PYTHONPATH``)."""
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(Path(__file__).resolve().parent),
                                                      os.environ.get("PYTHONPATH", "")]))
    control = tmp_path / "fake.json"
    monkeypatch.setenv("SCONET_FAKE_CONTROL", str(control))

    def set_control(**settings):
        control.write_text(json.dumps(settings), encoding="utf-8")

    set_control()
    return set_control
