"""Tests of SCONetLib.postprocess: largest connected components per organ, volume floor, geometry kept."""
from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

from SCONetLib.postprocess import KEEP, keep_largest_components
from directions import DIRECTIONS


def _labels(direction=np.eye(3)):
    array = np.zeros((20, 30, 40), np.uint8)
    array[2:10, 2:12, 2:12] = 1      # liver, 800 voxels
    array[15:17, 25:27, 35:37] = 1   # liver fragment, 8 voxels
    array[2:8, 15:20, 15:20] = 2     # kidney 1, 150 voxels
    array[2:8, 15:20, 25:30] = 2     # kidney 2, 150 voxels
    array[12:13, 2:3, 2:3] = 2       # third kidney fragment, 1 voxel
    array[12:18, 20:28, 2:10] = 3    # spleen, 384 voxels
    array[18:19, 28:29, 30:31] = 4   # pancreas: a single voxel (below the floor at 1 mm³ voxels)
    image = sitk.GetImageFromArray(array)
    image.SetSpacing((1.0, 1.0, 1.0))
    image.SetOrigin((-3.0, 7.5, 100.0))
    image.SetDirection(tuple(np.asarray(direction, float).ravel()))
    return image


@pytest.mark.parametrize("direction", list(DIRECTIONS.values())[:3])
def test_keeps_largest_components_per_organ_and_the_geometry(direction):
    labels = _labels(direction)
    out = keep_largest_components(labels, min_volume_ml=0.005)
    before, after = sitk.GetArrayViewFromImage(labels), sitk.GetArrayViewFromImage(out)
    counts = np.bincount(after.ravel(), minlength=5)
    assert list(counts[1:]) == [800, 300, 384, 0]
    assert (after[15:17, 25:27, 35:37] == 0).all() and after[12, 2, 2] == 0
    assert np.array_equal(after[after > 0], before[after > 0])  # nothing relabelled, only removed
    for get in ("GetSize", "GetSpacing", "GetOrigin", "GetDirection"):
        assert getattr(out, get)() == getattr(labels, get)()
    assert out.GetPixelID() == sitk.sitkUInt8


def test_volume_floor_removes_small_organs_and_keep_table():
    out = sitk.GetArrayFromImage(keep_largest_components(_labels(), min_volume_ml=0.2))
    assert np.bincount(out.ravel(), minlength=5)[2] == 0 and (out == 1).sum() == 800
    assert KEEP == {1: 1, 2: 2, 3: 1, 4: 1}
    with pytest.raises(ValueError, match=r"min_volume_ml must be a number >= 0 \(mL\), got -1"):
        keep_largest_components(_labels(), min_volume_ml=-1)
    with pytest.raises(TypeError, match="labels must be a 3D SimpleITK image"):
        keep_largest_components(np.zeros((2, 2, 2)))


def test_segmenter_postprocess_flag_equals_the_function(small_phantom):
    from SCONetLib.infer import Segmenter

    segmenter = Segmenter(device="cpu", n_points=4000)
    segmenter.prepare(small_phantom[0])
    raw = segmenter.segment(spacing=6.0)
    post = segmenter.segment(spacing=6.0, postprocess=True)
    np.testing.assert_array_equal(sitk.GetArrayViewFromImage(post),
                                  sitk.GetArrayFromImage(keep_largest_components(raw)))
    assert post.GetOrigin() == raw.GetOrigin() and post.GetSpacing() == raw.GetSpacing()
