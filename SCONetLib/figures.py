"""Every figure SCONet draws, with matplotlib's Agg renderer (no display, no global pyplot state).

* :func:`demo_figure`: axial and coronal CT slices with organ overlays, SCONet above the truth, Dice per organ.
* :func:`training_curves`: loss and validation Dice per epoch of a training run.
* :func:`evaluation_plots`: per-organ Dice and HD95 over the cases of an evaluation.

Each returns a :class:`matplotlib.figure.Figure`; :func:`save_png` writes one atomically, :func:`png_output` makes
it part of a set of outputs written together (:func:`SCONetLib.io.write_outputs`).
"""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Sequence

import numpy as np
import SimpleITK as sitk
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Patch
from scipy import ndimage

from .io import Output, write_outputs
from .labels import ORGANS

#: CT display window (level, width), HU: soft-tissue abdomen.
WINDOW_HU = (40.0, 400.0)
#: Opacity of the organ fill over the CT; organ outlines are drawn opaque.
OVERLAY_ALPHA = 0.4
#: Largest side of one slice panel, pixels (of the resampled slice, before display).
MAX_PANEL_PX = 320
#: Smaller slices are shown enlarged by an integer factor up to this size (pixels).
MIN_PANEL_PX = 240
#: Background colour of the demo figure.
_BACKGROUND = "#101010"
#: Resolution of saved figures (dots per inch; the figure sizes below are in inches).
DPI = 100
#: Curve colours: training loss, validation loss, organ-mean Dice, all-class Dice.
CURVE_COLOURS = {"train": "#1f77b4", "val": "#ff7f0e", "organs": "#2ca02c", "all": "#787878"}


def png_output(figure: Figure, path: str | os.PathLike) -> Output:
    """:class:`SCONetLib.io.Output` rendering ``figure`` into a PNG at ``path`` (a name ending in ``.png``)."""
    path = Path(path)
    if path.suffix.lower() != ".png":
        raise ValueError(f"cannot write {str(path)!r}: the figure file name must end in .png")

    def write(tmp: Path) -> None:
        FigureCanvasAgg(figure)
        figure.savefig(tmp, format="png", dpi=DPI, facecolor=figure.get_facecolor())

    return Output(path, write, ".png")


def save_png(figure: Figure, path: str | os.PathLike) -> Path:
    """Write ``figure`` as a PNG at ``path`` atomically (see :func:`png_output`); returns the path."""
    return write_outputs([png_output(figure, path)])[0]


# ---------------------------------------------------------------------------------------------- demo figure


def demo_figure(ct: sitk.Image, labels: sitk.Image, truth: sitk.Image | None = None,
                dice: dict | None = None) -> Figure:
    """Axial and coronal CT slices with coloured organ overlays.

    Parameters
    ----------
    ct : sitk.Image, CT in HU, any geometry (LPS).
    labels : sitk.Image, organ label map (values of :data:`SCONetLib.labels.ORGANS`), any grid over ``ct``.
    truth : sitk.Image, optional; a second label map drawn in a second row ("Truth").
    dice : organ name → Dice, optional; shown in the legend.

    Returns
    -------
    Figure
        One row per label map (axial | coronal) and a legend of organ colours. Slices are the axial and coronal
        planes that cut the organs best (of ``truth`` if given; see :func:`_richest_slice`), after resampling to an
        axis-aligned grid with square pixels; axial images are in radiological convention (patient's right on the
        left, anterior up), coronal images have the head up. Organ fills are blended over the CT, outlines are
        drawn in the organ colour; pixels are shown without interpolation.
    """
    pixel_mm = max(min(ct.GetSpacing()), _box_extent(ct).max() / MAX_PANEL_PX)
    reference = _axis_aligned_grid(ct, pixel_mm)
    hu = sitk.GetArrayFromImage(_resample(ct, reference, sitk.sitkLinear, -1024.0)).astype(np.float32)
    rows = [("SCONet", labels)] + ([("Truth", truth)] if truth is not None else [])
    maps = [sitk.GetArrayFromImage(_resample(image, reference, sitk.sitkNearestNeighbor, 0)) for _, image in rows]
    k = _richest_slice(maps[-1], axis=0)         # through the truth's organs if given, else the labels'
    j = _richest_slice(maps[-1], axis=1)
    gray = _window(hu)
    panels = [(title, _overlay(gray[k], label_array[k]), _overlay(gray[::-1, j, :], label_array[::-1, j, :]))
              for (title, _), label_array in zip(rows, maps)]
    zoom = max(1, int(MIN_PANEL_PX // max(panels[0][1].shape + panels[0][2].shape)))
    panels = [(title, *(np.repeat(np.repeat(p, zoom, axis=0), zoom, axis=1) for p in pair))
              for title, *pair in panels]
    # lay the panels out in pixels, one figure pixel per image pixel, so that colours come out exactly
    margin, title_px, legend_px = 8, 22, 64
    widths = [panels[0][1].shape[1], panels[0][2].shape[1]]
    row_px = max(panels[0][1].shape[0], panels[0][2].shape[0])
    width = 3 * margin + sum(widths)
    height = margin + len(rows) * (title_px + row_px + margin) + legend_px
    figure = Figure(figsize=(width / DPI, height / DPI), dpi=DPI, facecolor=_BACKGROUND)
    for row, (title, axial, coronal) in enumerate(panels):
        top = margin + row * (title_px + row_px + margin) + title_px
        left = margin
        for view, rgb in (("axial", axial), ("coronal", coronal)):
            h, w = rgb.shape[:2]
            axes = figure.add_axes([left / width, 1 - (top + h) / height, w / width, h / height])
            axes.imshow(rgb, interpolation="nearest", aspect="auto")
            axes.set_axis_off()
            figure.text(left / width, 1 - (top - 4) / height, f"{title}: {view}", color="white", fontsize=10)
            left += w + margin
    dice = dice or {}
    handles = [Patch(facecolor=np.asarray(organ.color) / 255.0,
                     label=organ.display_name + (f"  Dice {dice[organ.name]:.3f}" if organ.name in dice else ""))
               for organ in ORGANS]
    figure.legend(handles=handles, loc="lower left", ncol=2, frameon=False, labelcolor="white", fontsize=9)
    return figure


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


# ---------------------------------------------------------------------------------------------- training curves


def training_curves(history: Sequence[dict]) -> Figure:
    """Loss (left) and validation Dice (right) per epoch of a training run.

    ``history`` holds one row per epoch as ``metrics.csv`` does: ``epoch``, ``train_loss`` and, when there was a
    validation, ``val_loss``, ``val_mean_dice_organs`` and ``val_mean_dice_all``; missing or non-finite values are
    left out of their curve.
    """
    epochs = [row["epoch"] for row in history]
    figure = Figure(figsize=(9.6, 4.0), dpi=DPI)
    loss_axes, dice_axes = figure.subplots(1, 2)
    for axes, title, series in (
            (loss_axes, "loss", (("train loss", "train", "train_loss"), ("val loss", "val", "val_loss"))),
            (dice_axes, "validation Dice", (("organ mean Dice", "organs", "val_mean_dice_organs"),
                                            ("all-class Dice", "all", "val_mean_dice_all")))):
        for name, colour, key in series:
            points = [(e, row[key]) for e, row in zip(epochs, history)
                      if isinstance(row.get(key), (int, float)) and math.isfinite(row[key])]
            if points:
                axes.plot(*zip(*points), marker="o", markersize=4, linewidth=2, color=CURVE_COLOURS[colour],
                          label=name)
        axes.set_title(title)
        axes.set_xlabel("epoch")
        axes.grid(alpha=0.3)
        if axes.lines:
            axes.legend()
    loss_axes.set_ylim(bottom=0.0)
    dice_axes.set_ylim(0.0, 1.0)
    figure.tight_layout()
    return figure


# ---------------------------------------------------------------------------------------------- evaluation


def evaluation_plots(rows: Sequence[dict]) -> Figure:
    """Box plots over cases of the Dice (left) and HD95 in mm (right) of each organ.

    ``rows`` are the per-case rows of :func:`SCONetLib.evaluate.evaluate_cases` (``dice_<organ>``,
    ``hd95_<organ>``); NaN (an organ missing from the prediction or the truth) is left out.
    """
    figure = Figure(figsize=(9.6, 4.0), dpi=DPI)
    names = [organ.display_name for organ in ORGANS]
    colours = [np.asarray(organ.color) / 255.0 for organ in ORGANS]
    for axes, key, title in zip(figure.subplots(1, 2), ("dice", "hd95"), ("Dice", "HD95 (mm)")):
        values = [[row[f"{key}_{organ.name}"] for row in rows if math.isfinite(row[f"{key}_{organ.name}"])]
                  for organ in ORGANS]
        boxes = axes.boxplot([v if v else [math.nan] for v in values], patch_artist=True)
        axes.set_xticks(range(1, len(names) + 1), names)
        for box, colour in zip(boxes["boxes"], colours):
            box.set_facecolor(colour)
        axes.set_title(f"{title}, {len(rows)} case(s)")
        axes.grid(axis="y", alpha=0.3)
    figure.axes[0].set_ylim(0.0, 1.0)
    figure.tight_layout()
    return figure
