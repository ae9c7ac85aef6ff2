"""The adversarial input table: every case that once gave exit 0 with a silently wrong result, or lost data.

Rows D1–D9 and the minor items of the hardening issue, each reproduced: the exact clear error (or the warning
carried into the sidecar), and no earlier output lost. A seeded random SCONet in a tiny checkpoint stands in for
the bundled model; clouds have 300 points, so each run takes a second or two.
"""
import gzip
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from SCONetLib import infer
from SCONetLib import io as sconet_io
from SCONetLib.cli import segment_main as main
from SCONetLib.geometry import Grid
from SCONetLib.infer import Segmenter
from SCONetLib.io import read_image
from SCONetLib.phantom import make_phantom
from SCONetLib.points import canny_points

from test_segment_cli import _write_dicom_series

REPO = Path(__file__).resolve().parents[1]
POINTS = ["--points", "300", "--device", "cpu"]


@pytest.fixture(scope="module")
def ct():
    image, _ = make_phantom(5, size=(64, 64, 20), spacing=(5.0, 5.0, 8.0), random_orientation=False)
    return image


@pytest.fixture(scope="module")
def earlier_run(tmp_path_factory, ct, tiny_weights):
    """A folder holding a CT file and the complete output set of a run on it (made once for the module)."""
    folder = tmp_path_factory.mktemp("earlier")
    sitk.WriteImage(ct, str(folder / "case.nii.gz"))
    assert main([str(folder / "case.nii.gz"), "--probabilities", str(folder / "maps"), "--weights",
                 str(tiny_weights), *POINTS]) == 0
    return folder


@pytest.fixture
def earlier(tmp_path, earlier_run):
    """A copy of ``earlier_run`` in this test's folder: (ct path, {output path: bytes})."""
    shutil.copytree(earlier_run, tmp_path, dirs_exist_ok=True)
    path = tmp_path / "case.nii.gz"
    files = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file() and p != path}
    assert len(files) == 7                            # label map, 4 probability maps, entropy, sidecar
    return path, files


def _second_run(path: Path, weights: Path) -> list:
    """Arguments of a run over the files of ``earlier``, at another spacing (so that every output differs)."""
    return [str(path), "--probabilities", str(path.parent / "maps"), "--spacing", "9", "--weights", str(weights),
            *POINTS]


def _unchanged(files: dict) -> bool:
    return all(path.is_file() and path.read_bytes() == content for path, content in files.items())


def _temporaries(folder: Path) -> list:
    return sorted(p.name for p in folder.rglob(".*") if ".tmp-" in p.name or ".commit-" in p.name)


def _raw_volume(dtype=np.int16, size=(40, 30, 20)) -> sitk.Image:
    array = np.full(size[::-1], -1000, dtype)
    array[5:15, 10:20, 10:30] = 60
    image = sitk.GetImageFromArray(array)
    image.SetSpacing((1.0, 1.0, 2.0))
    return image


# ---------------------------------------------------------------------------------------------- D1 truncated files


@pytest.mark.parametrize("suffix", [".nii", ".nrrd", ".mha"])
def test_d1_truncated_uncompressed_file_is_refused(tmp_path, suffix):
    full = tmp_path / f"full{suffix}"
    sitk.WriteImage(_raw_volume(), str(full), False)
    data = full.read_bytes()
    cut = tmp_path / f"cut{suffix}"
    cut.write_bytes(data[:-2400])                     # the last 1,200 voxels of 24,000
    with pytest.raises(ValueError, match=re.escape(f"cannot read image file {str(cut)!r}: the file is truncated: "
                                                   f"its header describes 48,000 bytes of voxel data")):
        read_image(cut)


def test_d1_complete_gzip_of_a_truncated_nifti_is_refused(tmp_path, capsys):
    full = tmp_path / "full.nii"
    sitk.WriteImage(_raw_volume(), str(full), False)
    path = tmp_path / "cut.nii.gz"
    path.write_bytes(gzip.compress(full.read_bytes()[:-2400]))   # a valid gzip stream, too little data
    with pytest.raises(ValueError, match="the file is truncated: its header describes 48,000 bytes of voxel data "
                                         r"\(40 × 30 × 20 voxels of 2 bytes\), it holds 45,600"):
        read_image(path)
    assert main([str(path), *POINTS]) == 1 and "truncated" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cut.nii.gz", "full.nii"]


# ---------------------------------------------------------------------------------------------- D2 NaN in NIfTI


@pytest.mark.parametrize("suffix", [".nii", ".nii.gz"])
def test_d2_nan_and_infinite_nifti_voxels_are_read_as_such(tmp_path, suffix):
    image = _raw_volume(np.float32)
    array = sitk.GetArrayFromImage(image)
    array[3, 4, 5], array[7, 8, 9], array[19, 29, 39] = np.nan, np.inf, -np.inf
    path = tmp_path / f"nan{suffix}"
    written = sitk.GetImageFromArray(array)
    written.CopyInformation(image)
    sitk.WriteImage(written, str(path))
    assert np.count_nonzero(~np.isfinite(sitk.GetArrayViewFromImage(sitk.ReadImage(str(path))))) == 0  # ITK: 0
    back = sitk.GetArrayFromImage(read_image(path))
    assert np.isnan(back[3, 4, 5]) and back[7, 8, 9] == np.inf and back[19, 29, 39] == -np.inf
    np.testing.assert_array_equal(np.isfinite(back), np.isfinite(array))


def test_d2_all_nan_nifti_is_refused_as_nan(tmp_path, tiny_weights, capsys):
    path = tmp_path / "allnan.nii.gz"
    sitk.WriteImage(sitk.GetImageFromArray(np.full((12, 32, 32), np.nan, np.float32)), str(path))
    assert main([str(path), "--weights", str(tiny_weights), *POINTS]) == 1
    err = capsys.readouterr().err
    assert "image has 12288 NaN or infinite voxels (of 12288)" in err and "range from 0 to 0" not in err


# ---------------------------------------------------------------------------------------------- D3 DICOM gap


def test_d3_dicom_series_with_a_missing_slice_is_refused(tmp_path, ct, tiny_weights, capfd):
    series = tmp_path / "series"
    _write_dicom_series(sitk.Cast(ct, sitk.sitkInt16), series)
    assert read_image(series).GetSize() == ct.GetSize()
    (series / "slice009.dcm").unlink()
    capfd.readouterr()
    z = [ct.TransformIndexToPhysicalPoint((0, 0, k))[2] for k in (8, 10)]
    with pytest.raises(ValueError, match=re.escape(
            f"is not evenly spaced: 19 slices with a median step of 8 mm, but 1 step(s) differ, the largest 16 mm "
            f"between slices 9 and 10 (at {z[0]:.2f} and {z[1]:.2f} mm along the slice normal), about 1 missing "
            f"slice(s) there. SCONet refuses such a series")):
        read_image(series)
    out, err = capfd.readouterr()
    assert "Non uniform sampling" not in err and "WARNING" not in err      # no raw ITK lines
    assert main([str(series), "-o", str(tmp_path / "x.nii.gz"), "--weights", str(tiny_weights), *POINTS]) == 1
    assert "not evenly spaced" in capfd.readouterr().err and not (tmp_path / "x.nii.gz").exists()


# ---------------------------------------------------------------------------------------------- D4 failed writes


def test_d4_failed_sidecar_write_keeps_every_earlier_output(earlier, tiny_weights, monkeypatch, capsys):
    path, files = earlier

    def fail(value):
        raise OSError("No space left on device")
    monkeypatch.setattr(sconet_io, "jsonable", fail)
    assert main(_second_run(path, tiny_weights)) == 1
    assert "No space left on device" in capsys.readouterr().err
    assert _unchanged(files) and _temporaries(path.parent) == []


def test_d4_unwritable_probability_folder_is_refused_before_computing(earlier, tiny_weights, monkeypatch, capsys):
    path, files = earlier
    blocker = path.parent / "not_a_folder"
    blocker.write_text("a file where the maps folder would go")

    def computing(*args, **kwargs):
        raise AssertionError("computed before checking the output folders")
    monkeypatch.setattr(Segmenter, "prepare", computing)
    assert main([str(path), "--probabilities", str(blocker / "maps"), "--weights", str(tiny_weights), *POINTS]) == 1
    assert f"cannot write into {str(blocker / 'maps')!r}: {str(blocker)!r} is a file" in capsys.readouterr().err
    assert _unchanged(files)


def test_d4_ctrl_c_while_writing_keeps_every_earlier_output(earlier, tiny_weights, monkeypatch, capsys):
    path, files = earlier
    real, calls = sitk.WriteImage, []

    def interrupted(*args):
        calls.append(args[1])
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*args)
    monkeypatch.setattr(sitk, "WriteImage", interrupted)
    assert main(_second_run(path, tiny_weights)) == 130
    assert "interrupted; no output was written (earlier files at the output paths are unchanged)" in \
        capsys.readouterr().err
    assert _unchanged(files) and _temporaries(path.parent) == []


def test_d4_a_set_is_written_whole_or_not_at_all(tmp_path):
    first = [sconet_io.text_output("old a", tmp_path / "a.txt"), sconet_io.text_output("old b", tmp_path / "b" / "b.txt")]
    sconet_io.write_outputs(first)

    def broken(tmp):
        raise OSError("disk full")
    with pytest.raises(OSError, match="disk full"):
        sconet_io.write_outputs([sconet_io.text_output("new a", tmp_path / "a.txt"),
                                 sconet_io.Output(tmp_path / "b" / "b.txt", broken)])
    assert (tmp_path / "a.txt").read_text() == "old a" and (tmp_path / "b" / "b.txt").read_text() == "old b"
    assert _temporaries(tmp_path) == []
    (tmp_path / "c.txt").mkdir()
    with pytest.raises(IsADirectoryError, match=r"c\.txt': it is an existing folder"):
        sconet_io.write_outputs([sconet_io.text_output("new a", tmp_path / "a.txt"),
                                 sconet_io.text_output("c", tmp_path / "c.txt")])
    assert (tmp_path / "a.txt").read_text() == "old a"


# ---------------------------------------------------------------------------------------------- D5 NRRD spacing


@pytest.mark.parametrize("field", ["spacings: nan nan nan", None])
def test_d5_nrrd_without_a_spacing_is_refused(tmp_path, field):
    path = tmp_path / "scan.nrrd"
    sitk.WriteImage(_raw_volume(), str(path), False)
    header, data = path.read_bytes().split(b"\n\n", 1)
    lines = [line for line in header.decode().splitlines() if not line.startswith("space")]
    path.write_bytes("\n".join(lines + ([field] if field else [])).encode() + b"\n\n" + data)
    assert sitk.ReadImage(str(path)).GetSpacing() == (1.0, 1.0, 1.0)               # what ITK makes of it
    given = "'spacings: nan nan nan'" if field else "no 'spacings' or 'space directions' field"
    with pytest.raises(ValueError, match=re.escape(f"its NRRD header gives no usable spacing ({given})")):
        read_image(path)


# ---------------------------------------------------------------------------------------------- D6 kills


def _child(tmp_path: Path, hook: str, argv: list) -> subprocess.CompletedProcess:
    """sconet-segment in a child process whose writes run ``hook`` (code using ``calls``, ``os``, ``signal``)."""
    script = textwrap.dedent(f"""
        import os, signal, sys
        import SimpleITK as sitk
        from SCONetLib import cli
        real_write, real_replace, calls = sitk.WriteImage, os.replace, []
        def write(*args):
            calls.append("write")
            {hook}
            return real_write(*args)
        def replace(*args):
            calls.append("replace")
            {hook}
            return real_replace(*args)
        sitk.WriteImage, os.replace = write, replace
        sys.exit(cli.segment_main(sys.argv[1:]))
        """)
    return subprocess.run([sys.executable, "-c", script, *argv], cwd=tmp_path, capture_output=True,
                          encoding="utf-8", timeout=180, env={**os.environ, "PYTHONPATH": str(REPO)})


def test_d6_sigterm_while_writing_is_handled_like_ctrl_c(earlier, tiny_weights, tmp_path):
    path, files = earlier
    argv = _second_run(path, tiny_weights)
    done = _child(tmp_path, 'if calls.count("write") == 3: os.kill(os.getpid(), signal.SIGTERM)', argv)
    assert done.returncode == 130, done.stderr
    assert "interrupted; no output was written" in done.stderr
    assert _unchanged(files) and _temporaries(path.parent) == []


def _killed_second_run(earlier, weights, tmp_path, when: str) -> tuple:
    """Run :func:`_second_run` in a child process that SIGKILLs itself as soon as ``when`` holds; returns the CT
    path, the earlier files and the arguments."""
    path, files = earlier
    argv = _second_run(path, weights)
    done = _child(tmp_path, f"if {when}: os.kill(os.getpid(), signal.SIGKILL)", argv)
    assert done.returncode == -signal.SIGKILL
    return path, files, argv


@pytest.mark.slow
def test_d6_sigkill_while_writing_then_the_next_run_sweeps(earlier, tiny_weights, tmp_path):
    path, files, argv = _killed_second_run(earlier, tiny_weights, tmp_path, 'calls.count("write") == 3')
    assert _unchanged(files) and len(_temporaries(path.parent)) == 2      # complete, never renamed
    assert main(argv) == 0
    assert _temporaries(path.parent) == []
    sidecar = json.loads(path.with_name("case_sconet.nii.gz.json").read_text(encoding="utf-8"))
    assert sidecar["output"]["grid"]["spacing_mm"] == [9.0, 9.0, 9.0]


@pytest.mark.slow
def test_d6_sigkill_between_the_renames_is_completed_at_the_next_start(earlier, tiny_weights, tmp_path):
    # replace #1 puts the journal in place, #2 the label map; the kill lands before the probability maps
    path, files, _ = _killed_second_run(earlier, tiny_weights, tmp_path, 'calls.count("replace") == 3')
    label_map, sidecar_path = path.with_name("case_sconet.nii.gz"), path.with_name("case_sconet.nii.gz.json")
    assert label_map.read_bytes() != files[label_map] and sidecar_path.read_bytes() == files[sidecar_path]
    for folder in (path.parent, path.parent / "maps"):
        sconet_io.remove_partial_outputs(folder)                           # what the next run does first
    assert _temporaries(path.parent) == []
    sidecar = json.loads(sidecar_path.read_text(encoding="utf-8"))
    assert sidecar["output"]["grid"]["size"] == list(read_image(label_map).GetSize())
    assert sidecar["output"]["grid"]["spacing_mm"] == [9.0, 9.0, 9.0]
    assert all(sitk.ReadImage(str(p)).GetSpacing() == (9.0, 9.0, 9.0) for p in (path.parent / "maps").iterdir())


def test_d6_journal_of_a_killed_commit_is_completed(tmp_path):
    """In process, what the slow test above does with a real SIGKILL: a journal left by a dead process whose set
    was complete gets its remaining renames done; one of a living process is left alone."""
    (tmp_path / "maps").mkdir()
    old = {tmp_path / "a.nii.gz": b"old a", tmp_path / "maps" / "b.nii.gz": b"old b", tmp_path / "a.json": b"old"}
    for path, content in old.items():
        path.write_bytes(content)
    for pid in (999999999, os.getpid()):
        renames = []
        for path in old:
            tmp = path.with_name(f".{path.name}.tmp-{pid}-0123abcd{path.suffix}")
            tmp.write_bytes(b"new " + path.name.encode())
            renames.append([str(tmp), str(path)])
        os.replace(renames[0][0], renames[0][1])                  # the first rename was done before the kill
        journal = tmp_path / f".a.nii.gz.commit-{pid}-0123abcd.json"
        journal.write_text(json.dumps(renames))
        sconet_io.remove_partial_outputs(tmp_path)
        if pid != os.getpid():
            assert {p: p.read_bytes() for p in old} == {p: b"new " + p.name.encode() for p in old}
            assert _temporaries(tmp_path) == []
    assert journal.exists() and len(_temporaries(tmp_path)) == 3  # the living process's commit is its own


def test_d6_temporaries_of_a_running_process_are_left_alone(tmp_path):
    mine = tmp_path / f".x.nii.gz.tmp-{os.getpid()}-0123abcd.nii.gz"
    dead = tmp_path / ".x.nii.gz.tmp-999999999-0123abcd.nii.gz"
    for path in (mine, dead):
        path.write_bytes(b"partial")
    assert sconet_io.remove_partial_outputs(tmp_path) == [dead]
    assert mine.exists()


# ---------------------------------------------------------------------------------------------- D7 direction


def test_d7_non_orthonormal_direction_is_refused(tmp_path, tiny_weights, capsys):
    path = tmp_path / "skewed.mha"
    sitk.WriteImage(_raw_volume(), str(path))
    data = path.read_bytes()
    header_end = data.index(b"ElementDataFile = LOCAL\n")
    header = data[:header_end].replace(b"TransformMatrix = 1 0 0 0 1 0 0 0 1", b"TransformMatrix = 1 0 0 0.6 0.8 0 0 0 1")
    path.write_bytes(header + data[header_end:])
    message = "its direction matrix is not orthonormal (axes 1 0 0; 0.6 0.8 0; 0 0 1; |DᵀD − I| up to 0.6)"
    with pytest.raises(ValueError, match=re.escape(message)):
        read_image(path)
    assert main([str(path), "--weights", str(tiny_weights), *POINTS]) == 1
    err = capsys.readouterr().err
    assert message in err and "Pass points inside" not in err


# ---------------------------------------------------------------------------------------------- D8 prepare race


def test_d8_segment_keeps_the_volume_it_started_with(tiny_weights, ct, monkeypatch):
    segmenter = Segmenter(tiny_weights, device="cpu", n_points=300)
    other, _ = make_phantom(6, size=(48, 40, 12), spacing=(6.0, 7.0, 9.0), random_orientation=True)
    segmenter.prepare(other)
    other_state = segmenter._prepared
    segmenter.prepare(ct)
    expected = sitk.GetArrayFromImage(segmenter.segment())
    ct_state = segmenter._prepared
    real_state = infer.Segmenter._state

    def racing(self):           # prepare(other) finishes in another thread right after segment() took its state
        state = real_state(self)
        self._prepared = other_state
        return state
    monkeypatch.setattr(infer.Segmenter, "_state", racing)
    labels = segmenter.segment()
    assert Grid.of(labels) == Grid.of(ct)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(labels), expected)
    segmenter._prepared = ct_state
    probabilities, entropy = segmenter.probabilities()
    assert Grid.of(entropy) == Grid.of(ct) and segmenter.input_grid == Grid.of(other)


# ---------------------------------------------------------------------------------------------- D9 forgotten input


def test_d9_output_without_input_is_refused_unless_demo(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        main(["-o", "x.nii.gz"])
    assert exit_info.value.code == 2
    assert ("-o x.nii.gz was given without INPUT: pass the CT to segment (an empty shell variable?), or --demo to "
            "write the demo into that folder") in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--demo", "-o", "x.nii.gz"])
    assert "the demo writes a folder of files; -o x.nii.gz looks like an image file name" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--demo", "ct.nii.gz"])
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------------------------- minor items


def test_random_bytes_as_weights_are_called_corrupt_not_python_objects(tmp_path, ct, capsys):
    path = tmp_path / "case.nii.gz"
    sitk.WriteImage(ct, str(path))
    for seed in range(20):                         # several byte patterns, some of them pickle opcodes
        junk = tmp_path / "junk.pt"
        junk.write_bytes(np.random.default_rng(seed).integers(0, 256, 4096, dtype=np.uint8).tobytes())
        assert main([str(path), "--weights", str(junk), *POINTS]) == 1
        err = capsys.readouterr().err
        assert "is not a PyTorch checkpoint: it is neither a zip archive" in err and "Python objects" not in err


def test_weights_folder_is_named_as_a_folder(tmp_path, ct, tiny_weights, capsys):
    path = tmp_path / "case.nii.gz"
    sitk.WriteImage(ct, str(path))
    assert main([str(path), "--weights", str(tiny_weights.parent), *POINTS]) == 1
    assert f"{tiny_weights.parent} is a folder, not a checkpoint file; pass the .pt file itself (this folder holds " \
           f"tiny.pt)" in capsys.readouterr().err


def test_volume_a_few_mm_wide_is_called_too_thin(tmp_path):
    array = np.full((6, 6, 6), -1000, np.int16)
    array[2:4, 2:4, 2:4] = 200
    with pytest.raises(ValueError, match=r"the volume is only 6 mm across along its i axis \(6 voxels of 1 mm\), "
                                         r"too thin for 3D edges"):
        canny_points(sitk.GetImageFromArray(array))


def test_spacing_followed_by_the_input(tmp_path, ct, tiny_weights):
    path = tmp_path / "case.nii.gz"
    sitk.WriteImage(ct, str(path))
    assert main(["--spacing", "10", str(path), "--weights", str(tiny_weights), *POINTS]) == 0
    assert sitk.ReadImage(str(tmp_path / "case_sconet.nii.gz")).GetSpacing() == (10.0, 10.0, 10.0)
    with pytest.raises(SystemExit):
        main(["--spacing", "10", "12", str(path)])


def test_absurd_spacing_gives_a_short_message(tmp_path, ct, tiny_weights, capsys):
    path = tmp_path / "case.nii.gz"
    sitk.WriteImage(ct, str(path))
    assert main([str(path), "--spacing", "1e-300", "--weights", str(tiny_weights), *POINTS]) == 1
    err = capsys.readouterr().err
    assert "would be 3.2e+302 × 3.2e+302 × 1.6e+302 = inf voxels" in err and len(err) < 400


@pytest.mark.slow
def test_memory_estimate_covers_what_segment_allocates(ct):
    """The per-voxel budget of segment() (measured on CT-like volumes with the bundled model, where a few percent of
    the voxels are refined) covers numpy's peak plus the returned image."""
    segmenter = Segmenter(device="cpu", n_points=5000, chunk_size=16_384)   # small fixed cost per decoder call
    segmenter.prepare(ct)
    out = segmenter.output_grid(1.5)
    tracemalloc.start()
    labels = segmenter.segment(1.5)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    image_bytes = labels.GetNumberOfPixels()            # the returned uint8 image (ITK memory, not traced)
    assert (peak + image_bytes) / out.voxel_count() <= infer.SEGMENT_BYTES_PER_VOXEL


def test_evaluate_imports_without_the_posix_resource_module():
    code = ("import sys; sys.modules['resource'] = None\n"
            "import SCONetLib.evaluate as e, SCONetLib.cli\n"
            "e.open = lambda *a, **k: (_ for _ in ()).throw(OSError('no /proc'))\n"
            "import math; assert math.isnan(e._peak_rss_mb())")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, encoding="utf-8", timeout=120,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert done.returncode == 0, done.stderr
