"""Segmentation metrics on label arrays with physical spacing: Dice, Hausdorff distance and its percentiles.

Arrays are plain numpy arrays in any axis order; ``spacing`` lists the voxel size (mm) **per array axis, in the
array's axis order**. For a ``(K, J, I)`` array from ``sitk.GetArrayFromImage(image)`` pass
``image.GetSpacing()[::-1]``.

References
----------
M. Jouvencel, R. Kéchichian, J. Digne, S. Valette, "SCONet: Convolutional Occupancy Networks for Multi-Organ
Segmentation", IEEE ISBI 2025 — Table 1 reports Dice and the maximum Hausdorff distance in mm (computed with
SimpleITK in the authors' ``eval_seg.py``).
"""
from __future__ import annotations

import math

import numpy as np
from scipy import ndimage

#: Smoothing term of the reference Dice, ``(2|A∩B| + eps) / (|A| + |B| + eps)``.
DICE_SMOOTH = 1e-5


def dice(pred: np.ndarray, truth: np.ndarray, label: int) -> float:
    """Dice overlap of one label between two label maps, as the reference computes it.

    Parameters
    ----------
    pred, truth : array of int, same shape
        Label maps (any axis order, any integer dtype).
    label : int
        The label value compared (``pred == label`` versus ``truth == label``).

    Returns
    -------
    float
        ``(2|A∩B| + 1e-5) / (|A| + |B| + 1e-5)`` in [0, 1]; exactly 1.0 when the label is absent from both.
    """
    pred, truth = _same_shape(np.asarray(pred), np.asarray(truth))
    return dice_of_masks(pred == label, truth == label)


def dice_of_masks(a: np.ndarray, b: np.ndarray) -> float:
    """Smoothed Dice of two boolean masks of the same shape (see :func:`dice`)."""
    a, b = _same_shape(_as_mask(a, "a"), _as_mask(b, "b"))
    overlap = np.count_nonzero(a & b)
    return float((2.0 * overlap + DICE_SMOOTH) / (np.count_nonzero(a) + np.count_nonzero(b) + DICE_SMOOTH))


def hausdorff(pred: np.ndarray, truth: np.ndarray, spacing, percentile: float = 100.0) -> float:
    """Symmetric Hausdorff distance (or its percentile version, e.g. HD95) between two binary masks, in mm.

    Parameters
    ----------
    pred, truth : array of bool (or 0/1), same shape
        The two masks.
    spacing : sequence of float
        Voxel size in mm along each array axis, in the array's axis order (anisotropy is respected).
    percentile : float in (0, 100]
        100 gives the maximum distance (the paper's HD); 95 gives HD95.

    Returns
    -------
    float
        Distance in mm. ``0.0`` if both masks are empty; ``math.inf`` if exactly one is empty (the distance to an
        empty set is undefined — callers skip such organs, as the reference evaluation does).

    Notes
    -----
    Distances are between voxel centres, computed with exact Euclidean distance transforms
    (``scipy.ndimage.distance_transform_edt`` with ``sampling=spacing``) on the bounding box of both masks.

    * ``percentile == 100``: ``max(max_{a∈A} d(a, B), max_{b∈B} d(b, A))`` over **all** voxels of each mask —
      the set distance that SimpleITK's ``HausdorffDistanceImageFilter`` (used by the reference) returns. The
      nearest voxel of B to any voxel outside B lies on B's border, so this is also the largest distance from a
      voxel of A to the border of B.
    * ``percentile < 100``: the usual surface definition of HDp (as in MONAI and the Medical Segmentation
      Decathlon): the p-th percentile (linear interpolation) of the distances from each border voxel of A to the
      nearest border voxel of B, and vice versa, and the larger of the two. A border voxel is a mask voxel with a
      face neighbour (6-connectivity) outside the mask or outside the array. Percentiles over all voxels would
      be dominated by the zero distances of the overlap, hence the surfaces.
    """
    a, b = _same_shape(_as_mask(pred, "pred"), _as_mask(truth, "truth"))
    sampling = _as_spacing(spacing, a.ndim)
    if not (isinstance(percentile, (int, float)) and 0.0 < percentile <= 100.0):
        raise ValueError(f"percentile must be a number in (0, 100], got {percentile!r}")
    has_a, has_b = bool(a.any()), bool(b.any())
    if not has_a and not has_b:
        return 0.0
    if not has_a or not has_b:
        return math.inf
    box = _bounding_box(a | b)
    a, b = a[box], b[box]
    if percentile == 100.0:
        return max(_directed_distances(a, b, sampling).max(), _directed_distances(b, a, sampling).max())
    surface_a, surface_b = _surface(a), _surface(b)
    return max(float(np.percentile(_directed_distances(surface_a, surface_b, sampling), percentile)),
               float(np.percentile(_directed_distances(surface_b, surface_a, sampling), percentile)))


def _directed_distances(source: np.ndarray, target: np.ndarray, sampling: tuple) -> np.ndarray:
    """(count(source),) float64: distance (mm) from each ``source`` voxel to the nearest ``target`` voxel."""
    return ndimage.distance_transform_edt(~target, sampling=sampling)[source]


def _surface(mask: np.ndarray) -> np.ndarray:
    """Border voxels of ``mask``: voxels with a face neighbour outside the mask (or outside the array)."""
    structure = ndimage.generate_binary_structure(mask.ndim, 1)
    return mask & ~ndimage.binary_erosion(mask, structure=structure, border_value=0)


def _bounding_box(mask: np.ndarray) -> tuple:
    """Tuple of slices bounding the True voxels of a non-empty mask."""
    box = []
    for axis in range(mask.ndim):
        other = tuple(a for a in range(mask.ndim) if a != axis)
        present = np.flatnonzero(mask.any(axis=other))
        box.append(slice(int(present[0]), int(present[-1]) + 1))
    return tuple(box)


def _as_mask(array, name: str) -> np.ndarray:
    """Boolean view of a bool or 0/1 array; ``ValueError`` for other values."""
    array = np.asarray(array)
    if array.dtype == bool:
        return array
    if not np.issubdtype(array.dtype, np.number) or not np.isin(array, (0, 1)).all():
        raise ValueError(f"{name} must be a boolean (or 0/1) mask, got dtype {array.dtype} with other values; "
                         f"compare a label map with a label first, e.g. labels == 1")
    return array.astype(bool)


def _same_shape(a: np.ndarray, b: np.ndarray) -> tuple:
    if a.shape != b.shape:
        raise ValueError(f"the two arrays must have the same shape, got {a.shape} and {b.shape}")
    if a.ndim == 0:
        raise ValueError("expected arrays with at least one axis, got scalars")
    return a, b


def _as_spacing(spacing, ndim: int) -> tuple:
    values = np.asarray(spacing, dtype=np.float64).ravel()
    if values.size != ndim or not np.all(np.isfinite(values)) or np.any(values <= 0):
        raise ValueError(f"spacing must be {ndim} positive numbers (mm, one per array axis), got {spacing!r}")
    return tuple(float(v) for v in values)


def threshold_dice(probabilities: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """(C,) per-class Dice of ``probabilities > 0.5`` against the targets (the reference's validation metric).

    Parameters
    ----------
    probabilities : (M, C) float softmax probabilities
    targets : (M,) int class indices
    """
    return np.array([dice_of_masks(probabilities[:, c] > 0.5, targets == c) for c in range(probabilities.shape[1])])
