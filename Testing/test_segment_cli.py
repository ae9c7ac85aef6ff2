"""sconet-segment (SCONetLib.cli, SCONetLib.segment) and the demo (SCONetLib.demo): files in, files out, errors,
cancellation.

A seeded random SCONet saved as a tiny checkpoint (``tiny_weights``, conftest) stands in for the bundled model;
clouds have 300 points so each run takes a second or two.
"""
import json
import re
import subprocess
import sys
import time
from io import StringIO

import numpy as np
import pytest
import SimpleITK as sitk

from SCONetLib import demo as demo_module
import SCONetLib.checkpoint as checkpoint_module
from SCONetLib.cli import ProgressBar, segment_main as main
from SCONetLib.demo import run_demo
from SCONetLib.figures import demo_figure, save_png
from SCONetLib.geometry import Grid
from SCONetLib.io import read_image
from SCONetLib.phantom import make_phantom
from SCONetLib.progress import Cancelled
from SCONetLib.segment import segment_file

POINTS = ["--points", "300", "--device", "cpu"]


@pytest.fixture(scope="module")
def ct():
    image, _ = make_phantom(5, size=(64, 64, 20), spacing=(5.0, 5.0, 8.0), random_orientation=True)
    return image


@pytest.fixture
def ct_file(tmp_path, ct):
    path = tmp_path / "case.nii.gz"
    sitk.WriteImage(ct, str(path))
    return path


def _files(folder):
    return sorted(p.name for p in folder.rglob("*") if p.is_file())


def _write_dicom_series(image, folder):
    """Write ``image`` (int16, any direction) as a CT DICOM series, one file per slice."""
    folder.mkdir()
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    direction = image.GetDirection()
    stamp = time.strftime("%Y%m%d")
    series_uid = "1.2.826.0.1.3680043.2.1125.1" + stamp
    for k in range(image.GetDepth()):
        slice_k = image[:, :, k]
        for tag, value in [("0008|0060", "CT"), ("0008|0020", stamp), ("0020|000d", series_uid + ".1"),
                           ("0020|000e", series_uid + ".2"), ("0010|0010", "Phantom^Test"),
                           ("0020|0037", "\\".join(f"{d:.10f}" for d in (direction[0], direction[3], direction[6],
                                                                           direction[1], direction[4], direction[7]))),
                           ("0020|0032", "\\".join(f"{p:.6f}" for p in image.TransformIndexToPhysicalPoint((0, 0, k)))),
                           ("0020|0013", str(k + 1)), ("0018|0050", f"{image.GetSpacing()[2]:.6f}"),
                           ("0028|1052", "0"), ("0028|1053", "1")]:
            slice_k.SetMetaData(tag, value)
        writer.SetFileName(str(folder / f"slice{k:03d}.dcm"))
        writer.Execute(slice_k)


# ---------------------------------------------------------------------------------------------- outputs


def test_nifti_input_default_output_and_sidecar(ct_file, ct, tiny_weights, capsys):
    assert main([str(ct_file), "--weights", str(tiny_weights), *POINTS]) == 0
    out = ct_file.with_name("case_sconet.nii.gz")
    labels = sitk.ReadImage(str(out))
    assert labels.GetPixelID() == sitk.sitkUInt8
    assert labels.GetSize() == ct.GetSize()
    np.testing.assert_allclose(labels.GetSpacing(), ct.GetSpacing(), atol=1e-6)
    np.testing.assert_allclose(labels.GetOrigin(), ct.GetOrigin(), atol=1e-4)
    np.testing.assert_allclose(labels.GetDirection(), ct.GetDirection(), atol=1e-6)
    assert sitk.GetArrayViewFromImage(labels).max() <= 4
    sidecar = json.loads(out.with_name("case_sconet.nii.gz.json").read_text(encoding="utf-8"))
    assert sidecar["arguments"]["points"] == 300 and sidecar["arguments"]["input"] == str(ct_file)
    assert sidecar["model"]["metadata"]["note"] == "test"
    assert sidecar["model"]["config"]["grid_resolution"] == 32
    assert sidecar["output"]["grid"]["size"] == list(ct.GetSize())
    assert set(sidecar["volumes_ml"]) == {"liver", "kidneys", "spleen", "pancreas"}
    assert {"prepare", "segment", "write", "total"} <= set(sidecar["timings_s"])
    voxel_ml = np.prod(ct.GetSpacing()) / 1000.0
    counts = np.bincount(sitk.GetArrayViewFromImage(labels).ravel(), minlength=5)
    assert sidecar["volumes_ml"]["liver"] == pytest.approx(counts[1] * voxel_ml, abs=1e-3)
    printed = capsys.readouterr().out
    assert "Liver" in printed and "mL" in printed and "total" in printed
    assert _files(ct_file.parent) == ["case.nii.gz", "case_sconet.nii.gz", "case_sconet.nii.gz.json"]


def test_nrrd_input_with_spacing(tmp_path, ct, tiny_weights):
    source = tmp_path / "scan.nrrd"
    sitk.WriteImage(ct, str(source))
    out = tmp_path / "result" / "labels.nrrd"
    assert main([str(source), "-o", str(out), "--spacing", "6", "7", "9", "--weights", str(tiny_weights), *POINTS]) == 0
    labels = sitk.ReadImage(str(out))
    expected = Grid.of(read_image(source)).with_spacing((6.0, 7.0, 9.0))
    assert labels.GetSize() == expected.size
    np.testing.assert_allclose(labels.GetOrigin(), expected.origin, atol=1e-4)
    np.testing.assert_allclose(labels.GetDirection(), expected.direction, atol=1e-6)


def test_dicom_folder_writes_into_the_current_folder(tmp_path, ct, tiny_weights, monkeypatch):
    series = tmp_path / "series01"
    _write_dicom_series(sitk.Cast(ct, sitk.sitkInt16), series)
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    assert main([str(series), "--weights", str(tiny_weights), *POINTS]) == 0
    assert _files(work) == ["series01_sconet.nii.gz", "series01_sconet.nii.gz.json"]
    labels = sitk.ReadImage(str(work / "series01_sconet.nii.gz"))
    source = read_image(series)
    assert labels.GetSize() == source.GetSize()
    np.testing.assert_allclose(labels.GetOrigin(), source.GetOrigin(), atol=1e-4)
    np.testing.assert_allclose(labels.GetDirection(), source.GetDirection(), atol=1e-5)
    assert len(_files(series)) == ct.GetDepth()                     # the series is untouched


def test_seg_nrrd_output(ct_file, tiny_weights):
    out = ct_file.with_name("organs.seg.nrrd")
    assert main([str(ct_file), "-o", str(out), "--weights", str(tiny_weights), *POINTS]) == 0
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(out))
    reader.ReadImageInformation()
    names = {reader.GetMetaData(f"Segment{i}_Name") for i in range(4)}
    assert names == {"Liver", "Kidneys", "Spleen", "Pancreas"}
    assert (ct_file.parent / "organs.seg.nrrd.json").is_file()


def test_probability_maps(ct_file, tiny_weights, tmp_path):
    maps = tmp_path / "maps"
    assert main([str(ct_file), "--probabilities", str(maps), "--spacing", "10", "--weights", str(tiny_weights),
                 *POINTS]) == 0
    assert _files(maps) == sorted([f"case_sconet_probability_{o}.nii.gz" for o in
                                   ("liver", "kidneys", "spleen", "pancreas")] + ["case_sconet_entropy.nii.gz"])
    total = 0.0
    for name in _files(maps):
        image = sitk.ReadImage(str(maps / name))
        assert image.GetPixelID() == sitk.sitkFloat32
        values = sitk.GetArrayFromImage(image)
        assert values.min() >= 0.0 and values.max() <= 1.0 + 1e-6
        if "probability" in name:
            total += values
    labels = sitk.GetArrayFromImage(sitk.ReadImage(str(ct_file.with_name("case_sconet.nii.gz"))))
    assert np.all(total <= 1.0 + 1e-5)             # organ probabilities leave the rest to background
    assert labels.shape == total.shape


def test_segment_file_returns_labels_and_files(ct, tiny_weights, tmp_path):
    result = segment_file(ct, tmp_path / "x.mha", weights=tiny_weights, device="cpu", n_points=300)
    assert Grid.of(result.labels) == Grid.of(ct)
    assert result.files == [tmp_path / "x.mha", tmp_path / "x.mha.json"]
    sidecar = json.loads((tmp_path / "x.mha.json").read_text(encoding="utf-8"))
    assert sidecar["volumes_ml"] == result.volumes_ml and "dice" not in sidecar


# ---------------------------------------------------------------------------------------------- errors


@pytest.mark.parametrize("make_args, message", [
    (lambda d, w: [str(d / "missing.nii.gz"), "--weights", w], "input does not exist"),
    (lambda d, w: [str(d / "case.nii.gz"), "-o", str(d / "out.png"), "--weights", w], "unsupported output file"),
    (lambda d, w: [str(d / "case.nii.gz"), "-o", str(d / "case.nii.gz"), "--weights", w], "overwrite the input"),
    (lambda d, w: [str(d / "case.nii.gz"), "-o", str(d / "." / "case.nii.gz"), "--weights", w],
     "overwrite the input"),
    (lambda d, w: [str(d / "case.nii.gz"), "--weights", str(d / "none.pt")], "not found"),
    (lambda d, w: [str(d / "case.nii.gz"), "--weights", str(d / "case.nii.gz")], "SCONet checkpoint|corrupt"),
    (lambda d, w: [str(d / "case.nii.gz"), "--spacing", "0", "--weights", w], "positive finite"),
    (lambda d, w: [str(d / "case.nii.gz"), "--spacing", "1e-4", "--weights", w], "would be .* voxels"),
    (lambda d, w: [str(d / "case.nii.gz"), "--device", "gpu", "--weights", w], "device must be"),
])
def test_errors_write_nothing(ct_file, tiny_weights, capsys, make_args, message):
    before = _files(ct_file.parent)
    assert main([*make_args(ct_file.parent, str(tiny_weights)), "--points", "300"]) == 1
    err = capsys.readouterr().err
    assert "error:" in err
    assert re.search(message, err), err
    assert _files(ct_file.parent) == before


def test_nan_input_writes_nothing(tmp_path, tiny_weights, capsys):
    array = np.full((12, 32, 32), -1000.0, np.float32)
    array[6, 10:20, 10:20] = np.nan
    path = tmp_path / "nan.nrrd"                     # (ITK reads NaN in NIfTI files as 0)
    sitk.WriteImage(sitk.GetImageFromArray(array), str(path))
    assert main([str(path), "--weights", str(tiny_weights), *POINTS]) == 1
    assert "NaN" in capsys.readouterr().err
    assert _files(tmp_path) == ["nan.nrrd"]


@pytest.mark.parametrize("argv", [["x.nii.gz", "--spacing", "1", "2"], ["--spacing", "2"],
                                  ["--probabilities", "maps"]])
def test_usage_errors(argv):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2


def test_wide_field_of_view_warns_and_records_it(tmp_path, tiny_weights, capsys):
    wide, _ = make_phantom(5, size=(64, 64, 12), spacing=(9.0, 9.0, 10.0), random_orientation=False)
    path = tmp_path / "wide.nii.gz"
    sitk.WriteImage(wide, str(path))
    with pytest.warns(UserWarning, match="exceeds the model's box"):
        result = segment_file(path, weights=tiny_weights, device="cpu", n_points=300)
    assert any("exceeds the model's box" in message for message in result.sidecar["warnings"])
    assert result.sidecar["points"]["fraction_volume_outside_model_box"] > 0.2


# ---------------------------------------------------------------------------------------------- cancellation


@pytest.mark.parametrize("cancel_at", [0.05, 0.7, 0.9])
def test_cancellation_leaves_no_file(ct_file, tiny_weights, cancel_at):
    before = _files(ct_file.parent)

    def progress(fraction, message):
        if fraction >= cancel_at:
            raise Cancelled()
    with pytest.raises(Cancelled):
        segment_file(ct_file, weights=tiny_weights, device="cpu", n_points=300, probabilities_dir=ct_file.parent / "p",
                     progress=progress)
    assert _files(ct_file.parent) == before


# ---------------------------------------------------------------------------------------------- demo


def test_demo_from_the_command_line(tmp_path, tiny_weights, monkeypatch, capsys):
    monkeypatch.setattr(demo_module, "DEMO_SIZE", (64, 64, 24))
    out = tmp_path / "demo"
    assert main(["--demo", "-o", str(out), "--weights", str(tiny_weights), *POINTS]) == 0
    assert _files(out) == ["phantom_ct.nii.gz", "phantom_sconet.nii.gz", "phantom_sconet.nii.gz.json",
                           "phantom_sconet.png", "phantom_truth.nii.gz"]
    sidecar = json.loads((out / "phantom_sconet.nii.gz.json").read_text(encoding="utf-8"))
    assert sidecar["arguments"]["demo"] is True and set(sidecar["dice"]) == {"liver", "kidneys", "spleen",
                                                                             "pancreas"}
    figure = sitk.ReadImage(str(out / "phantom_sconet.png"))
    assert figure.GetNumberOfComponentsPerPixel() in (3, 4) and min(figure.GetSize()) > 100
    printed = capsys.readouterr().out
    assert "Dice" in printed and "phantom_sconet.png" in printed


def test_demo_without_bundled_weights_is_a_clear_error(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(checkpoint_module, "DEFAULT_WEIGHTS_NAME", "missing.pt")
    assert main(["--demo", "-o", str(tmp_path / "demo")]) == 1
    assert "default SCONet weights are missing" in capsys.readouterr().err
    assert not (tmp_path / "demo").exists()


def _figure_pixels(figure, path):
    return sitk.GetArrayFromImage(sitk.ReadImage(str(save_png(figure, path))))


def test_figure_colours_organs_where_the_labels_are(tmp_path):
    ct, truth = make_phantom(5, size=(64, 64, 24), spacing=(5.0, 5.0, 8.0), random_orientation=True)
    empty = sitk.Image(truth.GetSize(), sitk.sitkUInt8)
    empty.CopyInformation(truth)
    with_organs = _figure_pixels(demo_figure(ct, truth), tmp_path / "organs.png")
    without = _figure_pixels(demo_figure(ct, empty), tmp_path / "empty.png")
    assert with_organs.dtype == np.uint8 and with_organs.ndim == 3 and with_organs.shape[2] in (3, 4)
    liver = np.array([221, 130, 101], np.uint8)                     # outlines are drawn in the organ colour

    def liver_pixels(rgb):
        return int(np.all(np.abs(rgb[..., :3].astype(int) - liver) <= 2, axis=2).sum())
    assert liver_pixels(with_organs) > 5 * liver_pixels(without) + 50   # the legend swatch is in both
    gray = np.ptp(without[..., :3].astype(int), axis=2) <= 2
    assert gray.mean() > 0.95                                        # only the legend swatches are coloured


def test_run_demo_returns_paths(tmp_path, tiny_weights):
    result = run_demo(tmp_path / "d", weights=tiny_weights, device="cpu", size=(48, 48, 16), n_points=300)
    assert result.figure.is_file() and result.ct.is_file() and result.truth.is_file()
    truth = read_image(result.truth)
    assert truth.GetSize() == result.result.labels.GetSize() == (48, 48, 16)
    np.testing.assert_allclose(truth.GetOrigin(), result.result.labels.GetOrigin(), atol=1e-4)
    assert result.dice.keys() == {"liver", "kidneys", "spleen", "pancreas"}
    sidecar = json.loads(result.result.plan.sidecar.read_text(encoding="utf-8"))
    assert sidecar["dice"] == result.dice and sidecar["arguments"]["demo"] is True


# ---------------------------------------------------------------------------------------------- wiring


def test_progress_bar_draws_on_its_stream():
    stream = StringIO()
    bar = ProgressBar(stream)
    bar(0.5, "decoding")
    bar.close()
    assert stream.getvalue().startswith("\r[" + "#" * 15 + " " * 15 + "]  50% decoding")
    assert stream.getvalue().endswith("\n")


def test_module_entry_point(tmp_path):
    done = subprocess.run([sys.executable, "-m", "SCONetLib", str(tmp_path / "absent.nii.gz")],
                          capture_output=True, encoding="utf-8", timeout=120)
    assert done.returncode == 1
    assert "sconet-segment: error: input does not exist" in done.stderr


def test_postprocessing_is_on_by_default_and_can_be_switched_off(ct_file, tiny_weights):
    """The default output keeps each organ's largest components; --no-postprocess gives the raw argmax."""
    from SCONetLib.postprocess import keep_largest_components

    assert main([str(ct_file), "-o", str(ct_file.parent / "raw.nii.gz"), "--no-postprocess", "--weights",
                 str(tiny_weights), *POINTS]) == 0
    assert main([str(ct_file), "-o", str(ct_file.parent / "post.nii.gz"), "--weights", str(tiny_weights), *POINTS]) == 0
    raw, post = (sitk.ReadImage(str(ct_file.parent / name)) for name in ("raw.nii.gz", "post.nii.gz"))
    np.testing.assert_array_equal(sitk.GetArrayViewFromImage(post),
                                  sitk.GetArrayFromImage(keep_largest_components(raw)))
    sidecars = [json.loads((ct_file.parent / f"{name}.nii.gz.json").read_text(encoding="utf-8"))
                for name in ("raw", "post")]
    assert [s["arguments"]["postprocess"] for s in sidecars] == [False, True]
