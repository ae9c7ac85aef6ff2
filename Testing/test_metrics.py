"""Tests of SCONetLib.metrics: analytic cases, SimpleITK agreement, edge cases and bad input."""
import math

import numpy as np
import pytest
import SimpleITK as sitk
from scipy import ndimage

from SCONetLib.metrics import dice, dice_of_masks, hausdorff


def _ball(shape, centre, radius, spacing=(1.0, 1.0, 1.0)):
    """Boolean ball of ``radius`` mm around ``centre`` (voxel indices), physical spacing per axis."""
    grids = np.meshgrid(*(np.arange(n) for n in shape), indexing="ij")
    d2 = sum(((g - c) * s) ** 2 for g, c, s in zip(grids, centre, spacing))
    return d2 <= radius ** 2


def _sitk_hausdorff(a, b, spacing):
    images = []
    for mask in (a, b):
        image = sitk.GetImageFromArray(mask.astype(np.uint8))
        image.SetSpacing(tuple(float(s) for s in spacing[::-1]))  # array (k, j, i) → SimpleITK (i, j, k)
        images.append(image)
    f = sitk.HausdorffDistanceImageFilter()
    f.Execute(*images)
    return f.GetHausdorffDistance()


# ---------------------------------------------------------------- Dice

@pytest.mark.parametrize("a_box, b_box, expected", [
    ((slice(0, 4), slice(0, 4)), (slice(0, 4), slice(0, 4)), 1.0),
    ((slice(0, 4), slice(0, 4)), (slice(2, 6), slice(0, 4)), 2 * 8 / 32),
    ((slice(0, 2), slice(0, 2)), (slice(4, 6), slice(4, 6)), 0.0),
])
def test_dice_of_boxes(a_box, b_box, expected):
    pred = np.zeros((8, 8), np.uint8)
    truth = np.zeros((8, 8), np.uint8)
    pred[a_box] = 3
    truth[b_box] = 3
    assert dice(pred, truth, 3) == pytest.approx(expected, abs=1e-5)


def test_dice_label_absent_from_both_is_one():
    labels = np.ones((5, 5), np.uint8)
    assert dice(labels, labels, 4) == 1.0


def test_dice_label_absent_from_one_is_almost_zero():
    pred = np.zeros((5, 5), np.uint8)
    truth = np.zeros((5, 5), np.uint8)
    truth[0, 0] = 2
    assert dice(pred, truth, 2) == pytest.approx(1e-5 / (1 + 1e-5))


def test_dice_uses_only_the_given_label():
    pred = np.array([1, 1, 2, 2])
    truth = np.array([1, 2, 2, 2])
    assert dice(pred, truth, 1) == pytest.approx((2 * 1 + 1e-5) / (3 + 1e-5))
    assert dice(pred, truth, 2) == pytest.approx((2 * 2 + 1e-5) / (5 + 1e-5))


def test_dice_of_masks_rejects_labels():
    with pytest.raises(ValueError, match="boolean"):
        dice_of_masks(np.array([0, 2]), np.array([0, 1]))


# ---------------------------------------------------------------- Hausdorff: analytic

@pytest.mark.parametrize("spacing", [(1.0, 1.0, 1.0), (2.5, 0.8, 1.2)])
@pytest.mark.parametrize("shift_axis, shift_voxels", [(0, 3), (1, 5), (2, 2)])
def test_translated_ball_distance_is_the_shift(spacing, shift_axis, shift_voxels):
    shape = (24, 40, 36)
    a = _ball(shape, (10, 16, 14), 9.0, spacing)
    b = np.roll(a, shift_voxels, axis=shift_axis)
    expected = shift_voxels * spacing[shift_axis]
    assert hausdorff(a, b, spacing) == pytest.approx(expected, rel=1e-12)
    assert hausdorff(b, a, spacing) == pytest.approx(expected, rel=1e-12)  # symmetric


def test_concentric_balls_differ_by_the_radius_gap():
    spacing = (1.5, 1.0, 1.0)
    a = _ball((40, 50, 50), (20, 25, 25), 8.0, spacing)
    b = _ball((40, 50, 50), (20, 25, 25), 18.0, spacing)
    diagonal = float(np.linalg.norm(spacing))
    for p in (100, 95):
        assert abs(hausdorff(a, b, spacing, percentile=p) - 10.0) <= diagonal


def test_single_voxels_anisotropic():
    a = np.zeros((6, 6, 6), bool)
    b = np.zeros((6, 6, 6), bool)
    a[0, 0, 0] = True
    b[3, 2, 1] = True
    spacing = (2.5, 0.5, 4.0)
    assert hausdorff(a, b, spacing) == pytest.approx(math.sqrt(7.5 ** 2 + 1.0 ** 2 + 4.0 ** 2))


def test_hd95_ignores_a_thin_spike_that_hd_sees():
    a = np.zeros((30, 30, 60), bool)
    a[5:25, 5:25, 5:25] = True
    b = a.copy()
    b[15, 15, 25:55] = True  # 30-voxel spike out of one face
    assert hausdorff(a, b, (1, 1, 1)) == pytest.approx(30.0)
    assert hausdorff(a, b, (1, 1, 1), percentile=95) < 1.0


def test_inner_set_distance_matches_the_set_definition():
    """A ⊂ B: the directed distance A → B is 0, so the HD is the distance of B's farthest voxel to A."""
    b = np.zeros((9, 9, 30), bool)
    b[2:7, 2:7, 2:28] = True
    a = np.zeros_like(b)
    a[2:7, 2:7, 2:10] = True
    assert hausdorff(a, b, (1, 1, 1)) == pytest.approx(18.0)


# ---------------------------------------------------------------- Hausdorff: SimpleITK agreement

@pytest.mark.parametrize("seed", range(4))
def test_matches_simpleitk_on_random_blobs(seed):
    rng = np.random.default_rng(seed)
    shape = (18, 28, 24)
    a = ndimage.gaussian_filter(rng.random(shape), 2.0) > 0.52
    b = ndimage.gaussian_filter(rng.random(shape), 2.0) > 0.52
    spacing = (2.5, 0.7, 1.1)
    assert a.any() and b.any()
    assert hausdorff(a, b, spacing) == pytest.approx(_sitk_hausdorff(a, b, spacing), rel=1e-9)
    assert hausdorff(a, b, spacing, percentile=95) <= hausdorff(a, b, spacing) + 1e-12


# ---------------------------------------------------------------- edge cases and errors

def test_empty_masks():
    empty = np.zeros((4, 4, 4), bool)
    full = np.ones((4, 4, 4), bool)
    assert hausdorff(empty, empty, (1, 1, 1)) == 0.0
    assert hausdorff(empty, full, (1, 1, 1)) == math.inf
    assert hausdorff(full, empty, (1, 1, 1), percentile=95) == math.inf


def test_identical_masks_have_zero_distance():
    a = _ball((20, 20, 20), (10, 10, 10), 6.0)
    assert hausdorff(a, a, (1, 2, 3)) == 0.0
    assert hausdorff(a, a, (1, 2, 3), percentile=95) == 0.0


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(pred=np.zeros((3, 3), bool), truth=np.zeros((3, 4), bool), spacing=(1, 1)), ValueError, "same shape"),
    (dict(pred=np.zeros((3, 3), bool), truth=np.zeros((3, 3), bool), spacing=(1, 0)), ValueError, "spacing"),
    (dict(pred=np.zeros((3, 3), bool), truth=np.zeros((3, 3), bool), spacing=(1, 1, 1)), ValueError, "2 positive"),
    (dict(pred=np.zeros((3, 3), bool), truth=np.zeros((3, 3), bool), spacing=(1, 1), percentile=0),
     ValueError, "percentile"),
    (dict(pred=np.full((3, 3), 2), truth=np.zeros((3, 3), bool), spacing=(1, 1)), ValueError, "pred must be"),
])
def test_bad_input(kwargs, error, match):
    with pytest.raises(error, match=match):
        hausdorff(**kwargs)
