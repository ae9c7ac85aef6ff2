"""Frame changes in SCONetLib.geometry: voxel index ↔ LPS ↔ RAS ↔ model object frame, resampled grids."""
import numpy as np
import pytest
import SimpleITK as sitk

from SCONetLib.geometry import Grid, ObjectFrame, lps_to_ras, ras_to_lps

from directions import DIRECTIONS


def _image(direction, size=(7, 5, 4), spacing=(0.8, 1.3, 2.5), origin=(-12.5, 40.0, 7.25)):
    image = sitk.Image(list(size), sitk.sitkInt16)
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    image.SetDirection(tuple(np.asarray(direction).ravel()))
    return image


@pytest.mark.parametrize("name", DIRECTIONS)
def test_index_to_lps_matches_simpleitk(name):
    image = _image(DIRECTIONS[name])
    grid = Grid.of(image)
    ijk = np.array([[0, 0, 0], [6, 4, 3], [2.5, 1.25, 0.75]])
    expected = np.array([image.TransformContinuousIndexToPhysicalPoint(tuple(p)) for p in ijk])
    np.testing.assert_allclose(grid.index_to_lps(ijk), expected, atol=1e-9)
    np.testing.assert_allclose(grid.lps_to_index(expected), ijk, atol=1e-9)


@pytest.mark.parametrize("name", DIRECTIONS)
def test_ijk_to_ras_round_trip(name):
    grid = Grid.of(_image(DIRECTIONS[name]))
    m = grid.ijk_to_ras
    # Slicer's IJKToRAS is the LPS matrix with x and y rows negated.
    np.testing.assert_allclose(m[:2], -grid.ijk_to_lps[:2])
    np.testing.assert_allclose(m[2:], grid.ijk_to_lps[2:])
    back = Grid.from_ijk_to_ras(m, grid.size)
    assert back.size == grid.size
    np.testing.assert_allclose(back.spacing, grid.spacing, atol=1e-12)
    np.testing.assert_allclose(back.origin, grid.origin, atol=1e-12)
    np.testing.assert_allclose(back.direction, grid.direction, atol=1e-12)


def test_lps_ras_are_inverse_sign_flips():
    xyz = np.array([[1.0, -2.0, 3.0]])
    np.testing.assert_array_equal(lps_to_ras(xyz), [[-1.0, 2.0, 3.0]])
    np.testing.assert_array_equal(ras_to_lps(lps_to_ras(xyz)), xyz)


def test_all_index_lps_order_is_kji():
    image = _image(DIRECTIONS["oblique"])
    grid = Grid.of(image)
    pts = grid.all_index_lps()
    assert pts.shape == (7 * 5 * 4, 3)
    # C-order over (K, J, I): the 2nd point is voxel (i=1, j=0, k=0); point at flat index i + 7*(j + 5*k).
    np.testing.assert_allclose(pts[1], image.TransformIndexToPhysicalPoint((1, 0, 0)))
    np.testing.assert_allclose(pts[3 + 7 * (2 + 5 * 1)], image.TransformIndexToPhysicalPoint((3, 2, 1)))


@pytest.mark.parametrize("name", DIRECTIONS)
def test_with_spacing_keeps_box_and_direction(name):
    grid = Grid.of(_image(DIRECTIONS[name], size=(40, 30, 12), spacing=(0.8, 0.8, 2.5)))
    new = grid.with_spacing(1.6)
    assert new.size == (20, 15, 19)
    assert new.direction == grid.direction
    # Low corner of the voxel box (outer face of voxel 0) is unchanged.
    np.testing.assert_allclose(new.index_to_lps([[-0.5, -0.5, -0.5]]), grid.index_to_lps([[-0.5, -0.5, -0.5]]),
                               atol=1e-9)
    # The box centre moves by less than half a new voxel.
    assert np.linalg.norm(new.centre_lps - grid.centre_lps) <= 0.5 * np.linalg.norm(new.spacing) + 1e-9
    assert grid.with_spacing(grid.spacing) == grid


@pytest.mark.parametrize("bad", [0, -1.0, (1.0, 0.0, 2.5), float("nan"), float("inf")])
def test_with_spacing_rejects_bad_spacing(bad):
    grid = Grid.of(_image(np.eye(3)))
    with pytest.raises(ValueError, match="spacing must be one or three positive finite numbers"):
        grid.with_spacing(bad)


def test_image_from_array_carries_geometry():
    grid = Grid.of(_image(DIRECTIONS["flipped_xy"]))
    array = np.arange(4 * 5 * 7, dtype=np.uint8).reshape(4, 5, 7)
    image = grid.image_from_array(array)
    assert Grid.of(image) == grid
    np.testing.assert_array_equal(sitk.GetArrayFromImage(image), array)
    with pytest.raises(ValueError, match="does not match grid size"):
        grid.image_from_array(array[:, :, :3])


def test_grid_rejects_2d():
    with pytest.raises(ValueError, match="expected a 3D image"):
        Grid.of(sitk.Image([4, 4], sitk.sitkUInt8))


@pytest.mark.parametrize("name", DIRECTIONS)
def test_object_frame_is_ras_aligned_and_centred(name):
    grid = Grid.of(_image(DIRECTIONS[name], size=(11, 9, 5)))
    frame = ObjectFrame.of(grid, scale_mm=400.0)
    centre = grid.centre_lps
    np.testing.assert_allclose(frame.lps_to_object(centre[None]), 0.0, atol=1e-7)
    step = frame.lps_to_object((centre + [10.0, 20.0, -40.0])[None])
    np.testing.assert_allclose(step, [[-0.025, -0.05, -0.1]], atol=1e-7)
    xyz = grid.all_index_lps()
    np.testing.assert_allclose(frame.object_to_lps(frame.lps_to_object(xyz)), xyz, atol=1e-3)


def test_object_frame_reference_box_and_clamp_fraction():
    grid = Grid.of(_image(np.eye(3), size=(3, 3, 3), spacing=(1.0, 1.0, 1.0), origin=(-1.0, -1.0, -1.0)))
    frame = ObjectFrame.of(grid)
    assert frame.half_extent_mm() == pytest.approx(220.2)
    pts = np.array([[0.0, 0.0, 0.0], [0.0, 0.0, 220.0], [0.0, -221.0, 0.0], [300.0, 0.0, 0.0]])
    assert frame.fraction_outside(pts) == pytest.approx(0.5)
    assert ObjectFrame.of(grid, scale_mm=800.0).fraction_outside(pts) == 0.0
    with pytest.raises(ValueError, match="scale_mm must be a positive number"):
        ObjectFrame.of(grid, scale_mm=0.0)
