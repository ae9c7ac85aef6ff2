"""SCONetLib.batch and ``sconet-segment FOLDER_OR_LIST``: one label map per CT, summary, resume, failures, sharding."""
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import SimpleITK as sitk

from SCONetLib import batch
from SCONetLib.batch import case_stem, is_batch_source, list_cases, segment_batch
from SCONetLib.geometry import Grid
from SCONetLib.io import write_image
from SCONetLib.phantom import make_phantom
from SCONetLib.progress import Cancelled

REPO = Path(__file__).resolve().parents[1]
#: Small clouds keep each case around a second; the batch logic does not depend on the cloud size.
POINTS = 2000


@pytest.fixture(scope="module")
def cts(tmp_path_factory):
    """Folder with four small phantom CTs (one oblique) and one file that is not an image."""
    folder = tmp_path_factory.mktemp("cts")
    for seed in range(4):
        ct, _ = make_phantom(seed, size=(64, 64, 16), spacing=(6.0, 6.0, 8.0), random_orientation=seed == 3)
        write_image(ct, folder / f"case{seed}.nii.gz")
    (folder / "broken.nii.gz").write_bytes(b"not an image")
    (folder / "notes.txt").write_text("ignored: not an image suffix\n", encoding="utf-8")
    return folder


def _read_summary(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


def test_folder_gives_one_label_map_per_ct_and_a_summary(cts, tmp_path, monkeypatch):
    threads = {"read": set(), "write": set()}

    def spy(kind, function):
        def wrapped(*args):
            threads[kind].add(threading.current_thread().name.rsplit("_", 1)[0])
            return function(*args)
        return wrapped
    monkeypatch.setattr(batch, "read_image", spy("read", batch.read_image))
    monkeypatch.setattr(batch, "write_image", spy("write", batch.write_image))
    summary = segment_batch(cts, tmp_path / "out", device="cpu", n_points=POINTS)
    assert threads == {"read": {"sconet-read"}, "write": {"sconet-write"}}      # I/O off the compute thread
    assert [Path(c["input"]).name for c in summary["cases"]] == [
        "broken.nii.gz", "case0.nii.gz", "case1.nii.gz", "case2.nii.gz", "case3.nii.gz"]
    assert (summary["done"], summary["skipped"], summary["failed"]) == (4, 0, 1)
    broken = summary["cases"][0]
    assert broken["status"] == "failed" and "broken.nii.gz" in broken["error"]
    assert not Path(broken["output"]).exists()
    for case in summary["cases"][1:]:
        labels = sitk.ReadImage(case["output"])
        assert Grid.of(labels) == Grid.of(sitk.ReadImage(case["input"]))       # the input's exact geometry
        assert labels.GetPixelID() == sitk.sitkUInt8 and 0 < sitk.GetArrayViewFromImage(labels).max() <= 4
        assert case["status"] == "done" and case["output"].endswith(f"{case_stem(case['input'])}_sconet.nii.gz")
        parts = [case[key] for key in ("read_s", "prepare_s", "segment_s", "write_s")]
        assert min(parts) >= 0 and case["total_s"] == pytest.approx(sum(parts), abs=0.005)
    assert summary["cts_per_hour"] == pytest.approx(3600 * 4 / summary["wall_s"], rel=0.01)
    assert _read_summary(tmp_path / "out" / "sconet_batch.json") == summary


def test_list_file_with_comments_and_relative_paths(cts, tmp_path):
    listing = tmp_path / "cases.txt"
    relative = os.path.relpath(cts / "case1.nii.gz", tmp_path)
    listing.write_text(f"# two cases\n\n{relative}\n  {cts / 'case0.nii.gz'}  \n", encoding="utf-8")
    assert list_cases(listing) == [tmp_path / relative, cts / "case0.nii.gz"]
    summary = segment_batch(listing, tmp_path / "out", device="cpu", n_points=POINTS, suffix=".nrrd")
    assert summary["done"] == 2 and (tmp_path / "out" / "case1_sconet.nrrd").is_file()
    empty = tmp_path / "empty.txt"
    empty.write_text("# nothing\n", encoding="utf-8")
    with pytest.raises(FileNotFoundError, match="names no CT"):
        list_cases(empty)


def test_a_stopped_batch_resumes_without_redoing_finished_cases(cts, tmp_path):
    out = tmp_path / "out"

    def stop_after_first(fraction, message):
        if message.startswith("2 /"):          # the broken file, then case0
            raise Cancelled()
    with pytest.raises(Cancelled):
        segment_batch(cts, out, device="cpu", n_points=POINTS, progress=stop_after_first)
    first = _read_summary(out / "sconet_batch.json")
    assert [c["status"] for c in first["cases"]] == ["failed", "done", "pending", "pending", "pending"]
    finished = out / "case0_sconet.nii.gz"
    stamp = finished.stat().st_mtime_ns
    summary = segment_batch(cts, out, device="cpu", n_points=POINTS)
    assert [c["status"] for c in summary["cases"]] == ["failed", "skipped", "done", "done", "done"]
    assert finished.stat().st_mtime_ns == stamp


def test_shards_partition_the_cases(cts, tmp_path):
    shards = [segment_batch(cts, tmp_path / "out", device="cpu", n_points=POINTS, rank=r, world_size=2)
              for r in (0, 1)]
    inputs = [[Path(c["input"]).name for c in s["cases"]] for s in shards]
    assert inputs == [["broken.nii.gz", "case1.nii.gz", "case3.nii.gz"], ["case0.nii.gz", "case2.nii.gz"]]
    assert Path(shards[1]["summary"]).name == "sconet_batch.rank1of2.json"
    with pytest.raises(ValueError, match="rank must be in"):
        segment_batch(cts, tmp_path / "out", rank=2, world_size=2)


def _env():
    return {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}


@pytest.mark.slow  # long: runs in .ci/run's second pass, not in the default suite
def test_torchrun_two_cpu_ranks_share_the_list(cts, tmp_path):
    out = tmp_path / "out"
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             "-m", "SCONetLib", str(cts), "-o", str(out), "--device", "cpu",
                             "--points", str(POINTS)],
                            cwd=tmp_path, env=_env(), capture_output=True, encoding="utf-8", timeout=600)
    assert result.returncode != 0, "the broken file is a failed case: its rank exits with status 1"
    summaries = [_read_summary(out / f"sconet_batch.rank{r}of2.json") for r in (0, 1)]
    assert [s["rank"] for s in summaries] == [0, 1] and all(s["world_size"] == 2 for s in summaries)
    cases = [c for s in summaries for c in s["cases"]]
    assert sorted(Path(c["input"]).name for c in cases) == sorted(p.name for p in list_cases(cts))
    assert sum(c["status"] == "done" for c in cases) == 4
    assert sorted(p.name for p in out.glob("*_sconet.nii.gz")) == [f"case{i}_sconet.nii.gz" for i in range(4)]


@pytest.mark.slow  # long: runs in .ci/run's second pass, not in the default suite
def test_killed_batch_resumes(cts, tmp_path):
    """SIGKILL while the batch runs: finished label maps are complete files, and a second run skips them."""
    out = tmp_path / "out"
    command = [sys.executable, "-m", "SCONetLib", str(cts), "-o", str(out), "--device", "cpu",
               "--points", str(POINTS)]
    process = subprocess.Popen(command, cwd=tmp_path, env=_env(), stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 300
        while not list(out.glob("*_sconet.nii.gz")) and process.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        process.send_signal(signal.SIGKILL)
    finally:
        process.wait(60)
    done_before = {p.name: p.stat().st_mtime_ns for p in out.glob("*_sconet.nii.gz")}
    assert done_before and len(done_before) < 4, "the kill must land mid-batch"
    result = subprocess.run(command, cwd=tmp_path, env=_env(), capture_output=True, encoding="utf-8", timeout=600)
    assert result.returncode == 1 and "4 segmented" not in result.stdout
    summary = _read_summary(out / "sconet_batch.json")
    assert summary["skipped"] == len(done_before) and summary["done"] == 4 - len(done_before)
    for name, stamp in done_before.items():
        assert (out / name).stat().st_mtime_ns == stamp
    assert not [p.name for p in out.iterdir() if ".tmp" in p.name]


def test_cli_batch_messages_and_refusals(cts, tmp_path, capsys):
    from SCONetLib.cli import segment_main as main
    listing = tmp_path / "one.txt"
    listing.write_text(str(cts / "case2.nii.gz"), encoding="utf-8")
    assert main([str(listing), "-o", str(tmp_path / "out"), "--device", "cpu", "--points", str(POINTS)]) == 0
    assert "1 segmented, 0 already done, 0 failed" in capsys.readouterr().out
    with pytest.raises(SystemExit) as stopped:
        main([str(cts), "-o", str(tmp_path / "out"), "--probabilities", str(tmp_path / "p")])
    assert stopped.value.code == 2
    assert "--probabilities is not available for a batch" in capsys.readouterr().err


def test_what_counts_as_a_batch(cts, tmp_path):
    dicom = tmp_path / "series"
    dicom.mkdir()
    for n in range(3):
        (dicom / f"IM{n:04d}").write_bytes(b"\0" * 8)            # DICOM files usually have no suffix
    listing = tmp_path / "cases.txt"
    listing.write_text("a.nii.gz\n", encoding="utf-8")
    assert is_batch_source(cts) and is_batch_source(listing)
    assert not is_batch_source(dicom) and not is_batch_source(cts / "case0.nii.gz")
    assert not is_batch_source(tmp_path / "missing")
    assert [case_stem(p) for p in ("a/case.nii.gz", "b.NRRD", "c.seg.nrrd", "d.mha", "e.txt")] == \
        ["case", "b", "c", "d", "e"]
    assert list_cases([cts / "case1.nii.gz"]) == [cts / "case1.nii.gz"]
    with pytest.raises(FileNotFoundError, match="batch input does not exist"):
        list_cases(tmp_path / "missing")
    with pytest.raises(ValueError, match="suffix must be one of"):
        segment_batch(cts, tmp_path, suffix=".png")
    # the output folder inside the input folder is not a case
    inside = cts / "labels"
    inside.mkdir(exist_ok=True)
    try:
        assert inside not in list_cases(cts, exclude=inside)
    finally:
        inside.rmdir()
