"""Tests of SCONetLib.io: reading CTs (files and DICOM series), atomic writes, Slicer .seg.nrrd."""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from SCONetLib import io, io_checks, labels
from SCONetLib.geometry import Grid
from SCONetLib.progress import Cancelled


def _rotation(axis, degrees):
    axis = np.asarray(axis, float) / np.linalg.norm(axis)
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    a = np.radians(degrees)
    return np.eye(3) + np.sin(a) * k + (1 - np.cos(a)) * k @ k


DIRECTIONS = {
    "identity": np.eye(3),
    "flipped_xy": np.diag([-1.0, -1.0, 1.0]),
    "flipped_z": np.diag([1.0, 1.0, -1.0]),
    "oblique": _rotation([0.3, -0.5, 1.0], 17.0) @ np.diag([-1.0, 1.0, 1.0]),
}


def _volume(direction=np.eye(3), size=(6, 5, 4), spacing=(0.7, 0.8, 2.5), origin=(12.5, -30.25, 401.0)):
    """int16 test volume (KJI values are distinct HU) with the given geometry."""
    array = (np.arange(np.prod(size)).reshape(size[::-1]) * 7 - 1000).astype(np.int16)
    grid = Grid(tuple(size), tuple(spacing), tuple(origin), tuple(np.asarray(direction, float).ravel()))
    return grid.image_from_array(array)


def _assert_same_geometry(a, b, tol=1e-5):
    assert a.GetSize() == b.GetSize()
    np.testing.assert_allclose(a.GetSpacing(), b.GetSpacing(), atol=tol)
    np.testing.assert_allclose(a.GetOrigin(), b.GetOrigin(), atol=10 * tol)
    np.testing.assert_allclose(a.GetDirection(), b.GetDirection(), atol=tol)


# --- round trips -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".nii.gz", ".nii", ".nrrd", ".mha"])
@pytest.mark.parametrize("direction", list(DIRECTIONS), ids=list(DIRECTIONS))
def test_write_read_round_trip_keeps_geometry_and_values(tmp_path, suffix, direction):
    image = _volume(DIRECTIONS[direction])
    path = io.write_image(image, tmp_path / f"ct{suffix}")
    assert path == tmp_path / f"ct{suffix}" and path.is_file()
    back = io.read_image(path)
    _assert_same_geometry(back, image)
    assert back.GetPixelID() == sitk.sitkInt16
    np.testing.assert_array_equal(sitk.GetArrayViewFromImage(back), sitk.GetArrayViewFromImage(image))
    assert [p.name for p in tmp_path.iterdir()] == [f"ct{suffix}"]  # no temporary file left


@pytest.mark.parametrize("suffix", [".nhdr", ".mhd"])
def test_read_detached_header_formats(tmp_path, suffix):
    image = _volume(DIRECTIONS["oblique"])
    sitk.WriteImage(image, str(tmp_path / f"ct{suffix}"))
    back = io.read_image(tmp_path / f"ct{suffix}")
    _assert_same_geometry(back, image)
    np.testing.assert_array_equal(sitk.GetArrayViewFromImage(back), sitk.GetArrayViewFromImage(image))


def test_write_image_compresses_and_creates_parent_folders(tmp_path):
    image = Grid((40, 40, 40), (1.0, 1.0, 1.0), (0.0, 0.0, 0.0), tuple(np.eye(3).ravel())).image_from_array(
        np.zeros((40, 40, 40), np.int16))
    path = io.write_image(image, tmp_path / "a" / "b" / "zeros.nrrd")
    assert path.is_file()
    assert path.stat().st_size < 40 ** 3  # 128 kB raw; gzip makes it tiny
    assert b"encoding: gzip" in path.read_bytes()[:400]


# --- DICOM series ------------------------------------------------------------------------------------------------

STUDY_UID = "1.2.826.0.1.3680043.9.7433.1.1"


def _write_dicom_series(folder: Path, hu_kji: np.ndarray, spacing, origin, direction, series_uid: str, first=1):
    """One CT slice file per k with position, orientation, spacing, series UID and rescale tags."""
    folder.mkdir(parents=True, exist_ok=True)
    direction = np.asarray(direction, float)
    orientation = "\\".join(f"{v:.8f}" for v in np.concatenate([direction[:, 0], direction[:, 1]]))
    for k, plane in enumerate(hu_kji):
        slice_image = sitk.GetImageFromArray(plane.astype(np.int16))
        slice_image.SetSpacing((spacing[0], spacing[1]))  # the writer takes pixel spacing from the image
        position = np.asarray(origin) + direction[:, 2] * spacing[2] * k
        tags = {
            "0008|0016": "1.2.840.10008.5.1.4.1.1.2", "0008|0018": f"{series_uid}.{k + 1}", "0008|0060": "CT",
            "0020|000d": STUDY_UID, "0020|000e": series_uid, "0020|0013": str(first + k),
            "0020|0032": "\\".join(f"{v:.6f}" for v in position), "0020|0037": orientation,
            "0028|0030": f"{spacing[1]}\\{spacing[0]}", "0018|0050": str(spacing[2]),
            "0028|1052": "-1024", "0028|1053": "1",
        }
        for key, value in tags.items():
            slice_image.SetMetaData(key, value)
        writer = sitk.ImageFileWriter()
        writer.KeepOriginalImageUIDOn()
        writer.SetFileName(str(folder / f"{series_uid[-3:]}_{k:03d}.dcm"))
        writer.Execute(slice_image)


@pytest.mark.parametrize("direction", ["identity", "flipped_xy", "oblique_right_handed"])
def test_read_dicom_series_geometry_and_hu(tmp_path, direction):
    matrix = {"identity": np.eye(3), "flipped_xy": np.diag([-1.0, -1.0, 1.0]),
              "oblique_right_handed": _rotation([1.0, 0.2, 0.1], 8.0)}[direction]
    spacing, origin = (0.7, 0.8, 2.5), (10.0, -20.0, 300.0)
    hu = (np.arange(4 * 5 * 6).reshape(4, 5, 6) * 10 - 1000).astype(np.int16)
    _write_dicom_series(tmp_path / "series", hu, spacing, origin, matrix, "1.2.826.0.1.3680043.9.7433.2.101")
    image = io.read_image(tmp_path / "series")
    assert image.GetSize() == (6, 5, 4)
    np.testing.assert_allclose(image.GetSpacing(), spacing, atol=1e-4)
    np.testing.assert_allclose(image.GetOrigin(), origin, atol=1e-4)
    np.testing.assert_allclose(np.reshape(image.GetDirection(), (3, 3)), matrix, atol=1e-5)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(image), hu)  # rescaled back to HU


def test_dicom_folder_with_two_series_names_them(tmp_path):
    hu = np.zeros((3, 4, 4), np.int16)
    first, second = "1.2.826.0.1.3680043.9.7433.2.201", "1.2.826.0.1.3680043.9.7433.2.202"
    _write_dicom_series(tmp_path, hu, (1.0, 1.0, 1.0), (0, 0, 0), np.eye(3), first)
    _write_dicom_series(tmp_path, hu[:2], (1.0, 1.0, 2.0), (0, 0, 50), np.eye(3), second)
    with pytest.raises(ValueError, match="holds 2 DICOM series") as error:
        io.read_image(tmp_path)
    message = str(error.value)
    assert f"{first} (3 files)" in message and f"{second} (2 files)" in message
    assert "pass the folder of one series" in message


@pytest.mark.parametrize("content", [[], ["notes.txt"]], ids=["empty", "no_dicom"])
def test_folder_without_dicom_series(tmp_path, content):
    for name in content:
        (tmp_path / name).write_text("not an image")
    with pytest.raises(ValueError, match=rf"no DICOM series found in folder .*\({len(content)} files\)"):
        io.read_image(tmp_path)


# --- read errors -------------------------------------------------------------------------------------------------


def test_missing_path(tmp_path):
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "nope.nii.gz"))):
        io.read_image(tmp_path / "nope.nii.gz")


@pytest.mark.parametrize("name", ["broken.nii.gz", "broken.nrrd", "broken.mha", "scan.txt"])
def test_unreadable_file_names_file_and_reason(tmp_path, name):
    (tmp_path / name).write_bytes(b"\x00garbage, not an image\n" * 10)
    with pytest.raises(ValueError, match=rf"cannot read image file .*{re.escape(name)}.*: .+; expected NIfTI") as error:
        io.read_image(tmp_path / name)
    assert "Exception thrown" not in str(error.value) and "\n" not in str(error.value)


@pytest.mark.parametrize("suffix", [".nii.gz", ".nrrd", ".mha"])
def test_truncated_file_is_reported(tmp_path, suffix):
    """ITK's NIfTI reader silently zero-fills a truncated .nii.gz; read_image must not."""
    io.write_image(_volume(size=(40, 40, 40)), tmp_path / f"full{suffix}")
    data = (tmp_path / f"full{suffix}").read_bytes()
    (tmp_path / f"cut{suffix}").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=f"cannot read image file .*cut{re.escape(suffix)}"):
        io.read_image(tmp_path / f"cut{suffix}")


def test_corrupt_gzip_nifti_is_reported(tmp_path):
    io.write_image(_volume(size=(40, 40, 40)), tmp_path / "ct.nii.gz")
    data = bytearray((tmp_path / "ct.nii.gz").read_bytes())
    data[-8:-4] = bytes(4 * [0x5A])  # damage the CRC of the gzip trailer
    (tmp_path / "ct.nii.gz").write_bytes(bytes(data))
    with pytest.raises(ValueError, match="cannot read image file .*ct.nii.gz"):
        io.read_image(tmp_path / "ct.nii.gz")
    with pytest.raises(ValueError, match="cannot read image file .*ct.nii.gz.*: corrupt gzip data"):
        io_checks.check_nifti(tmp_path / "ct.nii.gz")  # the check behind read_image, in case ITK misses it


def test_single_dicom_file_hint(tmp_path):
    _write_dicom_series(tmp_path, np.zeros((1, 4, 4), np.int16), (1.0, 1.0, 1.0), (0, 0, 0), np.eye(3),
                        "1.2.826.0.1.3680043.9.7433.2.301")
    (path,) = tmp_path.glob("*.dcm")
    with pytest.raises(ValueError, match=r"(single slice|2D image).*\(for a DICOM series, pass the folder"):
        io.read_image(path)


@pytest.mark.parametrize("make, expected", [
    (lambda: sitk.Image([5, 6], sitk.sitkInt16), r"is a 2D image \(size \(5, 6\)\); a 3D scalar CT volume is expected"),
    (lambda: sitk.Image([5, 6, 4, 3], sitk.sitkInt16), r"is a 4D image \(size \(5, 6, 4, 3\)\); a 3D scalar CT"),
    (lambda: sitk.Image([5, 6, 4], sitk.sitkVectorInt16, 3), r"has 3 components per voxel .*3D scalar CT"),
    (lambda: sitk.Image([5, 6, 1], sitk.sitkInt16), r"is a single slice \(size \(5, 6, 1\)\)"),
], ids=["2d", "4d", "vector", "single_slice"])
def test_not_a_3d_scalar_volume(tmp_path, make, expected):
    path = tmp_path / "bad.nrrd"
    sitk.WriteImage(make(), str(path))
    with pytest.raises(ValueError, match=expected):
        io.read_image(path)


def test_4d_with_one_time_point_becomes_3d(tmp_path):
    volume = sitk.JoinSeries([sitk.GetImageFromArray(np.arange(4 * 5 * 6, dtype=np.int16).reshape(4, 5, 6))])
    volume.SetSpacing((0.5, 0.6, 2.0, 1.0))
    volume.SetOrigin((1.0, 2.0, 3.0, 0.0))
    assert volume.GetDimension() == 4 and volume.GetSize() == (6, 5, 4, 1)
    sitk.WriteImage(volume, str(tmp_path / "t1.nii.gz"))
    image = io.read_image(tmp_path / "t1.nii.gz")
    assert image.GetDimension() == 3 and image.GetSize() == (6, 5, 4)
    np.testing.assert_allclose(image.GetSpacing(), (0.5, 0.6, 2.0), atol=1e-6)
    np.testing.assert_allclose(image.GetOrigin(), (1.0, 2.0, 3.0), atol=1e-6)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(image).ravel(), np.arange(120))


# --- atomic writes -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["ct.png", "ct.mhd", "ct.nhdr", "ct", ".nii.gz", "ct.nii.gz.bak"])
def test_write_image_refuses_unknown_suffix(tmp_path, name):
    with pytest.raises(ValueError, match=r"unsupported file name suffix; expected one of \['.nii.gz', '.nii', "):
        io.write_image(_volume(), tmp_path / name)
    assert list(tmp_path.iterdir()) == []


def test_write_into_a_file_instead_of_a_folder(tmp_path):
    (tmp_path / "taken").write_text("a file, not a folder")
    with pytest.raises(OSError):
        io.write_image(_volume(), tmp_path / "taken" / "ct.nii.gz")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken"]


def test_write_image_rejects_non_images(tmp_path):
    with pytest.raises(TypeError, match="image must be a SimpleITK.Image, got ndarray"):
        io.write_image(np.zeros((3, 3, 3)), tmp_path / "a.nii.gz")


@pytest.mark.parametrize("failure, expected", [(RuntimeError("ITK ERROR: disk full"), OSError),
                                               (Cancelled("user cancelled"), Cancelled)], ids=["itk_error", "cancel"])
def test_failed_write_leaves_nothing_and_keeps_old_file(tmp_path, monkeypatch, failure, expected):
    target = tmp_path / "ct.nii.gz"
    io.write_image(_volume(), target)
    before = target.read_bytes()
    written = []

    def half_write(image, name, *args):
        Path(name).write_bytes(b"partial")
        written.append(Path(name))
        raise failure

    monkeypatch.setattr(sitk, "WriteImage", half_write)
    match = f"cannot write '{target}': disk full" if expected is OSError else "user cancelled"
    with pytest.raises(expected, match=re.escape(match)):
        io.write_image(_volume(DIRECTIONS["oblique"]), target)
    with pytest.raises(expected):
        io.write_segmentation(_volume(size=(3, 3, 3)) * 0, tmp_path / "new.seg.nrrd")
    assert len(written) == 2 and all(p.parent == tmp_path and p.name.startswith(".") for p in written)
    assert written[0].name.endswith(".nii.gz") and written[1].name.endswith(".nrrd")  # same suffix as the target
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ct.nii.gz"]
    assert target.read_bytes() == before


# --- Slicer segmentation -----------------------------------------------------------------------------------------


def _header(path: Path) -> str:
    data = path.read_bytes()
    return data[: data.index(b"\n\n")].decode("ascii")


def _fields(header: str) -> dict:
    return dict(line.split(":=", 1) for line in header.splitlines() if ":=" in line)


@pytest.fixture()
def label_map():
    """uint8 labels on an oblique, flipped grid holding liver (1) and spleen (3) only."""
    image = _volume(DIRECTIONS["oblique"], size=(7, 6, 5), spacing=(0.8, 0.9, 3.0), origin=(-50.0, 20.0, -100.0))
    array = np.zeros((5, 6, 7), np.uint8)
    array[1:3, 2:4, 1:5] = 1
    array[3, 4, 6] = 3
    return Grid.of(image).image_from_array(array)


def test_segmentation_geometry_and_voxels_round_trip(tmp_path, label_map):
    path = io.write_segmentation(label_map, tmp_path / "organs.seg.nrrd")
    back = sitk.ReadImage(str(path))
    _assert_same_geometry(back, label_map, tol=1e-9)
    assert back.GetPixelID() == sitk.sitkUInt8
    np.testing.assert_array_equal(sitk.GetArrayViewFromImage(back), sitk.GetArrayViewFromImage(label_map))
    header = _header(path)
    assert "\nspace: left-posterior-superior\n" in header
    assert "\ndimension: 3\n" in header and "\ntype: unsigned char\n" in header
    assert "\nencoding: gzip\n" in header
    directions = re.search(r"^space directions: (.*)$", header, re.M).group(1)
    vectors = np.array([[float(v) for v in group.split(",")] for group in re.findall(r"\(([^)]*)\)", directions)])
    np.testing.assert_allclose(vectors.T, Grid.of(label_map).ijk_to_lps[:3, :3], atol=1e-12)
    origin = re.search(r"^space origin: \((.*)\)$", header, re.M).group(1)
    np.testing.assert_allclose([float(v) for v in origin.split(",")], label_map.GetOrigin(), atol=1e-12)


def test_segmentation_fields_describe_every_organ(tmp_path, label_map):
    fields = _fields(_header(io.write_segmentation(label_map, tmp_path / "organs.seg.nrrd")))
    assert fields["Segmentation_MasterRepresentation"] == "Binary labelmap"
    assert fields["Segmentation_ContainedRepresentationNames"] == "Binary labelmap|"
    assert fields["Segmentation_ReferenceImageExtentOffset"] == "0 0 0"
    for index, organ in enumerate(labels.ORGANS):  # kidneys (2) and pancreas (4) are absent but still written
        segment = {key.split("_", 1)[1]: value for key, value in fields.items()
                   if key.startswith(f"Segment{index}_")}
        assert segment["ID"] == organ.name
        assert segment["Name"] == organ.display_name
        np.testing.assert_allclose([float(v) for v in segment["Color"].split()], np.array(organ.color) / 255,
                                   atol=1e-6)
        assert segment["LabelValue"] == str(organ.label)
        assert segment["Layer"] == "0"
        assert segment["Extent"] == "0 6 0 5 0 4"
        assert segment["NameAutoGenerated"] == "0" and segment["ColorAutoGenerated"] == "0"
        assert segment["Tags"] == f"TerminologyEntry:{io.terminology_entry(organ)}|"
    assert not any(key.startswith("Segment4_") for key in fields)


def test_reference_image_geometry_is_ijk_to_ras(tmp_path, label_map):
    fields = _fields(_header(io.write_segmentation(label_map, tmp_path / "organs.seg.nrrd")))
    match = re.fullmatch(r"Reference image geometry\|([^|]*)\|[^|&]+&", fields["Segmentation_ConversionParameters"])
    numbers = [float(v) for v in match.group(1).strip(";").split(";")]
    assert len(numbers) == 22
    np.testing.assert_allclose(np.reshape(numbers[:16], (4, 4)), Grid.of(label_map).ijk_to_ras, atol=1e-12)
    assert numbers[16:] == [0, 6, 0, 5, 0, 4]


@pytest.mark.parametrize("name, expected", [
    ("liver", "Segmentation category and type - DICOM master list~SCT^123037004^Anatomical Structure~"
              "SCT^10200004^Liver~^^~Anatomic codes - DICOM master list~^^~^^"),
    ("kidneys", "Segmentation category and type - DICOM master list~SCT^123037004^Anatomical Structure~"
                "SCT^64033007^Kidney~SCT^51440002^Right and left~Anatomic codes - DICOM master list~^^~^^"),
])
def test_terminology_entry(name, expected):
    assert io.terminology_entry(labels.organ_by_name(name)) == expected


def test_segmentation_with_an_organ_subset(tmp_path, label_map):
    subset = [labels.organ_by_name("spleen"), labels.organ_by_name("liver")]
    fields = _fields(_header(io.write_segmentation(label_map, tmp_path / "two.seg.nrrd", organs=subset)))
    assert (fields["Segment0_ID"], fields["Segment0_LabelValue"]) == ("spleen", "3")
    assert (fields["Segment1_ID"], fields["Segment1_LabelValue"]) == ("liver", "1")
    assert "Segment2_ID" not in fields


@pytest.mark.parametrize("make, name, error, expected", [
    (lambda m: m, "organs.nrrd", ValueError, r"must end in '.seg.nrrd'"),
    (lambda m: sitk.Cast(m, sitk.sitkFloat32), "a.seg.nrrd", ValueError, "must have an integer pixel type"),
    (lambda m: sitk.Image([4, 4], sitk.sitkUInt8), "a.seg.nrrd", ValueError, "must be a 3D scalar label map"),
    (lambda m: m + 5, "a.seg.nrrd", ValueError, r"holds values \[5, 6, 8\] that are not 0 or the label of an organ"),
    (lambda m: sitk.Cast(m, sitk.sitkInt16) * 100, "a.seg.nrrd", ValueError, r"must lie in 0..255 .* to 300"),
    (lambda m: sitk.GetArrayFromImage(m), "a.seg.nrrd", TypeError, "labels must be a SimpleITK.Image"),
], ids=["suffix", "float", "2d", "unknown_labels", "out_of_range", "array"])
def test_segmentation_input_errors(tmp_path, label_map, make, name, error, expected):
    with pytest.raises(error, match=expected):
        io.write_segmentation(make(label_map), tmp_path / name)
    assert list(tmp_path.iterdir()) == []


def test_phantom_labels_as_segmentation(tmp_path, small_phantom_oblique):
    _, organ_labels = small_phantom_oblique
    path = io.write_segmentation(organ_labels, tmp_path / "phantom.seg.nrrd")
    back = sitk.ReadImage(str(path))
    _assert_same_geometry(back, organ_labels, tol=1e-9)
    np.testing.assert_array_equal(sitk.GetArrayViewFromImage(back), sitk.GetArrayViewFromImage(organ_labels))


def test_atomic_output_replaces_only_on_success_and_partial_files_can_be_swept(tmp_path):
    target = tmp_path / "result.txt"
    io.write_text("first\n", target)
    with pytest.raises(RuntimeError, match="boom"):
        with io.atomic_output(target, ".txt") as tmp:
            tmp.write_text("half")
            raise RuntimeError("boom")
    assert target.read_text(encoding="utf-8") == "first\n" and sorted(p.name for p in tmp_path.iterdir()) == ["result.txt"]
    # A killed writer leaves its temporary behind: remove_partial_outputs sweeps exactly those.
    leftover = tmp_path / ".result.txt.tmp-0123abcd.txt"
    leftover.write_text("half")
    (tmp_path / ".hidden-but-ours-not").write_text("keep")
    assert io.remove_partial_outputs(tmp_path) == [leftover]
    assert sorted(p.name for p in tmp_path.iterdir()) == [".hidden-but-ours-not", "result.txt"]
    assert io.remove_partial_outputs(tmp_path / "missing") == []


def test_write_csv_uses_every_key_in_order(tmp_path):
    path = io.write_csv([{"a": 1, "b": 2}, {"b": 3, "c": 4}], tmp_path / "rows.csv")
    assert path.read_text(encoding="utf-8").splitlines() == ["a,b,c", "1,2,", ",3,4"]
