"""3D Canny edge points of a CT volume, as SCONet's preprocessing finds them, and the input checks of the stage.

SCONet resamples the CT in-plane to 256 × 256 (nearest neighbour, slice count kept), runs SimpleITK's 3D Canny
filter (variance 2 mm², thresholds 20 / 50 HU per voxel step) and keeps every edge voxel centre as a point.
"""
from __future__ import annotations

import logging
import warnings

import numpy as np
import SimpleITK as sitk

from ..geometry import Grid

logger = logging.getLogger(__name__)

#: In-plane size (voxels along the first two image axes) of the grid Canny runs on.
CANNY_RESOLUTION = 256
#: Gaussian variance of the Canny smoothing, physical mm² (SimpleITK uses the image spacing).
CANNY_VARIANCE_MM2 = 2.0
#: Hysteresis thresholds on the gradient magnitude (HU per voxel-index step).
CANNY_THRESHOLDS = (20.0, 50.0)
#: SimpleITK's default maximum kernel truncation error, as the reference leaves it.
CANNY_MAXIMUM_ERROR = 0.01
#: Extent (mm) below which a volume without edges is reported as too thin rather than without contrast.
MIN_EXTENT_MM = 20.0
#: A CT in Hounsfield units normally reaches below this (air is about -1000 HU) ...
_CT_MIN_BELOW_HU = -500.0
#: ... and above this (soft tissue with contrast, bone).
_CT_MAX_ABOVE_HU = 100.0


def canny_points(image: sitk.Image) -> np.ndarray:
    """Physical positions of the 3D Canny edge voxels of a CT, as in SCONet's preprocessing.

    Parameters
    ----------
    image : SimpleITK.Image
        3D CT volume in Hounsfield units, any pixel type and direction.

    Returns
    -------
    (N, 3) float64
        LPS millimetres of the centres of the edge voxels of the 256 × 256 in-plane grid, in the reference's
        order (first image axis slowest).

    Raises
    ------
    TypeError
        ``image`` is not a SimpleITK image.
    ValueError
        Not a 3D scalar image, fewer than 2 voxels along an axis, NaN or infinite voxels, or no edge at all
        (an empty or constant volume).

    Warns
    -----
    UserWarning
        If the intensities do not look like CT in HU.

    Notes
    -----
    1. Cast to float32 and resample the first two image axes to 256 voxels (nearest neighbour; origin, direction
       and slice count kept; spacing ``spacing · size / 256``), so voxel i' takes the original voxel nearest to
       ``i' · size / 256`` (SimpleITK's rounding). Deviation: for axes of fewer than 128 voxels, the last output
       voxels fall beyond the image; they repeat the edge voxel instead of the reference's 0 (a false edge).
    2. ``sitk.CannyEdgeDetection`` with variance 2 mm² (physical units), thresholds 20 and 50.
    3. Every voxel > 0 becomes a point at its centre.
    """
    check_ct_image(image)
    return _canny_points(image)


def _canny_points(image: sitk.Image) -> np.ndarray:
    """:func:`canny_points` on an already validated image."""
    # nearest neighbour only picks voxels, so resampling before the float32 cast gives the same values with less memory
    resampled = sitk.Cast(_resample_in_plane(image, CANNY_RESOLUTION), sitk.sitkFloat32)
    edges = sitk.CannyEdgeDetection(resampled, lowerThreshold=CANNY_THRESHOLDS[0],
                                    upperThreshold=CANNY_THRESHOLDS[1], variance=[CANNY_VARIANCE_MM2] * 3,
                                    maximumError=[CANNY_MAXIMUM_ERROR] * 3)
    # view (i, j, k) so that argwhere lists points with the first image axis slowest, as the reference does
    return _edge_points(resampled, np.argwhere(sitk.GetArrayViewFromImage(edges).transpose(2, 1, 0) > 0), image)


def _edge_points(resampled: sitk.Image, ijk: np.ndarray, image: sitk.Image) -> np.ndarray:
    """(N, 3) LPS mm of the edge voxels ``ijk`` (N, 3) of the resampled grid; ``ValueError`` if there are none."""
    if len(ijk) == 0:
        extent = Grid.of(image).extent_mm
        if extent.min() < MIN_EXTENT_MM:
            axis = int(np.argmin(extent))
            reason = (f"the volume is only {extent[axis]:.3g} mm across along its {'ijk'[axis]} axis "
                      f"({image.GetSize()[axis]} voxels of {image.GetSpacing()[axis]:.3g} mm), too thin for 3D edges; "
                      f"SCONet segments abdominal CT volumes at least {MIN_EXTENT_MM:g} mm across in every direction")
        else:
            reason = f"the volume is empty, constant or has no contrast above {CANNY_THRESHOLDS[1]:g} HU per voxel"
        raise ValueError(f"no edges found by 3D Canny in the image (size {image.GetSize()}): {reason}")
    logger.debug("Canny: %d edge voxels on a %s grid", len(ijk), resampled.GetSize())
    return Grid.of(resampled).index_to_lps(ijk)


def _resample_in_plane(image: sitk.Image, resolution: int) -> sitk.Image:
    """Nearest-neighbour resampling of the first two image axes to ``resolution`` voxels (slices kept).

    Output voxels beyond the last input voxel (only when an axis has fewer than ``resolution / 2`` voxels) take the
    nearest voxel's value, where the reference's plain ``sitk.Resample`` puts 0 and so creates false edges.
    """
    size = np.array(image.GetSize())
    new_size = np.array([resolution, resolution, size[2]])
    resampler = sitk.ResampleImageFilter()
    resampler.SetSize([int(s) for s in new_size])
    resampler.SetOutputSpacing(tuple(float(s) for s in np.asarray(image.GetSpacing()) * size / new_size))
    resampler.SetOutputOrigin(image.GetOrigin())
    resampler.SetOutputDirection(image.GetDirection())
    resampler.SetInterpolator(sitk.sitkNearestNeighbor)
    resampler.SetUseNearestNeighborExtrapolator(True)
    return resampler.Execute(image)


def check_ct_image(image: sitk.Image, name: str = "image") -> None:
    """Check that ``image`` can go through the point stage (Canny + 3D SURF).

    Raises
    ------
    TypeError
        Not a SimpleITK image.
    ValueError
        Not 3D, not scalar, fewer than 2 voxels along an axis, or NaN / infinite voxels (the message says how many).

    Warns
    -----
    UserWarning
        The intensity range does not look like CT in Hounsfield units (minimum above -500 or maximum below 100,
        e.g. an MRI or a 0–1 normalised volume): the thresholds and clamps of the method assume HU.
    """
    if not isinstance(image, sitk.Image):
        raise TypeError(f"{name} must be a SimpleITK.Image, got {type(image).__name__}")
    if image.GetDimension() != 3:
        raise ValueError(f"{name} must be a 3D image, got a {image.GetDimension()}D image of size {image.GetSize()}")
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise ValueError(f"{name} must be a scalar (single-component) image, got "
                         f"{image.GetNumberOfComponentsPerPixel()} components per voxel")
    if min(image.GetSize()) < 2:
        raise ValueError(f"{name} must have at least 2 voxels along every axis, got size {image.GetSize()}")
    values = sitk.GetArrayViewFromImage(image)
    if np.issubdtype(values.dtype, np.floating):
        bad = values.size - int(np.count_nonzero(np.isfinite(values)))
        if bad:
            raise ValueError(f"{name} has {bad} NaN or infinite voxels (of {values.size}); "
                             f"fill or mask them before extracting points")
    low, high = float(values.min()), float(values.max())
    if low > _CT_MIN_BELOW_HU or high < _CT_MAX_ABOVE_HU:
        warnings.warn(f"{name} intensities range from {low:g} to {high:g}, which does not look like CT in "
                      f"Hounsfield units (expected a minimum below {_CT_MIN_BELOW_HU:g} and a maximum above "
                      f"{_CT_MAX_ABOVE_HU:g}); SCONet's edge thresholds and SURF clamp [-100, 512] assume HU, "
                      f"so the points and segmentation will likely be poor", UserWarning, stacklevel=3)
