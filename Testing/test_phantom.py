"""Tests of SCONetLib.phantom: synthetic abdominal CTs, their anatomy, geometry and datasets."""
from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk

from SCONetLib import io, phantom
from SCONetLib.geometry import Grid
from SCONetLib.labels import ORGANS, organ_by_name
from SCONetLib.progress import Cancelled

#: Small fast settings: 4 mm pixels, whole-organ coverage (100 × 3 mm = 300 mm).
FULL_COVERAGE = {"size": (96, 96, 100), "spacing": (4.0, 4.0, 3.0)}


def _arrays(ct, labels):
    return sitk.GetArrayFromImage(ct), sitk.GetArrayFromImage(labels)


def _organ_centroids_lps(labels):
    """organ name -> (3,) LPS mm centroid of its voxels."""
    grid, array = Grid.of(labels), sitk.GetArrayViewFromImage(labels)
    centroids = {}
    for organ in ORGANS:
        kji = np.argwhere(array == organ.label)
        centroids[organ.name] = grid.index_to_lps(kji[:, ::-1].astype(float)).mean(axis=0)
    return centroids


def _dice(a, b):
    return 2.0 * np.logical_and(a, b).sum() / (a.sum() + b.sum())


def test_types_geometry_and_label_values(small_phantom_oblique):
    ct, labels = small_phantom_oblique
    assert ct.GetPixelID() == sitk.sitkInt16 and labels.GetPixelID() == sitk.sitkUInt8
    assert Grid.of(ct) == Grid.of(labels)
    assert ct.GetSize() == (96, 96, 32) and ct.GetSpacing() == (4.0, 4.0, 3.5)
    counts = np.bincount(sitk.GetArrayViewFromImage(labels).ravel())
    assert len(counts) == 5 and np.all(counts > 0)  # values ⊂ {0..4}, every organ present


def test_same_seed_same_images_other_seed_differs():
    first, again, other = (phantom.make_phantom(seed, size=(48, 48, 20)) for seed in (3, 3, 4))
    for a, b in zip(_arrays(*first), _arrays(*again)):
        np.testing.assert_array_equal(a, b)
    assert Grid.of(first[0]) == Grid.of(again[0])
    assert Grid.of(first[0]) != Grid.of(other[0])
    assert not np.array_equal(_arrays(*first)[1], _arrays(*other)[1])


@pytest.mark.parametrize("seed", [0, 1, 2, 3, 4])
def test_organ_volumes_in_plausible_ranges(seed):
    _, labels = phantom.make_phantom(seed, random_orientation=False, **FULL_COVERAGE)
    voxel_ml = np.prod(labels.GetSpacing()) / 1000.0
    counts = np.bincount(sitk.GetArrayViewFromImage(labels).ravel(), minlength=5)
    for organ in ORGANS:
        low, high = phantom.ORGAN_VOLUME_ML[organ.name]
        assert low <= counts[organ.label] * voxel_ml <= high, (organ.name, counts[organ.label] * voxel_ml)


@pytest.mark.parametrize("seed", [0, 5, 9])
def test_laterality_and_relative_positions_in_physical_space(seed):
    _, labels = phantom.make_phantom(seed, size=(64, 64, None))
    c = _organ_centroids_lps(labels)
    # LPS: x grows toward the patient's left, y toward the back, z toward the head.
    assert c["liver"][0] + 40 < c["kidneys"][0] < c["spleen"][0] - 40  # liver right, spleen left
    assert c["kidneys"][1] > c["liver"][1] + 15 and c["kidneys"][1] > c["pancreas"][1] + 15  # kidneys posterior
    assert c["liver"][2] > c["kidneys"][2] + 20  # liver above the kidneys
    array = sitk.GetArrayViewFromImage(labels) == organ_by_name("kidneys").label
    mid_x = c["kidneys"][0]
    points = Grid.of(labels).index_to_lps(np.argwhere(array)[:, ::-1].astype(float))
    right, left = points[points[:, 0] < mid_x], points[points[:, 0] >= mid_x]
    assert min(len(right), len(left)) > 0.35 * len(points)  # one kidney on each side of the midline


def test_array_layout_follows_the_direction(small_phantom, small_phantom_oblique):
    """Same anatomy; with the x axis flipped the liver moves to high i in the array."""
    for (_, labels), liver_at_high_i in ((small_phantom, False), (small_phantom_oblique, True)):
        array = sitk.GetArrayViewFromImage(labels)
        i_liver = np.argwhere(array == organ_by_name("liver").label)[:, 2].mean()
        i_spleen = np.argwhere(array == organ_by_name("spleen").label)[:, 2].mean()
        assert (i_liver > i_spleen) == liver_at_high_i
    assert small_phantom_oblique[1].GetDirection()[0] < -0.99


@pytest.mark.parametrize("seed", [3, 7])
def test_same_anatomy_whatever_the_storage_orientation(seed):
    """The anatomy lives in LPS space: resampling the randomly oriented phantom onto the axis-aligned one's
    grid gives the same organs (exactly for pure flips, up to voxel sampling for oblique grids)."""
    kwargs = {"size": (80, 80, None)}
    _, fixed = phantom.make_phantom(seed, random_orientation=False, **kwargs)
    _, moved = phantom.make_phantom(seed, random_orientation=True, **kwargs)
    direction = np.reshape(moved.GetDirection(), (3, 3))
    assert not np.allclose(direction, np.eye(3))
    oblique = not np.allclose(np.abs(direction), np.eye(3))
    back = sitk.GetArrayFromImage(sitk.Resample(moved, fixed, sitk.Transform(), sitk.sitkNearestNeighbor, 0))
    array = sitk.GetArrayViewFromImage(fixed)
    for organ in ORGANS:
        dice = _dice(array == organ.label, back == organ.label)
        assert dice > (0.9 if oblique else 0.999), (organ.name, dice)
    assert oblique == (seed == 7)


def test_hu_of_tissues(small_phantom):
    ct, _ = _arrays(*small_phantom)
    table = {"liver": (50, 70), "spleen": (37, 55), "pancreas": (30, 50), "kidneys": (18, 45)}
    for organ in ORGANS:
        inside = sitk.GetArrayFromImage(sitk.BinaryErode(small_phantom[1] == organ.label, [1, 1, 1]))
        low, high = table[organ.name]
        assert low <= np.median(ct[inside > 0]) <= high, organ.name
    corner = ct[:, :4, :4]
    assert corner.mean() < -960 and 8 < corner.std() < 25  # air plus noise
    assert ct.max() > 500  # bone
    assert np.count_nonzero(ct < -900) > np.count_nonzero(corner < -900) + 50  # gas in the bowel
    body = ct[:, 48, :]  # a row through the body: fat (~-100) and muscle (~50) both occur
    assert np.any((body > -130) & (body < -70)) and np.any((body > 30) & (body < 70))


def test_noise_and_blur_settings():
    smooth_ct, labels = phantom.make_phantom(2, size=(48, 48, 16), noise_hu=0.0, blur_voxels=0.0)
    ct = sitk.GetArrayFromImage(smooth_ct)
    liver = sitk.GetArrayFromImage(labels) == organ_by_name("liver").label
    values = np.unique(ct[liver])
    assert len(values) <= 8  # liver tissue plus a few vessels: flat values without noise or blur
    noisy, _ = phantom.make_phantom(2, size=(48, 48, 16), noise_hu=30.0, blur_voxels=0.0)
    difference = sitk.GetArrayFromImage(noisy).astype(float) - ct
    assert abs(difference[ct > -900].std() - 30.0) < 1.5  # away from the -1024 clip of air


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_default_spacing_and_coverage(seed):
    ct, _ = phantom.make_phantom(seed, size=(32, 32, None), random_orientation=False)
    sx, sy, sz = ct.GetSpacing()
    assert sx == sy and 0.6 * 512 - 1e-6 <= 32 * sx <= 0.9 * 512 + 1e-6  # field of view 307-461 mm
    assert sz in phantom.SLICE_SPACINGS_MM
    assert 150.0 - sz <= ct.GetSize()[2] * sz <= 300.0 + sz


def test_full_size_pixels_are_06_to_09_mm():
    ct, labels = phantom.make_phantom(11, size=(512, 512, 4))
    assert ct.GetSize() == (512, 512, 4)
    assert 0.6 <= ct.GetSpacing()[0] == ct.GetSpacing()[1] <= 0.9
    assert Grid.of(ct) == Grid.of(labels)


def test_random_directions_are_flips_and_small_tilts():
    flipped_x = tilted = 0
    for seed in range(24):
        ct, _ = phantom.make_phantom(seed, size=(8, 8, 2), spacing=50.0)
        d = np.reshape(ct.GetDirection(), (3, 3))
        np.testing.assert_allclose(d.T @ d, np.eye(3), atol=1e-9)
        cosines = np.abs(np.diag(d))
        assert np.all(cosines >= np.cos(np.radians(phantom.MAX_OBLIQUE_DEG)) - 1e-9)  # axial, at most 10° off
        flipped_x += d[0, 0] < 0
        tilted += not np.allclose(cosines, 1.0)
    assert 4 <= flipped_x <= 20 and 2 <= tilted <= 16


def test_given_spacing_and_size_are_kept():
    ct, _ = phantom.make_phantom(5, size=(40, 30, 12), spacing=(5.0, 6.0, 7.0), random_orientation=False)
    assert ct.GetSize() == (40, 30, 12) and ct.GetSpacing() == (5.0, 6.0, 7.0)
    assert ct.GetDirection() == tuple(np.eye(3).ravel())


def test_progress_and_cancel():
    fractions = []
    phantom.make_phantom(1, size=(24, 24, 8), progress=lambda f, m: fractions.append(f))
    assert fractions[0] == 0.0 and fractions[-1] == 1.0 and fractions == sorted(fractions)

    def cancel(fraction, message):
        if fraction > 0.3:
            raise Cancelled("stop")

    with pytest.raises(Cancelled):
        phantom.make_phantom(1, size=(24, 24, 8), progress=cancel)


@pytest.mark.parametrize("kwargs, expected", [
    ({"seed": -1}, "seed must be an integer >= 0, got -1"),
    ({"seed": 1.5}, "seed must be an integer >= 0, got 1.5"),
    ({"size": (4, 64, None)}, r"size must be \(nx, ny, nz\) .* got \(4, 64, None\)"),
    ({"size": (64, 64)}, r"size must be \(nx, ny, nz\)"),
    ({"size": (64, 64, 1)}, r"nz an integer >= 2 or None, got \(64, 64, 1\)"),
    ({"spacing": (1.0, 0.0, 1.0)}, r"spacing must be one or three positive finite numbers \(mm\), got \(1.0, 0.0"),
    ({"spacing": (1.0, 2.0)}, "spacing must be one or three positive finite numbers"),
    ({"spacing": "thin"}, "spacing must be one or three positive finite numbers"),
    ({"blur_voxels": 1.5}, r"blur_voxels must be a number in \[0, 0.8\] \(voxels\), got 1.5"),
    ({"noise_hu": -3.0}, r"noise_hu must be None or a number >= 0 \(HU\), got -3.0"),
])
def test_invalid_arguments(kwargs, expected):
    arguments = {"seed": 0, "size": (16, 16, 4), **kwargs}
    with pytest.raises(ValueError, match=expected):
        phantom.make_phantom(**arguments)


def test_cli_writes_a_readable_dataset(tmp_path):
    out = tmp_path / "data"
    status = phantom.main([str(out), "--n", "2", "--seed", "5", "--size", "40", "--spacing", "8", "8", "6"])
    assert status == 0
    files = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    assert files == ["dataset.json", "segmentations/Case_00001.nii.gz", "segmentations/Case_00002.nii.gz",
                     "volumes/Case_00001_0000.nii.gz", "volumes/Case_00002_0000.nii.gz"]
    description = json.loads((out / "dataset.json").read_text(encoding="utf-8"))
    assert description["seed"] == 5 and description["n"] == 2
    assert description["labels"] == {"0": "background", "1": "liver", "2": "kidneys", "3": "spleen",
                                     "4": "pancreas"}
    assert [case["seed"] for case in description["cases"]] == [5, 6]
    assert description["phantom_kwargs"] == {"size": [40, 40, None], "spacing": [8.0, 8.0, 6.0],
                                             "random_orientation": True, "version": 2}
    assert description["generator_version"] == 2 and description["cases"][0]["parameters"]["phase"] in phantom.PHASES
    case = description["cases"][1]
    ct, labels = io.read_image(out / case["image"]), io.read_image(out / case["label"])
    assert Grid.of(ct) == Grid.of(labels) and list(ct.GetSize()) == case["size"]
    expected_ct, expected_labels = phantom.make_phantom(6, size=(40, 40, None), spacing=(8.0, 8.0, 6.0), version=2)
    np.testing.assert_array_equal(sitk.GetArrayViewFromImage(ct), sitk.GetArrayViewFromImage(expected_ct))
    np.testing.assert_array_equal(sitk.GetArrayViewFromImage(labels), sitk.GetArrayViewFromImage(expected_labels))
    np.testing.assert_allclose(ct.GetOrigin(), expected_ct.GetOrigin(), atol=1e-4)
    np.testing.assert_allclose(ct.GetDirection(), expected_ct.GetDirection(), atol=1e-6)


def test_cli_reports_bad_arguments(tmp_path, capsys):
    assert phantom.main([str(tmp_path / "x"), "--n", "0"]) == 1
    assert "n must be an integer >= 1, got 0" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
    with pytest.raises(SystemExit):
        phantom.main([str(tmp_path / "x"), "--n", "two"])
