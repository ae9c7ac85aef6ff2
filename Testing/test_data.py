"""Tests of SCONetLib.data: label maps, dataset discovery, splits, the preprocessing cache and the samples."""
import os
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

import SCONetLib.points
from SCONetLib.data import (Case, CaseData, CaseStore, DataConfig, apply_label_map, find_cases, parse_label_map,
                            prepare_cases, random_linear_transform, sample_input_points, sample_queries,
                            sample_training_example, split_cases)
from SCONetLib.geometry import Grid, ObjectFrame


# ---------------------------------------------------------------- label maps

@pytest.mark.parametrize("preset, source, expected", [
    # TotalSegmentator v2 "total": spleen 1, kidney_right 2, kidney_left 3, gallbladder 4, liver 5, pancreas 7
    ("totalsegmentator", [0, 1, 2, 3, 4, 5, 6, 7, 8, 117], [0, 3, 2, 2, 0, 1, 0, 4, 0, 0]),
    # BTCV: spleen 1, right kidney 2, left kidney 3, liver 6, pancreas 11, the rest background
    ("btcv", [0, 1, 2, 3, 4, 5, 6, 7, 11, 13], [0, 3, 2, 2, 0, 0, 1, 0, 4, 0]),
    ("abdomenct1k", [0, 1, 2, 3, 4, 5], [0, 1, 2, 3, 4, 0]),
    ("1:1,2:2,3:2", [0, 1, 2, 3, 4], [0, 1, 2, 2, 0]),
])
def test_label_map_presets_and_specs(preset, source, expected):
    mapped = apply_label_map(np.array(source, dtype=np.int16), parse_label_map(preset))
    assert mapped.dtype == np.uint8
    assert mapped.tolist() == expected


def test_no_label_map_keeps_sconet_labels_and_rejects_others():
    assert apply_label_map(np.array([0, 4, 2], np.int32), None).tolist() == [0, 4, 2]
    assert apply_label_map(np.array([1.0, 3.0]), None).tolist() == [1, 3]
    with pytest.raises(ValueError, match="label value 7 is outside"):
        apply_label_map(np.array([0, 7]), None)


@pytest.mark.parametrize("spec, match", [
    ("1:1,2", "not 'source:target'"),
    ("1:5", "target of 1 must be an integer in 0..4"),
    ("1:1,1:2", "two targets"),
    ("nosuchpreset", "not 'source:target'"),
])
def test_bad_label_maps(spec, match):
    with pytest.raises(ValueError, match=match):
        parse_label_map(spec)


def test_label_values_must_be_whole_and_non_negative():
    with pytest.raises(ValueError, match="whole numbers"):
        apply_label_map(np.array([0.5]), None)
    with pytest.raises(ValueError, match=">= 0"):
        apply_label_map(np.array([-1, 2]), parse_label_map("btcv"))


# ---------------------------------------------------------------- discovery and splits

def _touch(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"")
    return path


def test_find_cases_abdomenct1k_layout(tmp_path):
    for stem in ("Case_00001", "Case_00002", "Case_00442_2"):
        _touch(tmp_path / "segmentations" / f"{stem}.nii.gz")
    for stem in ("Case_00001_0000", "Case_00002_0000", "Case_00442_0000_2", "Case_00003_0000"):
        _touch(tmp_path / "volumes" / f"{stem}.nii.gz")
    cases, problems = find_cases(tmp_path)
    assert [c.case_id for c in cases] == ["Case_00001", "Case_00002", "Case_00442_2"]
    assert cases[2].image.name == "Case_00442_0000_2.nii.gz"
    assert cases[2].label.name == "Case_00442_2.nii.gz"
    assert [p["case_id"] for p in problems] == ["Case_00003"]
    assert problems[0]["reason"] == "no label file"


def test_find_cases_with_patterns(tmp_path):
    for case_id in ("s0001", "s0002"):
        _touch(tmp_path / case_id / "ct.nii.gz")
        _touch(tmp_path / case_id / "seg" / "all.nii.gz")
    _touch(tmp_path / "s0003" / "ct.nii.gz")
    cases, problems = find_cases(tmp_path, "pattern", "{id}/ct.nii.gz", "{id}/seg/all.nii.gz")
    assert [(c.case_id, c.label.relative_to(tmp_path).as_posix()) for c in cases] == [
        ("s0001", "s0001/seg/all.nii.gz"), ("s0002", "s0002/seg/all.nii.gz")]
    assert [p["case_id"] for p in problems] == ["s0003"]
    with pytest.raises(FileNotFoundError, match="no image matches"):
        find_cases(tmp_path, "nnunet")


def _cases(ids):
    return [Case(i, Path(f"volumes/{i}_0000.nii.gz"), Path(f"segmentations/{i}.nii.gz")) for i in ids]


def test_split_lists_accept_stems_ids_and_file_names(tmp_path):
    cases = _cases([f"Case_{k:05d}" for k in range(1, 7)])
    (tmp_path / "train.lst").write_text("Case_00001_0000\nCase_00002\n\n# a comment\nCase_00003_0000.nii.gz\n")
    (tmp_path / "val.lst").write_text("Case_00004.nii.gz  # trailing comment\n")
    (tmp_path / "test.lst").write_text("Case_00005_0000\n")
    splits = split_cases(cases, tmp_path)
    assert {k: [c.case_id for c in v] for k, v in splits.items()} == {
        "train": ["Case_00001", "Case_00002", "Case_00003"], "val": ["Case_00004"], "test": ["Case_00005"]}


def test_split_lists_reject_unknown_and_duplicated_cases(tmp_path):
    cases = _cases(["Case_00001", "Case_00002"])
    (tmp_path / "train.lst").write_text("Case_00001\nCase_00099_0000\n")
    with pytest.raises(ValueError, match=r"name 1 case\(s\).*Case_00099"):
        split_cases(cases, tmp_path)
    (tmp_path / "train.lst").write_text("Case_00001\n")
    (tmp_path / "test.lst").write_text("Case_00001_0000\n")
    with pytest.raises(ValueError, match="in both train.lst and test.lst"):
        split_cases(cases, tmp_path)


@pytest.mark.parametrize("n, expected", [(1, (1, 0, 0)), (3, (2, 1, 0)), (10, (8, 1, 1)), (25, (19, 3, 3))])
def test_seeded_split_sizes_are_disjoint_and_reproducible(n, expected):
    cases = _cases([f"c{k:03d}" for k in range(n)])
    splits = split_cases(cases, None, seed=3)
    assert tuple(len(splits[s]) for s in ("train", "val", "test")) == expected
    ids = [c.case_id for s in splits.values() for c in s]
    assert sorted(ids) == sorted(c.case_id for c in cases)
    assert split_cases(list(reversed(cases)), None, seed=3) == splits
    if n >= 10:
        assert split_cases(cases, None, seed=4) != splits


def test_data_config_validation():
    with pytest.raises(ValueError, match=r"unknown data keys \['rot'\]"):
        DataConfig.from_dict({"source": "phantom", "rot": "x"})
    with pytest.raises(ValueError, match="data.root"):
        DataConfig.from_dict({"source": "abdomenct1k"})
    with pytest.raises(ValueError, match=r"unknown data.phantom keys \['colour'\]"):
        DataConfig.from_dict({"source": "phantom", "phantom": {"colour": 1}})
    with pytest.raises(ValueError, match="n_train must be an integer >= 1"):
        DataConfig.from_dict({"source": "phantom", "phantom": {"n_train": 0}})
    config = DataConfig.from_dict({"source": "phantom", "phantom": {"n_train": 3, "size": [64, 64, 8]}})
    assert config.phantom == {"n_train": 3, "n_val": 2, "n_test": 2, "seed": 0, "size": [64, 64, 8]}


# ---------------------------------------------------------------- preprocessing cache

SPACING = (2.0, 2.0, 4.0)


def _synthetic_case(root: Path, case_id: str, shift: int = 0, labels_value_offset: int = 0):
    """A small CT (body ellipse with a bright 'liver' ellipsoid) and labels (the ellipsoid = label 1+offset)."""
    shape = (10, 40, 48)  # K, J, I
    k, j, i = np.meshgrid(*[np.arange(n) for n in shape], indexing="ij")
    ct = np.full(shape, -1000, np.int16)
    ct[((i - 24) / 20) ** 2 + ((j - 20) / 16) ** 2 <= 1] = 40
    organ = ((i - 16 - shift) / 6) ** 2 + ((j - 20) / 5) ** 2 + ((k - 5) / 3) ** 2 <= 1
    ct[organ] = 130
    labels = (organ * (1 + labels_value_offset)).astype(np.uint8)
    paths = []
    for array, folder, name in ((ct, "volumes", f"{case_id}_0000.nii.gz"),
                                (labels, "segmentations", f"{case_id}.nii.gz")):
        image = sitk.GetImageFromArray(array)
        image.SetSpacing(SPACING)
        image.SetOrigin((-40.0, 10.0, 100.0))
        (root / folder).mkdir(parents=True, exist_ok=True)
        sitk.WriteImage(image, str(root / folder / name))
        paths.append(root / folder / name)
    return Case(case_id, *paths)


@pytest.fixture
def dataset(tmp_path):
    root = tmp_path / "ds"
    return [_synthetic_case(root, "Case_00001"), _synthetic_case(root, "Case_00002", shift=4)]


@pytest.fixture
def count_extractions(monkeypatch):
    calls = []
    original = SCONetLib.points.extract_point_cloud

    def counting(image, *args, **kwargs):
        calls.append(image.GetSize())
        return original(image, *args, **kwargs)

    monkeypatch.setattr(SCONetLib.points, "extract_point_cloud", counting)
    return calls


def test_cache_entry_contents(dataset, tmp_path):
    result = prepare_cases(dataset[:1], tmp_path / "cache")
    assert result.skipped == [] and result.computed == 1
    folder = result.entries[0].folder
    assert sorted(p.name for p in folder.iterdir()) == ["case.json", "labels.npz", "points.npz"]
    cloud = SCONetLib.points.PointCloud.load(folder / "points.npz")
    edges = SCONetLib.points.canny_points(sitk.ReadImage(str(dataset[0].image)))
    assert len(cloud.xyz_lps) == len(edges)  # all edge points, not a subsample
    case = CaseData.load(result.entries[0], 400.0)
    truth = sitk.GetArrayFromImage(sitk.ReadImage(str(dataset[0].label)))
    np.testing.assert_array_equal(case.labels, truth)
    assert case.labels.dtype == np.uint8
    assert case.label_grid == Grid.of(sitk.ReadImage(str(dataset[0].label)))
    assert case.frame == ObjectFrame.of(Grid.of(sitk.ReadImage(str(dataset[0].image))), 400.0)


def test_cache_is_reused_and_invalidated_by_source_changes(dataset, tmp_path, count_extractions):
    cache = tmp_path / "cache"
    first = prepare_cases(dataset, cache)
    assert len(count_extractions) == 2 and first.computed == 2
    stamps = {e.case_id: (e.folder / "points.npz").stat().st_mtime_ns for e in first.entries}
    second = prepare_cases(dataset, cache)
    assert len(count_extractions) == 2 and second.computed == 0  # nothing recomputed
    assert second.entries == first.entries
    assert {e.case_id: (e.folder / "points.npz").stat().st_mtime_ns for e in second.entries} == stamps
    later = time.time() + 5
    os.utime(dataset[1].label, (later, later))  # the label file changed
    third = prepare_cases(dataset, cache)
    assert len(count_extractions) == 3 and third.computed == 1
    assert third.entries[0] == first.entries[0] and third.entries[1] != first.entries[1]
    fourth = prepare_cases(dataset, cache, label_map="1:2")  # another label map: new entries
    assert fourth.computed == 2
    assert CaseData.load(fourth.entries[0], 400.0).labels.max() == 2


@pytest.mark.filterwarnings("ignore:image intensities range")
@pytest.mark.parametrize("workers", [1, 2])
def test_broken_cases_are_skipped_and_reported(dataset, tmp_path, workers):
    root = dataset[0].image.parent.parent
    garbage = Case("Case_bad_file", _touch(root / "volumes" / "Case_bad_file_0000.nii.gz"), dataset[0].label)
    garbage.image.write_bytes(b"not a nifti file")
    small = sitk.Image(8, 8, 4, sitk.sitkInt16)
    sitk.WriteImage(small, str(root / "segmentations" / "Case_small.nii.gz"))
    mismatch = Case("Case_mismatch", dataset[0].image, root / "segmentations" / "Case_small.nii.gz")
    flat = sitk.Image(48, 40, 10, sitk.sitkInt16) - 1000
    sitk.WriteImage(flat, str(root / "volumes" / "Case_flat_0000.nii.gz"))
    no_edges = Case("Case_flat", root / "volumes" / "Case_flat_0000.nii.gz", dataset[0].label)
    missing = Case("Case_missing", root / "volumes" / "nowhere.nii.gz", dataset[0].label)
    cases = [garbage, dataset[0], mismatch, no_edges, missing, dataset[1]]
    result = prepare_cases(cases, tmp_path / "cache", workers=workers)
    assert [e.case_id for e in result.entries] == ["Case_00001", "Case_00002"]
    reasons = {s["case_id"]: s["reason"] for s in result.skipped}
    assert set(reasons) == {"Case_bad_file", "Case_mismatch", "Case_flat", "Case_missing"}
    assert "differs from label size" in reasons["Case_mismatch"]
    assert "no edges" in reasons["Case_flat"]
    assert "cannot read" in reasons["Case_missing"]
    written = result.write_skipped(tmp_path / "skipped.json")
    assert "Case_bad_file" in written.read_text(encoding="utf-8")
    assert not [p for p in (tmp_path / "cache" / "cases").iterdir() if p.name.startswith(".tmp")]


# ---------------------------------------------------------------- samples

@pytest.fixture
def case_data(dataset, tmp_path):
    result = prepare_cases(dataset[:1], tmp_path / "cache")
    return CaseData.load(result.entries[0], 400.0)


def test_queries_carry_the_label_of_their_voxel(case_data):
    rng = np.random.default_rng(0)
    queries, targets = sample_queries(case_data, 5000, rng)
    assert queries.shape == (5000, 3) and queries.dtype == np.float32 and targets.dtype == np.int64
    ijk = case_data.label_grid.lps_to_index(case_data.frame.object_to_lps(queries))
    np.testing.assert_allclose(ijk, np.round(ijk), atol=1e-3)  # voxel centres
    i, j, k = np.round(ijk).astype(int).T
    np.testing.assert_array_equal(targets, case_data.labels[k, j, i])
    organ_share = np.mean(case_data.labels > 0)
    assert abs(np.mean(targets > 0) - organ_share) < 0.03  # uniform over all voxels


def test_organ_fraction_draws_inside_the_grown_organ_box(case_data):
    queries, targets = sample_queries(case_data, 4000, np.random.default_rng(1), organ_fraction=1.0,
                                      margin_mm=4.0)
    ijk = np.round(case_data.label_grid.lps_to_index(case_data.frame.object_to_lps(queries))).astype(int)
    low, high = case_data.organ_box(4.0)
    kji = ijk[:, ::-1]
    assert np.all(kji >= low) and np.all(kji < high)
    organ = np.argwhere(case_data.labels > 0)
    np.testing.assert_array_equal(low, np.maximum(0, organ.min(0) - [1, 2, 2]))
    assert np.mean(targets > 0) > 3 * np.mean(case_data.labels > 0)


def test_input_points_are_drawn_with_replacement_from_the_cloud(case_data):
    points = sample_input_points(case_data, 3 * len(case_data.cloud.xyz_lps), np.random.default_rng(2))
    assert points.shape == (3 * len(case_data.cloud.xyz_lps), 51) and points.dtype == np.float32
    all_rows = case_data.cloud.model_input(case_data.frame)
    rows = {tuple(r) for r in all_rows}
    assert all(tuple(r) in rows for r in points[:200])
    assert len(np.unique(points, axis=0)) < len(points)  # duplicates occur


def test_augmentation_moves_points_and_queries_together(case_data):
    base = sample_training_example(case_data, 500, 600, np.random.default_rng(7), augment_sigma=0.0)
    moved = sample_training_example(case_data, 500, 600, np.random.default_rng(7), augment_sigma=0.1)
    rng = np.random.default_rng(7)
    sample_input_points(case_data, 500, rng)
    sample_queries(case_data, 600, rng)
    matrix, shift = random_linear_transform(rng, 0.1)
    np.testing.assert_allclose(moved[0][:, :3], base[0][:, :3] @ matrix + shift, atol=1e-6)
    np.testing.assert_allclose(moved[1], base[1] @ matrix + shift, atol=1e-6)
    np.testing.assert_array_equal(moved[0][:, 3:], base[0][:, 3:])  # SURF untouched
    np.testing.assert_array_equal(moved[2], base[2])


def test_random_linear_transform_statistics():
    rng = np.random.default_rng(0)
    draws = [random_linear_transform(rng, 0.1) for _ in range(2000)]
    deviations = np.array([m - np.eye(3) for m, _ in draws])
    shifts = np.array([t for _, t in draws])
    assert abs(deviations.std() - 0.1) < 0.005 and abs(deviations.mean()) < 0.005
    assert abs(shifts.std() - 0.1) < 0.005


def test_case_store_keeps_at_most_its_budget(dataset, tmp_path):
    entries = prepare_cases(dataset, tmp_path / "cache").entries
    store = CaseStore(entries, 400.0, max_mb=0)
    first = store[0]
    assert store[0] is first
    store[1]
    assert len(store._cache) == 1 and store[0] is not first  # reloaded after eviction
    assert len(store) == 2
