"""Point stage: Canny edge points, 3D SURF descriptors (beyond the golden parity), the point cloud, bad inputs."""

import numpy as np
import pytest
import SimpleITK as sitk
from scipy.spatial import cKDTree

from SCONetLib.geometry import Grid, ObjectFrame
from SCONetLib.points import PointCloud, canny_points, extract_point_cloud, surf3d
from SCONetLib.progress import Cancelled

from directions import DIRECTIONS as SHARED_DIRECTIONS, rotation

from SCONetLib.points import surf as surf3d_module


# A stronger tilt than the shared table's, so that ignoring the rotation is clearly wrong.
DIRECTIONS = {**SHARED_DIRECTIONS, "oblique": rotation(2, 25) @ rotation(0, 11)}


def _image_of(function, direction, centre_lps, size, spacing, dtype=np.int16):
    """Image of ``function(xyz_lps) -> values`` sampled on a grid of ``direction`` centred on ``centre_lps``."""
    direction = np.asarray(direction, dtype=float)
    extent = (np.asarray(size) - 1) * np.asarray(spacing)
    grid = Grid(tuple(size), tuple(spacing), tuple(np.asarray(centre_lps) - direction @ (extent / 2)),
                tuple(direction.ravel()))
    values = function(grid.all_index_lps()).reshape(tuple(size)[::-1])
    return grid.image_from_array(np.round(values).astype(dtype) if np.issubdtype(dtype, np.integer)
                                 else values.astype(dtype))


# ---------------------------------------------------------------------------------------------------- Canny
SPHERE_CENTRE = np.array([10.0, -20.0, 30.0])
SPHERE_RADIUS = 13.0
SPHERE_SPACING = (2.0, 2.0, 2.0)


def _sphere(direction):
    """Air (-1000 HU) with a 300 HU ball, surface blurred over one voxel so that it is sub-voxel accurate."""
    def ball(xyz):
        distance = np.linalg.norm(xyz - SPHERE_CENTRE, axis=1) - SPHERE_RADIUS
        return -1000.0 + 1300.0 * np.clip(0.5 - distance / SPHERE_SPACING[0], 0.0, 1.0)
    return _image_of(ball, direction, SPHERE_CENTRE, (36, 36, 24), SPHERE_SPACING)


@pytest.fixture(scope="module")
def sphere_points():
    return {name: canny_points(_sphere(direction)) for name, direction in DIRECTIONS.items()}


@pytest.mark.parametrize("name", DIRECTIONS)
def test_canny_edges_lie_on_the_sphere(sphere_points, name):
    points = sphere_points[name]
    assert points.shape[1] == 3 and points.dtype == np.float64 and len(points) > 10_000
    off_surface = np.abs(np.linalg.norm(points - SPHERE_CENTRE, axis=1) - SPHERE_RADIUS)
    # within about a voxel: half a voxel of blurred surface plus the staircase of the nearest-neighbour upsampling
    assert off_surface.max() <= 1.5 * max(SPHERE_SPACING)
    assert np.median(off_surface) <= 0.5 * max(SPHERE_SPACING)
    # a wrong sign or axis order of the LPS conversion would move the centroid by tens of mm
    np.testing.assert_allclose(points.mean(axis=0), SPHERE_CENTRE, atol=0.1)


@pytest.mark.parametrize("name", [n for n in DIRECTIONS if n != "identity"])
def test_canny_edges_do_not_depend_on_the_direction(sphere_points, name):
    """The same physical object stored with another direction gives edges at the same places (within a voxel)."""
    reference, points = sphere_points["identity"], sphere_points[name]
    voxel_diagonal = np.linalg.norm(SPHERE_SPACING)
    assert cKDTree(reference).query(points)[0].max() <= voxel_diagonal
    assert cKDTree(points).query(reference)[0].max() <= voxel_diagonal


def test_canny_points_are_centres_of_the_256_grid():
    """512 × 512 slices are halved (nearest neighbour); points are voxel centres of that grid, first axis slowest."""
    def cube(xyz):
        return np.where(np.all(np.abs(xyz - [3.0, -4.0, 6.0]) < [60.0, 45.0, 5.0], axis=1), 200.0, -1000.0)
    image = _image_of(cube, DIRECTIONS["flipped_xy"], (3.0, -4.0, 6.0), (512, 512, 8), (0.5, 0.5, 2.0))
    points = canny_points(image)
    coarse = Grid.of(image)
    coarse = Grid((256, 256, 8), (1.0, 1.0, 2.0), coarse.origin, coarse.direction)
    ijk = coarse.lps_to_index(points)
    np.testing.assert_allclose(ijk, np.round(ijk), atol=1e-9)
    order = np.lexsort(np.round(ijk).T[::-1])
    np.testing.assert_array_equal(order, np.arange(len(points)))
    # the box faces (x ±60, y ±45 mm LPS) are found within a voxel of the coarse grid
    in_plane = np.abs(points[:, :2] - [3.0, -4.0])
    on_x_face = np.abs(in_plane[:, 0] - 60.0) <= 1.0
    on_y_face = np.abs(in_plane[:, 1] - 45.0) <= 1.0
    assert on_x_face.sum() > 100 and on_y_face.sum() > 100


# ---------------------------------------------------------------------------------------------------- bad input
def _volume(values, spacing=(1.0, 1.0, 1.0)):
    image = sitk.GetImageFromArray(np.asarray(values))
    image.SetSpacing(spacing)
    return image


def _ct_like(shape=(12, 14, 16)):
    rng = np.random.default_rng(3)
    values = np.full(shape, -1000.0, dtype=np.float32)
    values[2:-2, 3:-3, 3:-3] = 40.0 + rng.normal(0, 5, (shape[0] - 4, shape[1] - 6, shape[2] - 6))
    values[5:8, 6:9, 6:10] = 400.0
    return values


BAD_IMAGES = [
    ("2D", lambda: sitk.Image([8, 8], sitk.sitkInt16), ValueError, "3D image"),
    ("vector", lambda: sitk.Image([8, 8, 8], sitk.sitkVectorFloat32, 3), ValueError, "scalar"),
    ("one slice", lambda: _volume(np.full((1, 8, 8), -1000, np.int16)), ValueError, "at least 2 voxels"),
    ("NaN", lambda: _volume(np.where(np.arange(12 * 14 * 16).reshape(12, 14, 16) % 997 == 5, np.nan,
                                     _ct_like())), ValueError, "3 NaN or infinite voxels"),
    ("infinite", lambda: _volume(np.where(np.arange(12 * 14 * 16).reshape(12, 14, 16) == 7, np.inf,
                                          _ct_like())), ValueError, "1 NaN or infinite voxels"),
    ("array", lambda: np.zeros((8, 8, 8)), TypeError, "SimpleITK.Image"),
]


@pytest.mark.parametrize("name, make, error, message", BAD_IMAGES, ids=[b[0] for b in BAD_IMAGES])
@pytest.mark.parametrize("stage", ["canny_points", "surf3d", "extract_point_cloud"])
def test_bad_images_are_rejected(name, make, error, message, stage):
    call = {"canny_points": canny_points, "surf3d": lambda image: surf3d(image, np.zeros((1, 3))),
            "extract_point_cloud": extract_point_cloud}[stage]
    with pytest.raises(error, match=message):
        call(make())


@pytest.mark.parametrize("values", [np.zeros((10, 12, 12), np.int16), np.full((10, 12, 12), -1000, np.int16)],
                         ids=["empty", "constant air"])
def test_volume_without_edges_is_rejected(values):
    with pytest.warns(UserWarning, match="Hounsfield"):        # a constant volume does not look like CT either
        with pytest.raises(ValueError, match="no edges"):
            extract_point_cloud(_volume(values))


@pytest.mark.parametrize("low, high", [(0.0, 1.0), (0.0, 3500.0), (-1000.0, 40.0)], ids=["0-1", "MRI", "no bone"])
def test_non_ct_intensities_warn(low, high):
    values = _ct_like()
    values = low + (values - values.min()) / np.ptp(values) * (high - low)
    with pytest.warns(UserWarning, match="does not look like CT in Hounsfield units"):
        surf3d(_volume(values.astype(np.float32)), np.zeros((1, 3)))


def test_ct_intensities_do_not_warn(recwarn):
    surf3d(_volume(_ct_like()), np.zeros((1, 3)))
    assert not [w for w in recwarn if "Hounsfield" in str(w.message)]


# ---------------------------------------------------------------------------------------------------- 3D SURF
BLOB_CENTRE = np.array([5.0, -12.0, 40.0])
BLOBS = [((8.0, 3.0, -5.0), 12.0, 400.0), ((-10.0, -6.0, 4.0), 9.0, -600.0), ((2.0, 12.0, 8.0), 7.0, 300.0)]


def _blobs(xyz):
    """Smooth CT-like test function of LPS mm."""
    values = np.full(len(xyz), -200.0)
    for offset, radius, amplitude in BLOBS:
        values += amplitude * np.exp(-np.sum((xyz - BLOB_CENTRE - offset) ** 2, axis=1) / (2 * radius ** 2))
    return values


def _blob_image(direction=np.eye(3), dtype=np.float32, size=(48, 48, 40), spacing=(1.2, 1.2, 1.5)):
    return _image_of(_blobs, direction, BLOB_CENTRE, size, spacing, dtype)


@pytest.fixture(scope="module")
def blob_points():
    return BLOB_CENTRE + np.random.default_rng(1).uniform(-15.0, 15.0, (150, 3))


@pytest.fixture(scope="module")
def blob_descriptors(blob_points):
    return surf3d(_blob_image(), blob_points)


def _relative_errors(computed, reference):
    return np.abs(computed - reference).max(axis=1) / np.abs(reference).max(axis=1)


def test_oblique_image_gives_the_descriptors_of_the_physical_volume(blob_points, blob_descriptors):
    """Oblique images are resampled onto an RAS grid first: close to the axis-aligned volume's descriptors
    (they change by steps under resampling), unlike the original tool, which ignores the rotation."""
    oblique = _blob_image(DIRECTIONS["oblique"])
    errors = _relative_errors(surf3d(oblique, blob_points), blob_descriptors)
    assert np.median(errors) < 0.1
    ignoring_rotation = sitk.Image(oblique)
    ignoring_rotation.SetDirection(tuple(np.eye(3).ravel()))
    ignoring_rotation.SetOrigin(tuple(BLOB_CENTRE - (np.array(oblique.GetSize()) - 1) * oblique.GetSpacing() / 2))
    assert np.median(_relative_errors(surf3d(ignoring_rotation, blob_points), blob_descriptors)) > 0.3


def test_descriptors_do_not_depend_on_the_pixel_type(blob_points):
    as_int = _blob_image(dtype=np.int16)
    as_float = sitk.Cast(as_int, sitk.sitkFloat64)
    np.testing.assert_array_equal(surf3d(as_int, blob_points), surf3d(as_float, blob_points))


def test_descriptors_do_not_depend_on_the_chunking(blob_points, blob_descriptors, monkeypatch):
    """Haar responses are streamed through z in chunks of planes; the smallest chunks give the same result."""
    monkeypatch.setattr(surf3d_module, "_CHUNK_VOXELS", 1)
    np.testing.assert_array_equal(surf3d(_blob_image(), blob_points), blob_descriptors)


@pytest.mark.filterwarnings("ignore:.*Hounsfield")
def test_ramp_gives_pure_negative_dx():
    """HU rising towards the patient's left (LPS +x = RAS -x): Σdx = -Σ|dx| > 0 in every subregion, dy = dz = 0."""
    image = _image_of(lambda xyz: 150.0 + 3.0 * xyz[:, 0], DIRECTIONS["permuted"], (0.0, 0.0, 0.0),
                      (70, 70, 60), (1.0, 1.0, 1.0))
    descriptor = surf3d(image, np.array([[0.0, 0.0, 0.0], [2.3, -1.7, 0.4]])).reshape(2, 8, 6)
    sum_dx, sum_dy, sum_dz, abs_dx, abs_dy, abs_dz = np.moveaxis(descriptor, 2, 0)
    # 2.25 HU per 0.75 mm voxel → dx = 100 columns · 25 · 2.25 = 5625, times Σ weights ≈ 125 · 0.6 / σ³
    assert np.all((abs_dx > 100.0) & (abs_dx < 250.0))
    np.testing.assert_allclose(sum_dx, -abs_dx, rtol=1e-6)
    for zero in (sum_dy, sum_dz, abs_dy, abs_dz):
        np.testing.assert_array_equal(zero, 0.0)


def _direct_surf3d(image, points_lps, scale_mm):
    """Independent evaluation of the descriptor from its definition: whole padded volume, VTK resampling,
    integral image, box sums per sample. ``image`` must have the RAS-aligned direction diag(-1, -1, 1)."""
    volume = sitk.GetArrayFromImage(image).transpose(2, 1, 0).astype(np.float64)      # (R, A, S) voxel order
    spacing, ras_min = np.array(image.GetSpacing()), np.array(image.GetOrigin()) * [-1, -1, 1]
    pad = np.ceil(30.0 / spacing).astype(int)
    padded = np.clip(np.pad(volume, [(p, p + 1) for p in pad], mode="symmetric"), -100, 512)
    origin, out_spacing = ras_min - pad * spacing, spacing / (spacing / 0.75)
    for axis in range(3):                                       # VTK: 2**-16 fixed-point weights, edge clamped
        count = int(np.floor((padded.shape[axis] - 1) * spacing[axis] / 0.75)) + 1
        position = (1 / spacing[axis]) * origin[axis] - origin[axis] / spacing[axis] \
            + np.arange(count) * ((1 / spacing[axis]) * out_spacing[axis])
        position = (position + 1.5 * 2.0 ** 36) - 1.5 * 2.0 ** 36
        lower = np.floor(position).astype(int)
        weight = (position - lower).reshape([-1 if a == axis else 1 for a in range(3)])
        upper = np.minimum(lower + 1, padded.shape[axis] - 1)
        padded = padded.take(lower, axis=axis) * (1 - weight) + padded.take(upper, axis=axis) * weight
    resampled = np.floor(padded + 0.5 + 2.0 ** -17).astype(np.int64)
    integral = np.zeros(np.array(resampled.shape) + 1, dtype=np.int64)
    integral[1:, 1:, 1:] = resampled.cumsum(0).cumsum(1).cumsum(2)

    def box(low, high):                                         # inclusive voxel ranges, (N, 3) each
        (x0, y0, z0), (x1, y1, z1) = low.T, (high + 1).T
        return (integral[x1, y1, z1] - integral[x0, y1, z1] - integral[x1, y0, z1] - integral[x1, y1, z0]
                + integral[x0, y0, z1] + integral[x0, y1, z0] + integral[x1, y0, z0] - integral[x0, y0, z0])

    f32 = np.float32
    scale = f32(scale_mm / np.cbrt(np.prod(out_spacing)))
    sigma = f32(2.5) * scale
    position = ((np.asarray(points_lps) * [-1, -1, 1]).astype(f32).astype(np.float64) - origin) / out_spacing
    position = position.astype(f32)
    centre = np.floor(position + f32(0.5))
    h = int(np.floor(scale + f32(0.5)))
    out = np.zeros((len(position), 8, 6))
    for region, corner in enumerate(np.ndindex(2, 2, 2)):
        start = np.array([-5, -5, -5]) + 5 * np.array(corner)
        gauss = np.floor(position + (start + 2).astype(f32) * scale + f32(0.5))
        for uvw in np.ndindex(5, 5, 5):
            sample = np.floor(centre + (start + uvw).astype(f32) * scale + f32(0.5)).astype(int)
            d2 = np.sum((gauss - sample) ** 2, axis=1)
            weight = np.exp(-d2 / (2.0 * float(sigma) ** 2)) / float(sigma) ** 3
            whole = box(sample - h, sample + h - 1)
            for axis in range(3):
                low = sample - h
                low[:, axis] = sample[:, axis]
                response = 2 * box(low, sample + h - 1) - whole             # upper half minus lower half
                out[:, region, axis] += weight * response
                out[:, region, 3 + axis] += np.abs(weight * response)
    return out.reshape(len(position), 48)


@pytest.mark.parametrize("scale_mm", [2.0, 4.0, 6.5])
def test_descriptor_matches_its_definition(scale_mm):
    """Against a direct evaluation (integral image, one box sum per sample); 6.5 mm exercises int32 partial sums."""
    image = _blob_image(np.diag([-1.0, -1.0, 1.0]), np.int16, size=(40, 36, 30))
    points = BLOB_CENTRE + np.random.default_rng(5).uniform(-6.0, 6.0, (40, 3))
    np.testing.assert_allclose(surf3d(image, points, scale_mm), _direct_surf3d(image, points, scale_mm),
                               rtol=1e-5, atol=1e-4)


def test_support_ends_with_the_padding():
    """Points up to a few mm outside work; points far outside raise a ValueError saying how many."""
    image = _blob_image()
    low, high = (Grid.of(image).index_to_lps(np.array([[0, 0, 0], np.array(image.GetSize()) - 1.0])))
    near = np.array([low - [3.0, 3.0, 3.0], high + [3.0, 3.0, 3.0], (low + high) / 2])
    assert np.all(np.isfinite(surf3d(image, near)))
    far = np.array([low - [40.0, 0.0, 0.0], (low + high) / 2, high + [0.0, 0.0, 60.0]])
    with pytest.raises(ValueError, match="2 of 3 points lie too far outside the volume"):
        surf3d(image, far)


def test_tiny_volume_is_padded_enough():
    image = _volume(np.array([[[-1000, 200], [0, 50]], [[30, -40], [500, 90]]], dtype=np.int16), (2.0, 2.0, 3.0))
    centre = Grid.of(image).centre_lps[None]
    descriptor = surf3d(image, centre)
    assert descriptor.shape == (1, 48) and np.abs(descriptor).max() > 0


def test_no_points_give_an_empty_array():
    result = surf3d(_blob_image(size=(8, 8, 8)), np.zeros((0, 3)))
    assert result.shape == (0, 48) and result.dtype == np.float32


@pytest.mark.parametrize("points, scale, message", [
    (np.zeros((4, 2)), 4.0, r"\(N, 3\) array of LPS millimetres, got shape \(4, 2\)"),
    (np.zeros(3), 4.0, r"got shape \(3,\)"),
    ([["a", "b", "c"]], 4.0, "LPS millimetres"),
    (np.array([[0.0, np.nan, 0.0], [np.inf, 0, 0]]), 4.0, "2 points with NaN or infinite coordinates"),
    (np.zeros((1, 3)), 0.0, "scale_mm must be a positive number"),
    (np.zeros((1, 3)), float("nan"), "scale_mm must be a positive number"),
    (np.zeros((1, 3)), 0.3, "scale_mm must be between 0.375 and 48.3675 mm"),
    (np.zeros((1, 3)), 60.0, "scale_mm must be between"),
])
def test_bad_points_and_scale_are_rejected(points, scale, message):
    with pytest.raises(ValueError, match=message):
        surf3d(_blob_image(size=(8, 8, 8)), points, scale)


def test_surf3d_reports_progress_and_can_be_cancelled(blob_points):
    seen = []
    surf3d(_blob_image(), blob_points, progress=lambda fraction, message: seen.append(fraction))
    assert seen[-1] == 1.0 and seen == sorted(seen) and len(seen) >= 2

    def cancel(fraction, message):
        raise Cancelled()
    with pytest.raises(Cancelled):
        surf3d(_blob_image(), blob_points, progress=cancel)


# ---------------------------------------------------------------------------------------------------- point cloud
def _small_ct():
    """A 64 × 56 × 18 CT-like volume (3 × 3 × 4 mm): air, body, fat rim, organs, bone."""
    def ct(xyz):
        x, y, z = (xyz - [0.0, 20.0, -30.0]).T
        body = (x / 80.0) ** 2 + (y / 60.0) ** 2
        values = np.where(body < 1.0, -90.0, -1000.0)
        values = np.where(body < 0.8, 40.0, values)
        values = np.where(((x - 30) / 25) ** 2 + (y / 20) ** 2 + (z / 25) ** 2 < 1, 250.0, values)
        values = np.where((x / 8) ** 2 + ((y - 40) / 10) ** 2 < 1, 700.0, values)
        return values + 10.0 * np.sin(x / 7.0) * np.cos(y / 5.0)
    return _image_of(ct, DIRECTIONS["flipped_xy"], (0.0, 20.0, -30.0), (64, 56, 18), (3.0, 3.0, 4.0))


@pytest.fixture(scope="module")
def small_ct():
    return _small_ct()


@pytest.fixture(scope="module")
def edges(small_ct):
    return canny_points(small_ct)


@pytest.fixture(scope="module")
def cloud(small_ct):
    return extract_point_cloud(small_ct, n_points=3000, seed=7)


def test_cloud_shapes_and_dtypes(cloud):
    assert cloud.xyz_lps.shape == (3000, 3) and cloud.xyz_lps.dtype == np.float64
    assert cloud.surf_int8.shape == (3000, 48) and cloud.surf_int8.dtype == np.int8
    assert cloud.surf_scale.shape == (48,) and cloud.surf_scale.dtype == np.float32
    assert cloud.features.shape == (3000, 48) and cloud.features.dtype == np.float32


def test_cloud_draws_with_replacement_from_the_edges(cloud, edges):
    drawn = np.random.default_rng(7).integers(0, len(edges), size=3000)
    np.testing.assert_array_equal(cloud.xyz_lps, edges[drawn])


def test_cloud_int8_storage_follows_the_reference(cloud, small_ct):
    unique, inverse = np.unique(cloud.xyz_lps, axis=0, return_inverse=True)
    surf = surf3d(small_ct, unique)[inverse.reshape(-1)]
    maxima = np.max(np.abs(surf) + np.float32(1e-6), axis=0)
    np.testing.assert_array_equal(cloud.surf_int8, (surf * np.float32(127) / maxima).astype(np.int8))
    np.testing.assert_allclose(cloud.surf_scale, maxima / 127, rtol=1e-7)
    assert np.all(np.abs(cloud.features - surf) <= cloud.surf_scale * 1.0001)     # truncation: < one step
    assert np.all(np.abs(cloud.surf_int8).max(axis=0) >= 126)                     # each column's maximum
    assert np.all(np.abs(surf).max(axis=0) > 1.0)                                 # (no empty column)


def test_a_point_has_the_same_descriptor_in_any_company(small_ct, edges):
    together = surf3d(small_ct, edges[:1500])
    np.testing.assert_array_equal(surf3d(small_ct, edges[400:900]), together[400:900])


def test_cloud_is_deterministic_per_seed(small_ct, cloud):
    again = extract_point_cloud(small_ct, n_points=3000, seed=7)
    other = extract_point_cloud(small_ct, n_points=3000, seed=8)
    np.testing.assert_array_equal(again.xyz_lps, cloud.xyz_lps)
    np.testing.assert_array_equal(again.surf_int8, cloud.surf_int8)
    assert not np.array_equal(other.xyz_lps, cloud.xyz_lps)


def test_more_points_than_edges_repeats_points(small_ct, edges):
    cloud = extract_point_cloud(small_ct, n_points=3 * len(edges), seed=0)
    unique, first, counts = np.unique(cloud.xyz_lps, axis=0, return_index=True, return_counts=True)
    assert counts.max() > 1 and len(unique) <= len(edges)
    rows = {tuple(p): cloud.surf_int8[i] for p, i in zip(unique, first)}
    same = [np.array_equal(rows[tuple(p)], s) for p, s in zip(cloud.xyz_lps[::97], cloud.surf_int8[::97])]
    assert all(same)


def test_all_edges_when_n_points_is_none(small_ct, edges):
    cloud = extract_point_cloud(small_ct, n_points=None)
    np.testing.assert_array_equal(cloud.xyz_lps, edges)


def test_model_input_concatenates_object_frame_and_features(small_ct, cloud):
    frame = ObjectFrame.of(Grid.of(small_ct))
    inputs = cloud.model_input(frame)
    assert inputs.shape == (3000, 51) and inputs.dtype == np.float32
    np.testing.assert_array_equal(inputs[:, :3], frame.lps_to_object(cloud.xyz_lps))
    np.testing.assert_array_equal(inputs[:, 3:], cloud.features)
    assert np.abs(inputs[:, :3]).max() < 0.5                 # the volume spans less than 400 mm


def test_cloud_save_load_round_trip(cloud, tmp_path):
    path = tmp_path / "cloud.npz"
    cloud.save(path)
    loaded = PointCloud.load(path)
    for name in ("xyz_lps", "surf_int8", "surf_scale"):
        np.testing.assert_array_equal(getattr(loaded, name), getattr(cloud, name))
        assert getattr(loaded, name).dtype == getattr(cloud, name).dtype
    assert sorted(np.load(path, allow_pickle=False).files) == ["surf_int8", "surf_scale", "version", "xyz_lps"]
    assert [p.name for p in tmp_path.iterdir()] == ["cloud.npz"]


def test_load_rejects_other_files(tmp_path):
    path = tmp_path / "other.npz"
    np.savez(path, points=np.zeros((3, 3)))
    with pytest.raises(ValueError, match="not a SCONet point cloud"):
        PointCloud.load(path)


def test_point_cloud_checks_its_arrays():
    with pytest.raises(ValueError, match=r"surf_int8 must be a \(2, 48\) int8 array"):
        PointCloud(np.zeros((2, 3)), np.zeros((2, 48), np.float32), np.ones(48, np.float32))


@pytest.mark.parametrize("n_points", [0, -5, 2.5, True, "100"])
def test_bad_n_points_are_rejected(small_ct, n_points):
    with pytest.raises(ValueError, match="n_points must be an integer >= 1 or None"):
        extract_point_cloud(small_ct, n_points=n_points)


def test_cloud_reports_progress_and_can_be_cancelled(small_ct):
    seen = []
    extract_point_cloud(small_ct, n_points=500, progress=lambda fraction, message: seen.append((fraction, message)))
    fractions = [f for f, _ in seen]
    assert fractions == sorted(fractions) and fractions[0] == 0.0 and fractions[-1] == 1.0
    assert "Canny" in seen[0][1] and "SURF" in seen[-1][1]

    def cancel_during_surf(fraction, message):
        if "SURF" in message:
            raise Cancelled()
    with pytest.raises(Cancelled):
        extract_point_cloud(small_ct, n_points=500, progress=cancel_during_surf)
