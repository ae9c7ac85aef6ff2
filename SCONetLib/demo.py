"""The demo: segment a synthetic phantom with the bundled model, score it against the phantom's truth, draw it.

:func:`run_demo` makes a phantom CT with a fixed seed (:func:`SCONetLib.phantom.make_phantom`), segments it with
:func:`SCONetLib.segment.segment_image` (bundled model unless told otherwise), compares with the phantom's true
labels (Dice per organ) and writes, into one folder and as one all-or-nothing set: the label map and its JSON
sidecar (with the Dice), the CT and the true labels (to open in 3D Slicer), and a PNG figure
(:func:`SCONetLib.figures.demo_figure`). ``sconet-segment --demo`` (or ``sconet-segment`` alone) runs it.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import SimpleITK as sitk

from . import io as sconet_io
from .checkpoint import default_weights_path
from .figures import demo_figure, png_output
from .infer import Segmenter
from .labels import ORGANS
from .metrics import dice
from .phantom import make_phantom
from .points.cloud import DEFAULT_N_POINTS
from .progress import ProgressCallback, report, sub_progress
from .segment import OutputPlan, SegmentationResult, recording_warnings, segment_image

logger = logging.getLogger(__name__)

#: Seed of the demo phantom (far from the small seeds that training data sets use).
DEMO_SEED = 20_250_101
#: Demo phantom size (i, j, k); the slice count is drawn by the phantom to cover 150–300 mm.
DEMO_SIZE = (256, 256, None)
#: Default output folder.
DEMO_FOLDER = "sconet-demo"


@dataclass
class DemoResult:
    """Files and numbers of a demo run: ``result`` of the segmentation, ``dice`` per organ against the phantom's
    truth, and the figure, CT and truth paths."""

    result: SegmentationResult
    dice: dict
    figure: Path
    ct: Path
    truth: Path


def run_demo(out_dir=DEMO_FOLDER, weights=None, device: str = "auto", dense: bool = False, seed: int = DEMO_SEED,
             size=None, n_points: int = DEFAULT_N_POINTS, progress: ProgressCallback | None = None) -> DemoResult:
    """Segment a synthetic phantom and write the label map, sidecar, CT, truth and a PNG figure into ``out_dir``.

    Parameters
    ----------
    out_dir : str or Path
        Output folder (created if needed): ``phantom_sconet.nii.gz`` (+ ``.json`` sidecar with Dice per organ),
        ``phantom_sconet.png``, ``phantom_ct.nii.gz``, ``phantom_truth.nii.gz``.
    weights, device, dense, n_points
        As for :func:`SCONetLib.segment.segment_file` (default: the bundled model).
    seed : int
        Phantom seed (default :data:`DEMO_SEED`).
    size : (3,) phantom size, optional (default :data:`DEMO_SIZE`).
    progress : callable(fraction, message), optional
        May raise :class:`SCONetLib.progress.Cancelled`; nothing is written then.
    """
    start = time.perf_counter()
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"demo output folder {str(out_dir)!r} exists and is not a folder")
    weights = default_weights_path() if weights is None else Path(weights)   # fail before any work if missing
    size = DEMO_SIZE if size is None else tuple(size)
    plan = OutputPlan.make(out_dir / "phantom_sconet.nii.gz")
    plan.prepare_folders()
    paths = {"figure": out_dir / "phantom_sconet.png", "ct": out_dir / "phantom_ct.nii.gz",
             "truth": out_dir / "phantom_truth.nii.gz"}
    arguments = {"demo": True, "phantom_seed": seed, "phantom_size": list(size), "output_dir": str(out_dir),
                 "device": device, "weights": str(weights), "dense": dense, "n_points": n_points}
    with recording_warnings() as messages:
        segmenter = Segmenter(weights=weights, device=device, n_points=n_points)
        ct, truth = make_phantom(seed, size=size, random_orientation=False,
                                 progress=sub_progress(progress, 0.0, 0.1))
        result = segment_image(ct, plan, segmenter, None, dense, arguments, None,
                               sub_progress(progress, 0.1, 0.95))
    result.warnings = result.sidecar["warnings"] = messages
    predicted, expected = sitk.GetArrayViewFromImage(result.labels), sitk.GetArrayViewFromImage(truth)
    scores = {organ.name: dice(predicted, expected, organ.label) for organ in ORGANS}
    result.sidecar["dice"] = scores
    report(progress, 0.95, "drawing the figure")
    figure = demo_figure(ct, result.labels, truth, scores)
    extra = [png_output(figure, paths["figure"]),
             sconet_io.image_output(ct, paths["ct"]), sconet_io.image_output(truth, paths["truth"])]
    result.files = sconet_io.write_outputs(result.outputs(start) + extra)
    report(progress, 1.0, "demo done")
    logger.info("demo written to %s", out_dir)
    return DemoResult(result, scores, paths["figure"], paths["ct"], paths["truth"])
