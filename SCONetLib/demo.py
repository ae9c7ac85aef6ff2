"""The demo run by ``sconet-segment`` without an input: segment a synthetic phantom and draw a figure.

:func:`run_demo` makes a phantom CT with a fixed seed (:func:`SCONetLib.phantom.make_phantom`), segments it
with :func:`SCONetLib.segment.segment_file` (bundled model unless told otherwise), compares with the phantom's
true labels (Dice per organ) and writes, into one folder: the label map and its JSON sidecar, the CT and the
true labels (to open in 3D Slicer), and a PNG figure made by :func:`make_figure` (axial and coronal slices with
organ overlays, SCONet above the truth, a legend with each organ's Dice). The figure is composed with numpy and
written with SimpleITK; text is rendered with VTK's FreeType tools (no matplotlib, no display needed).
"""
from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from .checkpoint import default_weights_path
from .io import atomic_output, write_image
from .labels import ORGANS
from .phantom import make_phantom
from .points.cloud import DEFAULT_N_POINTS
from .progress import ProgressCallback, report, sub_progress
from .segment import SegmentationResult, segment_file

logger = logging.getLogger(__name__)

#: Seed of the demo phantom (far from the small seeds that training data sets use).
DEMO_SEED = 20_250_101
#: Demo phantom size (i, j, k); the slice count is drawn by the phantom to cover 150–300 mm.
DEMO_SIZE = (256, 256, None)
#: CT display window (level, width), HU: soft-tissue abdomen.
WINDOW_HU = (40.0, 400.0)
#: Opacity of the organ fill over the CT; organ outlines are drawn opaque.
OVERLAY_ALPHA = 0.4
#: Largest side of one slice panel, pixels.
MAX_PANEL_PX = 320
#: Background colour of the figure, text colour, gap between panels (px) and text height (px).
_BACKGROUND = np.array([16, 16, 16], np.uint8)
_TEXT_RGB = (1.0, 1.0, 1.0)
_GAP = 6
_TEXT_PX = 15


@dataclass
class DemoResult:
    """Files and numbers of a demo run: ``result`` of the segmentation, plus the figure, CT and truth paths."""

    result: SegmentationResult
    figure: Path
    ct: Path
    truth: Path


def run_demo(out_dir="sconet-demo", weights=None, device: str = "auto", dense: bool = False, seed: int = DEMO_SEED,
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
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"demo output folder {str(out_dir)!r} exists and is not a folder")
    weights = default_weights_path() if weights is None else Path(weights)   # fail before any work if missing
    size = DEMO_SIZE if size is None else tuple(size)
    ct, truth = make_phantom(seed, size=size, random_orientation=False, progress=sub_progress(progress, 0.0, 0.1))
    arguments = {"demo": True, "phantom_seed": seed, "phantom_size": list(size), "output_dir": str(out_dir),
                 "device": device, "weights": str(weights), "dense": dense, "n_points": n_points}
    result = segment_file(ct, out_dir / "phantom_sconet.nii.gz", device=device, weights=weights, dense=dense,
                          n_points=n_points, reference=truth, arguments=arguments,
                          progress=sub_progress(progress, 0.1, 0.95))
    report(progress, 0.95, "drawing the figure")
    paths = {"figure": out_dir / "phantom_sconet.png", "ct": out_dir / "phantom_ct.nii.gz",
             "truth": out_dir / "phantom_truth.nii.gz"}
    written = []
    try:
        written.append(write_png(make_figure(ct, result.labels, truth, result.dice), paths["figure"]))
        written.append(write_image(ct, paths["ct"]))
        written.append(write_image(truth, paths["truth"]))
    except BaseException:
        for path in written + result.files:
            with contextlib.suppress(OSError):
                Path(path).unlink()
        raise
    report(progress, 1.0, "demo done")
    logger.info("demo written to %s", out_dir)
    return DemoResult(result, paths["figure"], paths["ct"], paths["truth"])


def make_figure(ct: sitk.Image, labels: sitk.Image, truth: sitk.Image | None = None,
                dice: dict | None = None) -> np.ndarray:
    """Axial and coronal CT slices with coloured organ overlays, as an RGB array.

    Parameters
    ----------
    ct : sitk.Image, CT in HU, any geometry (LPS).
    labels : sitk.Image, organ label map (values of :data:`SCONetLib.labels.ORGANS`), any grid over ``ct``.
    truth : sitk.Image, optional; a second label map drawn in a second row ("Truth").
    dice : organ name → Dice, optional; printed in the legend.

    Returns
    -------
    (H, W, 3) uint8 array
        Row per label map (title, then axial | coronal), and a legend of organ colours. Slices are the axial
        and coronal planes that cut the organs best (of ``truth`` if given; see :func:`_richest_slice`), after
        resampling to an axis-aligned grid with square
        pixels; axial images are in radiological convention (patient's right on the left, anterior up), coronal
        images have the head up.
    """
    pixel_mm = max(min(ct.GetSpacing()), _box_extent(ct).max() / MAX_PANEL_PX)
    reference = _axis_aligned_grid(ct, pixel_mm)
    hu = sitk.GetArrayFromImage(_resample(ct, reference, sitk.sitkLinear, -1024.0)).astype(np.float32)
    rows = [("SCONet", labels)] + ([("Truth", truth)] if truth is not None else [])
    maps = [sitk.GetArrayFromImage(_resample(image, reference, sitk.sitkNearestNeighbor, 0)) for _, image in rows]
    k = _richest_slice(maps[-1], axis=0)         # through the truth's organs if given, else the labels'
    j = _richest_slice(maps[-1], axis=1)
    gray = _window(hu)
    blocks = []
    for (title, _), label_array in zip(rows, maps):
        axial = _overlay(gray[k], label_array[k])
        coronal = _overlay(gray[::-1, j, :], label_array[::-1, j, :])     # superior at the top
        blocks.append(_text_block(f"{title}: axial (left) and coronal (right)"))
        blocks.append(_hstack([axial, coronal]))
    blocks.append(_legend(dice or {}))
    return _vstack(blocks)


def _richest_slice(labels: np.ndarray, axis: int) -> int:
    """Index along ``axis`` of the slice maximising the sum over organs of sqrt(organ pixels in the slice).

    The square root favours slices cutting several organs well over slices full of one large organ.
    """
    others = tuple(a for a in range(labels.ndim) if a != axis)
    counts = np.stack([np.count_nonzero(labels == organ.label, axis=others) for organ in ORGANS])
    return int(np.argmax(np.sqrt(counts).sum(axis=0)))


def _box_extent(image: sitk.Image) -> np.ndarray:
    """(3,) LPS extent (mm) of the image's voxel box."""
    return np.ptp(_box_corners(image), axis=0)


def _box_corners(image: sitk.Image) -> np.ndarray:
    """(8, 3) LPS corners of the voxel box (outer faces of the edge voxels)."""
    size = image.GetSize()
    return np.array([image.TransformContinuousIndexToPhysicalPoint((a, b, c))
                     for a in (-0.5, size[0] - 0.5) for b in (-0.5, size[1] - 0.5) for c in (-0.5, size[2] - 0.5)])


def _axis_aligned_grid(image: sitk.Image, pixel_mm: float) -> sitk.Image:
    """Empty identity-direction image with ``pixel_mm`` isotropic voxels covering ``image``'s box."""
    corners = _box_corners(image)
    low, extent = corners.min(axis=0), np.ptp(corners, axis=0)
    size = [max(1, int(np.ceil(e / pixel_mm))) for e in extent]
    grid = sitk.Image(size, sitk.sitkUInt8)
    grid.SetSpacing((pixel_mm,) * 3)
    grid.SetOrigin(tuple(low + pixel_mm / 2.0))
    return grid


def _resample(image: sitk.Image, reference: sitk.Image, interpolator, default: float) -> sitk.Image:
    return sitk.Resample(image, reference, sitk.Transform(), interpolator, default, image.GetPixelID())


def _window(hu: np.ndarray) -> np.ndarray:
    """HU → [0, 1] float32 gray levels with the :data:`WINDOW_HU` level and width."""
    level, width = WINDOW_HU
    return np.clip((hu - (level - width / 2.0)) / width, 0.0, 1.0).astype(np.float32)


def _overlay(gray: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """(H, W) gray in [0, 1] and (H, W) labels → (H, W, 3) uint8 with filled, outlined organs."""
    rgb = np.repeat(gray[..., None], 3, axis=2)
    for organ in ORGANS:
        mask = labels == organ.label
        if not mask.any():
            continue
        colour = np.asarray(organ.color, np.float32) / 255.0
        rgb[mask] = (1.0 - OVERLAY_ALPHA) * rgb[mask] + OVERLAY_ALPHA * colour
        rgb[mask & ~ndimage.binary_erosion(mask)] = colour
    return np.round(rgb * 255.0).astype(np.uint8)


def _legend(dice: dict) -> np.ndarray:
    """One line per organ: colour swatch, name, and Dice when known."""
    lines = []
    for organ in ORGANS:
        swatch = np.broadcast_to(np.asarray(organ.color, np.uint8), (_TEXT_PX, _TEXT_PX, 3))
        score = f"   Dice {dice[organ.name]:.3f}" if organ.name in dice else ""
        lines.append(_hstack([swatch, _text_block(f"{organ.display_name}{score}")], gap=_GAP))
    return _vstack(lines, gap=2)


def _text_block(text: str) -> np.ndarray:
    """(h, w, 3) uint8 image of ``text`` on the background (a thin empty strip if VTK cannot render text)."""
    alpha = _render_text(text)
    if alpha is None:
        return np.broadcast_to(_BACKGROUND, (4, 4, 3)).copy()
    colour = np.asarray(_TEXT_RGB, np.float32) * 255.0
    a = alpha[..., None].astype(np.float32) / 255.0
    return np.round((1.0 - a) * _BACKGROUND + a * colour).astype(np.uint8)


def _render_text(text: str) -> np.ndarray | None:
    """(h, w) uint8 coverage of ``text`` rendered by VTK's FreeType tools, or ``None`` if unavailable."""
    try:
        import vtk
        from vtk.util.numpy_support import vtk_to_numpy
    except ImportError:
        return None
    prop = vtk.vtkTextProperty()
    prop.SetFontSize(_TEXT_PX)
    prop.SetColor(*_TEXT_RGB)
    prop.SetFontFamilyToArial()
    image = vtk.vtkImageData()
    if not vtk.vtkFreeTypeTools.GetInstance().RenderString(prop, text, 72, image):
        return None
    width, height, _ = image.GetDimensions()
    rgba = vtk_to_numpy(image.GetPointData().GetScalars()).reshape(height, width, -1)
    coverage = rgba[::-1, :, -1]                                       # VTK rows run bottom-up
    used = np.flatnonzero(coverage.any(axis=0))
    return coverage[:, :used[-1] + 2] if used.size else None


def _hstack(panels: list, gap: int = _GAP) -> np.ndarray:
    """Panels side by side, top-aligned, separated by ``gap`` background pixels."""
    height = max(p.shape[0] for p in panels)
    width = sum(p.shape[1] for p in panels) + gap * (len(panels) - 1)
    canvas = np.broadcast_to(_BACKGROUND, (height, width, 3)).copy()
    x = 0
    for panel in panels:
        canvas[:panel.shape[0], x:x + panel.shape[1]] = panel
        x += panel.shape[1] + gap
    return canvas


def _vstack(blocks: list, gap: int = _GAP) -> np.ndarray:
    """Blocks stacked top to bottom, left-aligned, with a ``gap`` margin around and between them."""
    width = max(b.shape[1] for b in blocks) + 2 * gap
    height = sum(b.shape[0] for b in blocks) + gap * (len(blocks) + 1)
    canvas = np.broadcast_to(_BACKGROUND, (height, width, 3)).copy()
    y = gap
    for block in blocks:
        canvas[y:y + block.shape[0], gap:gap + block.shape[1]] = block
        y += block.shape[0] + gap
    return canvas


def write_png(rgb: np.ndarray, path) -> Path:
    """Write an (H, W, 3) uint8 array as a PNG, atomically (temporary file in the folder, then rename)."""
    rgb = np.asarray(rgb)
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
        raise ValueError(f"rgb must be an (H, W, 3) uint8 array, got {rgb.shape} {rgb.dtype}")
    path = Path(path)
    if path.suffix.lower() != ".png":
        raise ValueError(f"cannot write {str(path)!r}: the figure file name must end in .png")
    with atomic_output(path, ".png") as tmp:
        sitk.WriteImage(sitk.GetImageFromArray(np.ascontiguousarray(rgb), isVector=True), str(tmp))
    return path
