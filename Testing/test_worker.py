"""SCONetLib.worker from plain Python: the protocol, RemoteSegmenter, errors, cancellation, a killed worker.

Most tests run the worker with Testing/segmenter_factories.py's FakeSegmenter (no torch; its behaviour is steered
through ``$SCONET_FAKE_CONTROL``); the last one compares the real engine in the worker with the same engine in
this process.
"""
from __future__ import annotations

import json
import os
import signal
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from SCONetLib.geometry import Grid
from SCONetLib.progress import Cancelled
from SCONetLib.worker import (NotPrepared, RemoteSegmenter, WorkerClient, WorkerCrashed, WorkerError, load_image,
                              save_image)

TESTING = Path(__file__).resolve().parent
FAKE = [sys.executable, "-m", "SCONetLib.worker", "--factory", "segmenter_factories:FakeSegmenter"]


@pytest.fixture
def client(fake):
    made = WorkerClient(FAKE)
    yield made
    made.close()


def labelled_image():
    """A (24, 20, 16) uint8 label image with blocks of labels 1-4 on an oblique, flipped LPS grid."""
    array = np.zeros((16, 20, 24), dtype=np.uint8)
    array[2:6, 3:9, 4:10], array[8:12, 10:16, 4:9], array[3:7, 12:18, 14:20], array[10:14, 2:8, 15:22] = 1, 2, 3, 4
    angle = np.deg2rad(20.0)
    rotation = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]])
    grid = Grid((24, 20, 16), (1.3, 1.1, 2.7), (12.5, -40.25, 301.0),
                tuple((rotation @ np.diag([-1.0, 1.0, 1.0])).ravel()))
    return grid.image_from_array(array)


def test_array_files_keep_voxels_and_geometry_exactly(tmp_path):
    image = labelled_image()
    spec = save_image(tmp_path / "a.npy", image)
    assert json.loads(json.dumps(spec)) == spec
    back = load_image(json.loads(json.dumps(spec)))
    assert (back.GetOrigin(), back.GetSpacing(), back.GetDirection()) == \
           (image.GetOrigin(), image.GetSpacing(), image.GetDirection())
    np.testing.assert_array_equal(sitk.GetArrayFromImage(back), sitk.GetArrayFromImage(image))
    vector = sitk.Compose([sitk.Cast(image, sitk.sitkFloat32)] * 3)
    assert load_image(save_image(tmp_path / "v.npy", vector)).GetNumberOfComponentsPerPixel() == 3


def test_remote_segmenter_prepares_once_and_decodes_at_any_spacing(client):
    image = labelled_image()
    segmenter = RemoteSegmenter(device="cpu", client=client)
    assert not segmenter.is_prepared
    seen = []
    segmenter.prepare(image, progress=lambda f, m: seen.append((f, m)))
    assert segmenter.is_prepared and seen[-1] == (1.0, "prepare 4") and segmenter.device_name == "cpu"
    labels = segmenter.segment()
    assert (labels.GetSize(), labels.GetOrigin(), labels.GetDirection()) == \
           (image.GetSize(), image.GetOrigin(), image.GetDirection())
    np.testing.assert_array_equal(sitk.GetArrayFromImage(labels), sitk.GetArrayFromImage(image))
    coarse = segmenter.segment(spacing=2.0)
    expected = Grid.of(image).with_spacing(2.0)
    assert Grid.of(coarse) == expected
    probabilities, entropy = segmenter.probabilities(spacing=(2.0, 2.0, 3.0))
    assert probabilities.GetNumberOfComponentsPerPixel() == 5 and entropy.GetSpacing() == (2.0, 2.0, 3.0)
    stats = client.call("stats")
    assert stats["calls"] == ["prepare", "segment", "segment", "probabilities"]
    assert stats["segmenters"] == [{"weights": None, "device": "cpu"}]
    assert os.listdir(client._tempdir) == []        # every array file was removed


def test_replies_and_errors_keep_their_type(client, fake):
    assert client.call("stats")["prepared"] is None
    with pytest.raises(ValueError, match=r"^unknown op 'segmnt'; expected one of \['devices', 'prepare', "
                                         r"'segment', 'stats'\] or cancel, quit$"):
        client.call("segmnt")
    with pytest.raises(NotPrepared, match="the worker holds volume None, not 'v1'; send its image"):
        client.call("segment", key="v1", weights=None, device="cpu", spacing=None, labels=client.new_path("l"))
    fake(fail_in="prepare")
    segmenter = RemoteSegmenter(device="cpu", client=client)
    with pytest.raises(ValueError, match="^prepare failed on purpose$"):
        segmenter.prepare(labelled_image())
    assert not segmenter.is_prepared
    with pytest.raises(RuntimeError, match="no volume is prepared"):
        segmenter.segment()
    assert client.starts == 1 and client.running          # errors do not end the worker


def test_unknown_error_types_become_worker_errors():
    from SCONetLib.worker import error_from_reply

    error = error_from_reply("CheckpointError", "model.pt: not a SCONet checkpoint")
    assert isinstance(error, WorkerError) and isinstance(error, RuntimeError)
    assert str(error) == "CheckpointError: model.pt: not a SCONet checkpoint" and error.type_name == "CheckpointError"
    assert type(error_from_reply("FileNotFoundError", "x")) is FileNotFoundError


def test_warnings_and_stray_prints_of_the_engine(client, fake):
    fake(warn="intensities do not look like CT", print="a library printing to stdout")
    segmenter = RemoteSegmenter(device="cpu", client=client)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        segmenter.prepare(labelled_image())
    assert [str(w.message) for w in caught] == ["intensities do not look like CT"]
    assert segmenter.is_prepared                          # the print went to stderr, the protocol is intact
    deadline = time.monotonic() + 30                      # stderr is read by a thread: wait for it under load
    while "a library printing to stdout" not in "\n".join(client._stderr_tail) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert "a library printing to stdout" in "\n".join(client._stderr_tail)


def test_cancel_keeps_a_finished_prepare_and_drops_an_unfinished_one(client, fake):
    segmenter = RemoteSegmenter(device="cpu", client=client)
    segmenter.prepare(labelled_image())
    fake(delay=2.0)

    def cancel(fraction, message):
        if message == "segment 1":
            raise Cancelled("stop")

    with pytest.raises(Cancelled):
        segmenter.segment(spacing=2.0, progress=cancel)
    assert segmenter.is_prepared

    def cancel_prepare(fraction, message):
        if message == "prepare 1":
            raise Cancelled("stop")

    with pytest.raises(Cancelled):
        segmenter.prepare(labelled_image(), progress=cancel_prepare)
    assert not segmenter.is_prepared and client.starts == 1
    assert client.call("stats")["calls"] == ["prepare", "segment", "prepare"]


def test_a_queued_request_can_be_cancelled(client, fake):
    fake(delay=1.0)
    image = save_image(client.new_path("input"), labelled_image())
    first = client.submit("prepare", image=image, key="a", weights=None, device="cpu")
    second = client.submit("stats")
    client.cancel(second)
    client.wait(first)
    client.wait(second)
    assert (first.state, second.state) == ("done", "cancelled")


def test_killed_worker_fails_pending_requests_and_restarts(client, fake):
    segmenter = RemoteSegmenter(device="cpu", client=client)
    segmenter.prepare(labelled_image())
    fake(delay=5.0)
    request = client.submit("segment", key=segmenter._key, weights=None, device="cpu", spacing=None,
                            labels=client.new_path("labels"))
    deadline = time.monotonic() + 60
    while request.progress[1] != "segment 0":
        assert time.monotonic() < deadline
        client.poll()
        time.sleep(0.02)
    pid = client.pid
    os.kill(pid, signal.SIGKILL)
    client.wait(request, timeout=60)
    assert request.state == "error" and isinstance(request.error, WorkerCrashed)
    assert str(request.error).startswith("the SCONet worker process stopped unexpectedly (killed by signal 9) "
                                         "during 'segment'; it will be started again on the next run.")
    assert not segmenter.is_prepared and client.prepared is None
    fake()
    segmenter.prepare(labelled_image())
    assert client.starts == 2 and client.pid != pid and segmenter.is_prepared


def test_stop_and_end_of_input_end_the_worker(fake):
    client = WorkerClient(FAKE)
    client.call("stats")
    transport = client._transport
    client.close()
    assert transport.exit_code() == 0 and client.pid is None and client._tempdir is None
    client = WorkerClient(FAKE)
    client.call("stats")
    transport = client._transport
    transport._process.stdin.close()                    # the client went away
    deadline = time.monotonic() + 30
    while transport.exit_code() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert transport.exit_code() == 0


def test_the_real_engine_gives_the_same_labels_in_the_worker(monkeypatch):
    """The untrained model (seeded) in the worker and in this process: identical labels and geometry."""
    pytest.importorskip("torch")
    from segmenter_factories import untrained  # (Testing/ is on sys.path under pytest)

    from SCONetLib.phantom import make_phantom

    ct, _labels = make_phantom(3, size=(40, 40, None), spacing=(8.0, 8.0, 8.0), random_orientation=True)
    local = untrained(device="cpu")
    local.prepare(ct)
    expected = local.segment(spacing=8.0)
    expected_post = local.segment(spacing=8.0, postprocess=True)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(TESTING), os.environ.get("PYTHONPATH", "")]))
    command = [sys.executable, "-m", "SCONetLib.worker", "--factory", "segmenter_factories:untrained"]
    with RemoteSegmenter(device="cpu", client=WorkerClient(command)) as remote:
        remote.prepare(ct)
        labels = remote.segment(spacing=8.0)
        post = remote.segment(spacing=8.0, postprocess=True)  # the Slicer module's default
    assert Grid.of(labels) == Grid.of(expected)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(labels), sitk.GetArrayFromImage(expected))
    np.testing.assert_array_equal(sitk.GetArrayFromImage(post), sitk.GetArrayFromImage(expected_post))


def test_a_worker_that_cannot_start(tmp_path):
    client = WorkerClient([str(tmp_path / "no-python"), "-m", "SCONetLib.worker"])
    with pytest.raises(RuntimeError, match=r"^could not start the SCONet worker \(.*no-python\): "):
        client.call("stats")
    assert not client.running and client.starts == 0
