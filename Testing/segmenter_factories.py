"""Segmenter factories for tests that run the real worker process (``python -m SCONetLib.worker --factory
segmenter_factories:NAME``, with this folder on ``PYTHONPATH``).

``FakeSegmenter`` "segments" by reading the labels stored in the voxels: ``segment(spacing)`` resamples the
prepared image (nearest neighbour, SimpleITK, using the image's own geometry) onto the input grid or
``Grid.with_spacing(spacing)``, as the real segmenter's output grid is. It needs no torch. Its behaviour is steered
at run time by the JSON file named by ``$SCONET_FAKE_CONTROL`` (read at every call): ``delay`` (seconds per call,
spread over 5 progress steps), ``fail_in`` (stage raising ``ValueError``), ``warn`` (a warning issued by
``prepare``), ``print`` (text printed to stdout by ``prepare``, which must not disturb the protocol).

``untrained`` is the real ``SCONetLib.infer.Segmenter`` around a seeded, untrained configuration-A model with
2,000 points (labels are meaningless; the API, geometry and the prepare-once contract are what tests check); given
``weights`` it loads them as ``Segmenter`` does.
"""
from __future__ import annotations

import json
import os
import time
import warnings

import SimpleITK as sitk

from SCONetLib.geometry import Grid
from SCONetLib.progress import report

#: Environment variable naming the control file.
CONTROL_VARIABLE = "SCONET_FAKE_CONTROL"


def control() -> dict:
    path = os.environ.get(CONTROL_VARIABLE)
    if not path or not os.path.exists(path):
        return {}
    with open(path, encoding="utf-8") as file:
        return json.load(file)


class FakeSegmenter:
    def __init__(self, weights=None, device="auto"):
        self.weights, self.device = weights, device
        self.image = None

    @property
    def is_prepared(self):
        return self.image is not None

    def prepare(self, image, progress=None):
        self.image = None
        self._steps("prepare", progress)
        if control().get("warn"):
            warnings.warn(control()["warn"])
        if control().get("print"):
            print(control()["print"])
        self.image = image

    def segment(self, spacing=None, progress=None, postprocess=False):
        self._steps("segment", progress)
        return self._resampled(spacing, sitk.sitkUInt8)

    def probabilities(self, spacing=None, progress=None):
        self._steps("probabilities", progress)
        labels = self._resampled(spacing, sitk.sitkFloat32)
        entropy = sitk.Cast(labels > 0, sitk.sitkFloat32) * 0.25
        entropy.CopyInformation(labels)
        return sitk.Compose([labels] * 5), entropy

    def _steps(self, stage, progress):
        settings = control()
        for step in range(5):
            if settings.get("fail_in") == stage:
                raise ValueError(f"{stage} failed on purpose")
            report(progress, step / 4, f"{stage} {step}")
            time.sleep(float(settings.get("delay", 0.0)) / 5)

    def _resampled(self, spacing, pixel_type):
        grid = Grid.of(self.image)
        out = grid if spacing is None else grid.with_spacing(spacing)
        return sitk.Resample(self.image, out.size, sitk.Transform(), sitk.sitkNearestNeighbor, out.origin,
                             out.spacing, out.direction, 0, pixel_type)


def untrained(weights=None, device="cpu"):
    import torch

    from SCONetLib.infer import Segmenter
    from SCONetLib.model import build_model

    if weights is not None:
        return Segmenter(weights=weights, device=device, n_points=2000)
    torch.manual_seed(0)
    return Segmenter.from_model(build_model("A"), device=device, n_points=2000)
