"""SCONetSegmentation (the 3D Slicer module) without Slicer: logic and GUI against the stand-in in
Testing/slicer_stub, with the real worker process, and static checks of the .ui file and the packaging.

The stand-in behaves like Slicer where it matters here: volume voxels are held on the VTK side (a new Python
wrapper per ``GetImageData()``), the event loop waits holding the GIL, scene close sends its events and resets
singletons, and ``connectGui`` returns None before 5.10.

The geometry tests place a labelled volume in Slicer with a flipped and oblique IJKToRAS and run the module's logic
with a worker whose fake segmenter (Testing/segmenter_factories.py) returns the labels stored in the voxels it is
given (resampled onto the requested grid); they check in world RAS, independently of SCONetLib.geometry, that every
organ comes back where it was.
"""
from __future__ import annotations

import ast
import importlib
import importlib.util
import json
import os
import re
import signal
import struct
import sys
import threading
import time
import types
import unittest
import xml.etree.ElementTree as ET
import zlib
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import vtk
from vtk.util import numpy_support

REPO = Path(__file__).resolve().parents[1]
MODULE_DIR = REPO / "SCONetSegmentation"
TESTING = REPO / "Testing"
for path in (TESTING / "slicer_stub", MODULE_DIR):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

import qt  # noqa: E402  (the stand-in)
import slicer  # noqa: E402  (the stand-in)
import SCONetSegmentation as module  # noqa: E402

from SCONetLib.geometry import Grid  # noqa: E402
from SCONetLib.labels import ORGANS  # noqa: E402
from SCONetLib.progress import Cancelled  # noqa: E402
from SCONetLib.worker import WorkerCrashed  # noqa: E402

Logic = module.SCONetSegmentationLogic
LPS_FLIP = np.diag([-1.0, -1.0, 1.0])
FAKE_WORKER = [sys.executable, "-m", "SCONetLib.worker", "--factory", "segmenter_factories:FakeSegmenter"]


# ---------------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(autouse=True)
def scene(monkeypatch):
    """A fresh MRML scene for every test."""
    fresh = slicer.vtkMRMLScene()
    monkeypatch.setattr(slicer, "mrmlScene", fresh)
    return fresh


@pytest.fixture
def logic(fake):
    """A logic whose worker runs the fake segmenter; its worker is ended after the test."""
    made = Logic(workerCommand=FAKE_WORKER)
    yield made
    made.shutdown()


def engine_python():
    """An interpreter with torch for the worker: ``$SCONET_WORKER_PYTHON`` (set by the Python 3.9 leg of .ci/run,
    whose own interpreter has no torch), else this one if it has torch (else the test is skipped)."""
    python = os.environ.get(module.WORKER_PYTHON_VARIABLE)
    if python:
        return python
    pytest.importorskip("torch")
    return sys.executable


def worker_stats(logic):
    """What the worker did: its Segmenter calls in order, the segmenters it made, the last prepared image."""
    return logic.client().call("stats")


def run_until(condition, timeout=120.0, each=None):
    """Run the stand-in event loop (waiting holding the GIL, as Slicer's main thread) until ``condition()``."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"not reached within {timeout} s"
        qt._idle(0.02)
        slicer.app.processEvents()
        if each is not None:
            each()


def run_async(logic, *args, **kwargs):
    """startProcessing + the event loop until the completion callback ran; returns the job."""
    completed = []
    job = logic.startProcessing(*args, completedCallback=completed.append, **kwargs)
    run_until(lambda: completed, timeout=300)     # generous: CI machines may be loaded
    for _ in range(3):                             # no second callback
        qt._idle(0.01)
        slicer.app.processEvents()
    assert completed == [job]
    return job


def oblique_flipped_ijk_to_ras(spacing=(1.6, 1.4, 2.5), origin=(40.0, -60.0, 120.0), degrees=25.0):
    """(4, 4) IJKToRAS: rotated about S, the I axis flipped (a left-handed index frame), anisotropic spacing."""
    angle = np.deg2rad(degrees)
    rotation = np.array([[np.cos(angle), -np.sin(angle), 0.0], [np.sin(angle), np.cos(angle), 0.0], [0, 0, 1]])
    ijk_to_ras = np.eye(4)
    ijk_to_ras[:3, :3] = rotation @ np.diag([-1.0, 1.0, 1.0]) * np.asarray(spacing)
    ijk_to_ras[:3, 3] = origin
    return ijk_to_ras


def blob_labels(shape=(26, 34, 30)):
    """(K, J, I) uint8 label volume: one ellipsoid per organ at a distinct place, sizes 4-7 voxels."""
    k, j, i = np.meshgrid(*(np.arange(n, dtype=float) for n in shape), indexing="ij")
    labels = np.zeros(shape, dtype=np.uint8)
    for organ, (ck, cj, ci), (rk, rj, ri) in zip(ORGANS, [(8, 10, 8), (17, 22, 9), (9, 23, 21), (17, 11, 21)],
                                                  [(5, 7, 6), (4, 5, 4), (5, 4, 5), (4, 6, 5)]):
        labels[((k - ck) / rk) ** 2 + ((j - cj) / rj) ** 2 + ((i - ci) / ri) ** 2 <= 1.0] = organ.label
    return labels


def add_label_volume(labels, ijk_to_ras, name="phantom"):
    return slicer.util.addVolumeFromArray(labels.astype(np.int16), ijkToRAS=ijk_to_ras, name=name)


def world_ras_of_voxels(node_ijk_to_world, mask_kji):
    """(N, 3) world RAS of the voxel centres where ``mask_kji`` is set."""
    k, j, i = np.nonzero(mask_kji)
    ijk1 = np.stack([i, j, k, np.ones_like(i)]).astype(float)
    return (node_ijk_to_world @ ijk1)[:3].T


def matrix(getter):
    m = vtk.vtkMatrix4x4()
    getter(m)
    return slicer.util.arrayFromVTKMatrix(m)


def node_to_world(node):
    parent = node.GetParentTransformNode()
    return np.eye(4) if parent is None else matrix(parent.GetMatrixTransformToWorld)


def segment_world_points(segmentation_node, segment_id):
    labelmap = slicer.vtkOrientedImageData()
    assert segmentation_node.GetBinaryLabelmapRepresentation(segment_id, labelmap)
    voxels = numpy_support.vtk_to_numpy(labelmap.GetPointData().GetScalars()).reshape(
        labelmap.GetDimensions()[::-1])
    k, j, i = np.nonzero(voxels)
    e = labelmap.GetExtent()
    ijk1 = np.stack([i + e[0], j + e[2], k + e[4], np.ones_like(i)]).astype(float)
    to_world = node_to_world(segmentation_node) @ matrix(labelmap.GetImageToWorldMatrix)
    return (to_world @ ijk1)[:3].T


def segment_ids_by_organ(segmentation_node):
    segmentation = segmentation_node.GetSegmentation()
    ids = {}
    for index in range(segmentation.GetNumberOfSegments()):
        value = vtk.reference("")
        if segmentation.GetNthSegment(index).GetTag(module.ORGAN_TAG, value):
            ids[value.get()] = segmentation.GetNthSegmentID(index)
    return ids
def snapshot(segmentation_node):
    """Comparable state of a segmentation: segment IDs, names, tags and labelmap voxels in world RAS."""
    segmentation = segmentation_node.GetSegmentation()
    state = []
    for index in range(segmentation.GetNumberOfSegments()):
        segment_id = segmentation.GetNthSegmentID(index)
        segment = segmentation.GetSegment(segment_id)
        points = segment_world_points(segmentation_node, segment_id) \
            if segment.GetRepresentation("Binary labelmap") is not None else np.zeros((0, 3))
        state.append((segment_id, segment.GetName(), dict(segment._tags), np.round(points, 6).tolist()))
    return state, segmentation_node.GetTransformNodeID()


def reference_geometry(segmentation_node):
    """(IJKToRAS (4, 4), extent) of the segmentation's reference image geometry string."""
    geometry = segmentation_node.GetSegmentation().GetConversionParameter(
        slicer.vtkSegmentationConverter.GetReferenceImageGeometryParameterName())
    geometry_matrix, extent = vtk.vtkMatrix4x4(), [0] * 6
    assert slicer.vtkSegmentationConverter.DeserializeImageGeometry(geometry, geometry_matrix, extent)
    return slicer.util.arrayFromVTKMatrix(geometry_matrix), extent


def dicom_seg_referenced_volume(segmentation_node):
    """The volume DICOM SEG export uses: QIICR/QuantitativeReporting ``DICOMSegmentationExporter.
    getReferencedVolumeFromSegmentationNode`` reads this node reference and fails with "Referenced volume is not
    found" without it."""
    return segmentation_node.GetNodeReference(segmentation_node.GetReferenceImageGeometryReferenceRole())


# ---------------------------------------------------------------------------------------------------- stand-in


def test_stand_in_holds_image_data_only_on_the_vtk_side():
    import weakref

    volume = add_label_volume(blob_labels(), np.eye(4))
    wrapper = weakref.ref(volume.GetImageData())
    assert wrapper() is None                      # no Python reference is kept: the next call makes a new wrapper
    first = id(volume.GetImageData())
    others = [vtk.vtkImageData() for _ in range(3)]   # reuse the freed memory, as any Slicer session would
    assert id(volume.GetImageData()) != first and others
    address = volume.GetImageData().GetAddressAsString("vtkImageData")
    assert volume.GetImageData().GetAddressAsString("vtkImageData") == address
    assert slicer.util.arrayFromVolume(volume).shape == (26, 34, 30)


def test_stand_in_event_loop_holds_the_gil():
    """A Python thread barely runs while the stand-in idles (as in Slicer, where nothing releases the GIL)."""
    counts, stop = [0], [False]

    def spin():
        while not stop[0]:
            counts[0] += 1

    thread = threading.Thread(target=spin)
    thread.start()
    try:
        time.sleep(0.05)
        before = counts[0]
        qt._idle(0.3)
        while_idle = counts[0] - before
        before = counts[0]
        time.sleep(0.3)
        while_sleeping = counts[0] - before
    finally:
        stop[0] = True
        thread.join()
    assert while_idle < while_sleeping / 10, (while_idle, while_sleeping)


# ---------------------------------------------------------------------------------------------------- geometry


def test_volume_to_image_matches_hand_computed_lps_geometry():
    labels = blob_labels()
    ijk_to_ras = oblique_flipped_ijk_to_ras()
    volume = add_label_volume(labels, ijk_to_ras)
    image = Logic.volumeToImage(volume)

    spacing = np.linalg.norm(ijk_to_ras[:3, :3], axis=0)
    np.testing.assert_allclose(image.GetSpacing(), spacing, atol=1e-12)
    np.testing.assert_allclose(image.GetOrigin(), LPS_FLIP @ ijk_to_ras[:3, 3], atol=1e-12)
    np.testing.assert_allclose(np.reshape(image.GetDirection(), (3, 3)), LPS_FLIP @ ijk_to_ras[:3, :3] / spacing,
                               atol=1e-12)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(image), labels)
    for ijk in [(0, 0, 0), (29, 0, 0), (3, 17, 25)]:
        ras = ijk_to_ras @ np.append(ijk, 1.0)
        np.testing.assert_allclose(image.TransformIndexToPhysicalPoint(ijk), LPS_FLIP @ ras[:3], atol=1e-9)
    slicer.util.arrayFromVolume(volume)[0, 0, 0] = 99   # the image is a copy, not a view of the node
    assert sitk.GetArrayFromImage(image)[0, 0, 0] == labels[0, 0, 0]


@pytest.mark.parametrize("spacing, max_centroid_error_mm, min_dice", [(None, 1e-6, 1.0), (3.0, 1.6, 0.7)])
@pytest.mark.parametrize("transformed", [False, True])
def test_organs_come_back_in_their_physical_place(logic, spacing, max_centroid_error_mm, min_dice, transformed):
    labels = blob_labels()
    ijk_to_ras = oblique_flipped_ijk_to_ras()
    volume = add_label_volume(labels, ijk_to_ras)
    if transformed:
        transform = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLLinearTransformNode")
        to_parent = np.array([[0.0, -1.0, 0.0, 15.0], [1.0, 0.0, 0.0, -8.0], [0.0, 0.0, 1.0, 30.0], [0, 0, 0, 1]])
        transform.SetMatrixTransformToParent(slicer.util.vtkMatrixFromArray(to_parent))
        volume.SetAndObserveTransformNodeID(transform.GetID())

    outputs = logic.process(volume, None, spacing=spacing, device="cpu")

    segmentation = outputs.segmentation
    assert segmentation.GetTransformNodeID() == volume.GetTransformNodeID()
    assert dicom_seg_referenced_volume(segmentation) is volume
    volume_to_world = node_to_world(volume) @ ijk_to_ras
    for organ in ORGANS:
        truth = world_ras_of_voxels(volume_to_world, labels == organ.label)
        found = segment_world_points(segmentation, outputs.segmentIds[organ.name])
        error = np.linalg.norm(found.mean(axis=0) - truth.mean(axis=0))
        assert error <= max_centroid_error_mm, f"{organ.name}: centroid {error:.3f} mm off"
        mask = module.SCONetSegmentationTest.segmentMaskOnVolumeGrid(
            segmentation, outputs.segmentIds[organ.name], volume)
        truth_mask = labels == organ.label
        dice = 2 * np.count_nonzero(mask & truth_mask) / (np.count_nonzero(mask) + np.count_nonzero(truth_mask))
        assert dice >= min_dice, f"{organ.name}: Dice {dice:.3f}"


def test_the_worker_receives_the_volume_geometry_exactly(logic):
    ijk_to_ras = oblique_flipped_ijk_to_ras(spacing=(0.8, 0.9, 3.0))
    volume = add_label_volume(blob_labels(), ijk_to_ras)
    logic.process(volume, None, organs=["liver"], device="cpu")
    stats = worker_stats(logic)
    expected = Grid.from_ijk_to_ras(ijk_to_ras, (30, 34, 26))
    assert stats["image"] == {"size": list(expected.size), "spacing": list(expected.spacing),
                              "origin": list(expected.origin), "direction": list(expected.direction)}
    assert stats["segmenters"] == [{"weights": None, "device": "cpu"}]


# ---------------------------------------------------------------------------------------------------- segments


def test_segments_have_standard_names_colours_terminology_and_reference_geometry(logic):
    volume = add_label_volume(blob_labels(), oblique_flipped_ijk_to_ras())
    outputs = logic.process(volume, None, device="cpu")
    segmentation = outputs.segmentation
    assert segmentation.GetName() == "phantom SCONet"
    for organ in ORGANS:
        segment = segmentation.GetSegmentation().GetSegment(outputs.segmentIds[organ.name])
        assert segment.GetName() == organ.display_name
        np.testing.assert_allclose(segment.GetColor(), np.array(organ.color) / 255.0)
        entry = vtk.reference("")
        assert segment.GetTag(segment.GetTerminologyEntryTagName(), entry)
        parts = entry.get().split("~")
        assert parts[0] == "Segmentation category and type - DICOM master list"
        assert parts[1] == "SCT^123037004^Anatomical Structure"
        assert parts[2] == "^".join(organ.snomed_type)
        assert parts[3] == ("^".join(organ.snomed_modifier) if organ.snomed_modifier else "^^")
        assert segment.GetRepresentation("Closed surface").GetNumberOfPoints() > 0
    # same grid as the input: the input volume is the reference geometry (as DICOM SEG export needs)
    assert dicom_seg_referenced_volume(segmentation) is volume
    assert segmentation.GetAttribute(module.SPACING_ATTRIBUTE) == "input"
    sh = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(slicer.mrmlScene)
    assert sh.GetItemParent(sh.GetItemByDataNode(segmentation)) == sh.GetItemParent(sh.GetItemByDataNode(volume))


def test_resampled_output_keeps_its_ct_with_the_resampled_geometry(logic):
    ijk_to_ras = oblique_flipped_ijk_to_ras()
    volume = add_label_volume(blob_labels(), ijk_to_ras)
    segmentation = logic.process(volume, None, device="cpu").segmentation
    logic.process(volume, segmentation, spacing=2.0, device="cpu")
    reference, extent = reference_geometry(segmentation)
    expected = Grid.from_ijk_to_ras(ijk_to_ras, (30, 34, 26)).with_spacing(2.0)
    np.testing.assert_allclose(reference, expected.ijk_to_ras, atol=1e-9)
    np.testing.assert_allclose(np.linalg.norm(reference[:3, :3], axis=0), 2.0)
    assert extent == [0, expected.size[0] - 1, 0, expected.size[1] - 1, 0, expected.size[2] - 1]
    assert segmentation.GetNodeReferenceID(segmentation.GetReferenceImageGeometryReferenceRole()) == volume.GetID()
    assert segmentation.GetAttribute(module.SPACING_ATTRIBUTE) == "2.0"

    logic.process(volume, segmentation, device="cpu")      # back on the input grid: the volume's own geometry
    reference, extent = reference_geometry(segmentation)
    np.testing.assert_allclose(reference, ijk_to_ras, atol=1e-9)
    assert extent == [0, 29, 0, 33, 0, 25] and dicom_seg_referenced_volume(segmentation) is volume


@pytest.mark.parametrize("spacing", [None, 2.5])
def test_dicom_seg_export_preconditions(logic, spacing):
    """What DICOMSegmentationExporter (QIICR/QuantitativeReporting) reads: the referenced volume through
    GetReferenceImageGeometryReferenceRole(), a terminology type per segment, and for an automatic segmentation
    SegmentAlgorithmType AUTOMATIC with a SegmentAlgorithmName (else export raises ValueError)."""
    volume = add_label_volume(blob_labels(), oblique_flipped_ijk_to_ras())
    transform = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLLinearTransformNode")
    volume.SetAndObserveTransformNodeID(transform.GetID())
    outputs = logic.process(volume, None, spacing=spacing, device="cpu")
    segmentation = outputs.segmentation
    assert dicom_seg_referenced_volume(segmentation) is volume
    for segment_id in outputs.segmentIds.values():
        segment = segmentation.GetSegmentation().GetSegment(segment_id)
        tags = {}
        for tag in ("DICOM.SegmentAlgorithmType", "DICOM.SegmentAlgorithmName", segment.GetTerminologyEntryTagName()):
            value = vtk.reference("")
            assert segment.GetTag(tag, value), tag
            tags[tag] = value.get()
        assert tags["DICOM.SegmentAlgorithmType"] == "AUTOMATIC" and tags["DICOM.SegmentAlgorithmName"] == "SCONet"
        assert tags[segment.GetTerminologyEntryTagName()].split("~")[2].startswith("SCT^")
        scalars = segment.GetRepresentation("Binary labelmap").GetPointData().GetScalars()
        assert scalars.GetRange() != (0.0, 0.0)   # the exporter skips (or refuses) empty segments


def test_rerun_replaces_own_segments_and_keeps_the_users(logic):
    volume = add_label_volume(blob_labels(), oblique_flipped_ijk_to_ras())
    segmentation = logic.process(volume, None, device="cpu").segmentation
    user_id = segmentation.GetSegmentation().AddEmptySegment("", "Tumor", (1.0, 0.0, 0.0))

    outputs = logic.process(volume, segmentation, organs=["spleen", "liver"], spacing=2.5, device="cpu")

    assert outputs.segmentation is segmentation
    assert set(segment_ids_by_organ(segmentation)) == {"liver", "spleen"}
    names = [segmentation.GetSegmentation().GetNthSegment(i).GetName()
             for i in range(segmentation.GetSegmentation().GetNumberOfSegments())]
    assert names == ["Tumor", "Liver", "Spleen"]
    assert segmentation.GetSegmentation().GetSegment(user_id).GetName() == "Tumor"


def test_empty_organ_gives_an_empty_segment(logic):
    labels = blob_labels()
    labels[labels == 4] = 0
    volume = add_label_volume(labels, oblique_flipped_ijk_to_ras())
    outputs = logic.process(volume, None, device="cpu")
    pancreas = outputs.segmentation.GetSegmentation().GetSegment(outputs.segmentIds["pancreas"])
    assert pancreas.GetName() == "Pancreas" and pancreas.GetRepresentation("Binary labelmap") is None


def test_uncertainty_volume_is_on_the_output_grid_under_the_same_transform(logic):
    ijk_to_ras = oblique_flipped_ijk_to_ras()
    volume = add_label_volume(blob_labels(), ijk_to_ras)
    transform = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLLinearTransformNode")
    volume.SetAndObserveTransformNodeID(transform.GetID())
    outputs = logic.process(volume, None, spacing=2.0, device="cpu", uncertainty=True)
    uncertainty = outputs.uncertaintyVolume
    expected = Grid.from_ijk_to_ras(ijk_to_ras, (30, 34, 26)).with_spacing(2.0)
    np.testing.assert_allclose(matrix(uncertainty.GetIJKToRASMatrix), expected.ijk_to_ras, atol=1e-9)
    entropy = slicer.util.arrayFromVolume(uncertainty)
    assert entropy.shape == expected.size[::-1] and entropy.dtype == np.float32
    assert set(np.unique(entropy)) == {0.0, 0.25}
    assert uncertainty.GetTransformNodeID() == transform.GetID()
    assert worker_stats(logic)["calls"] == ["prepare", "segment", "probabilities"]
    assert logic.process(volume, outputs.segmentation, device="cpu").uncertaintyVolume is None


def test_engine_warnings_are_reported(logic, fake):
    """The worker records the engine's warnings in its own main thread (no warnings.catch_warnings in a GUI
    thread) and the module shows them."""
    fake(warn="field of view larger than the model's box")
    volume = add_label_volume(blob_labels(), np.eye(4))
    assert logic.process(volume, None, device="cpu").warnings == ["field of view larger than the model's box"]


# ---------------------------------------------------------------------------------------------------- caching


def test_new_spacing_reuses_the_prepared_features(logic):
    volume = add_label_volume(blob_labels(), oblique_flipped_ijk_to_ras())
    segmentation = logic.process(volume, None, device="cpu").segmentation
    assert logic.isPrepared(volume, "cpu") and not logic.isPrepared(volume, "auto")
    assert logic.canResegment(volume, segmentation, 2.0, "cpu")
    assert not logic.canResegment(volume, segmentation, None, "cpu")   # that result is already there
    logic.process(volume, segmentation, spacing=2.0, device="cpu")
    logic.process(volume, segmentation, spacing=3.0, device="cpu")
    assert worker_stats(logic)["calls"] == ["prepare", "segment", "segment", "segment"]

    slicer.util.arrayFromVolume(volume)[0, 0, 0] = 1          # new voxels: the features must be recomputed
    slicer.util.arrayFromVolumeModified(volume)
    assert not logic.isPrepared(volume, "cpu")
    logic.process(volume, segmentation, spacing=3.0, device="cpu")
    assert worker_stats(logic)["calls"][-2:] == ["prepare", "segment"]

    logic.process(volume, segmentation, spacing=3.0, device="auto")   # another device: another segmenter
    stats = worker_stats(logic)
    assert stats["calls"][-2:] == ["prepare", "segment"] and len(stats["segmenters"]) == 2


def test_cache_key_survives_fresh_image_data_wrappers(logic):
    """Slicer returns a new wrapper from each GetImageData(): the key must not be its id()."""
    volume = add_label_volume(blob_labels(), oblique_flipped_ijk_to_ras())
    logic.process(volume, None, device="cpu")
    others = []
    for _ in range(3):
        others.append(vtk.vtkImageData())              # take the memory a freed wrapper left
        assert logic.isPrepared(volume, "cpu")
    key = Logic.volumeKey(volume)
    volume.SetIJKToRASMatrix(slicer.util.vtkMatrixFromArray(oblique_flipped_ijk_to_ras(degrees=10.0)))
    assert Logic.volumeKey(volume) != key and not logic.isPrepared(volume, "cpu")
    key = Logic.volumeKey(volume)
    slicer.util.updateVolumeFromArray(volume, blob_labels())       # same size, new voxels
    assert Logic.volumeKey(volume) != key
    other = add_label_volume(blob_labels(), oblique_flipped_ijk_to_ras(degrees=10.0))
    assert Logic.volumeKey(other) != Logic.volumeKey(volume)


def test_background_job_reports_progress_and_reuses_features(logic):
    volume = add_label_volume(blob_labels(), oblique_flipped_ijk_to_ras())
    seen = []
    job = run_async(logic, volume, None, device="cpu", progressCallback=lambda f, m: seen.append((f, m)))
    assert job.error is None and not job.cancelled and not logic.isBusy()
    assert seen[-1] == (1.0, "done") and all(0.0 <= f <= 1.0 for f, _ in seen)
    segmentation = job.outputs.segmentation
    assert set(segment_ids_by_organ(segmentation)) == {o.name for o in ORGANS}

    job = run_async(logic, volume, segmentation, spacing=2.0, device="cpu")
    assert job.error is None and worker_stats(logic)["calls"] == ["prepare", "segment", "segment"]
    assert segmentation.GetAttribute(module.SPACING_ATTRIBUTE) == "2.0"


def test_only_one_job_at_a_time(logic, fake):
    fake(delay=0.5)
    volume = add_label_volume(blob_labels(), oblique_flipped_ijk_to_ras())
    logic.startProcessing(volume, None, device="cpu")
    with pytest.raises(RuntimeError, match="already running"):
        logic.startProcessing(volume, None, device="cpu")
    with pytest.raises(RuntimeError, match="already running"):
        logic.process(volume, None, device="cpu")
    assert logic.isBusy()
    run_until(lambda: not logic.isBusy())
    assert worker_stats(logic)["calls"] == ["prepare", "segment"]


# ---------------------------------------------------------------------------------------------------- failures


@pytest.fixture
def previous_result(logic):
    """A segmentation holding a finished result and a user segment, and its snapshot."""
    volume = add_label_volume(blob_labels(), oblique_flipped_ijk_to_ras())
    segmentation = logic.process(volume, None, spacing=3.0, device="cpu").segmentation
    segmentation.GetSegmentation().AddEmptySegment("", "Tumor", (1.0, 0.0, 0.0))
    return logic, volume, segmentation, snapshot(segmentation)


def test_cancelled_job_leaves_the_segmentation_untouched(previous_result, fake):
    logic, volume, segmentation, before = previous_result
    fake(delay=2.0)
    slicer.util.arrayFromVolumeModified(volume)   # force a new prepare, so the job runs for a while
    completed = []
    job = logic.startProcessing(volume, segmentation, device="cpu", completedCallback=completed.append)
    run_until(lambda: job.progress[1].startswith("prepare"))
    pid = logic.client().pid
    logic.cancel()
    run_until(lambda: completed)
    assert job.cancelled and job.error is None and job.outputs is None
    assert snapshot(segmentation) == before
    assert not logic.isPrepared(volume, "cpu")     # prepare did not finish: nothing stale is kept
    assert logic.client().pid == pid               # the worker goes on


def test_cancel_from_the_progress_callback_of_process(previous_result):
    logic, volume, segmentation, before = previous_result

    def cancel_when_segmenting(fraction, message):
        if message.startswith("segment"):
            raise Cancelled("stop")

    with pytest.raises(Cancelled):
        logic.process(volume, segmentation, spacing=2.0, device="cpu", progressCallback=cancel_when_segmenting)
    assert snapshot(segmentation) == before
    assert logic.isPrepared(volume, "cpu")        # the features are still valid and kept


@pytest.mark.parametrize("stage", ["prepare", "segment"])
def test_engine_error_leaves_the_segmentation_untouched(previous_result, fake, stage):
    logic, volume, segmentation, before = previous_result
    fake(fail_in=stage)
    slicer.util.arrayFromVolumeModified(volume)
    job = run_async(logic, volume, segmentation, device="cpu")
    assert isinstance(job.error, ValueError) and str(job.error) == f"{stage} failed on purpose"
    assert job.outputs is None and snapshot(segmentation) == before


def test_killed_worker_fails_clearly_and_is_started_again(previous_result, fake):
    logic, volume, segmentation, before = previous_result
    fake(delay=3.0)
    slicer.util.arrayFromVolumeModified(volume)
    job = logic.startProcessing(volume, segmentation, device="cpu")
    run_until(lambda: job.progress[1].startswith("prepare"))
    os.kill(logic.client().pid, signal.SIGKILL)
    run_until(lambda: not job.running)
    assert isinstance(job.error, WorkerCrashed)
    assert str(job.error).startswith("the SCONet worker process stopped unexpectedly (killed or crashed) during "
                                     "'segment'; it will be started again on the next run.")
    assert snapshot(segmentation) == before and not logic.isPrepared(volume, "cpu")
    fake()
    logic.process(volume, segmentation, device="cpu")
    assert logic.client().starts == 2 and worker_stats(logic)["calls"] == ["prepare", "segment"]


def test_scene_close_racing_a_finishing_job_writes_nothing(logic):
    volume = add_label_volume(blob_labels(), oblique_flipped_ijk_to_ras())
    completed = []
    job = logic.startProcessing(volume, None, device="cpu", completedCallback=completed.append)
    logic.client().wait(job.request)          # the worker has finished; the timer has not written it yet
    assert job.request.state == "done" and not completed
    slicer.mrmlScene.Clear(0)                 # a module widget would call sceneClosing(); here the logic alone:
    logic.sceneClosing()
    run_until(lambda: completed)
    for _ in range(5):
        qt._idle(0.02)
        slicer.app.processEvents()
    assert job.cancelled and job.discarded and job.outputs is None
    assert slicer.mrmlScene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode") == 0
    assert not logic.client().running


def test_result_for_a_removed_volume_is_refused(logic):
    volume = add_label_volume(blob_labels(), np.eye(4))
    job = logic.startProcessing(volume, None, device="cpu")
    logic.client().wait(job.request)
    slicer.mrmlScene.RemoveNode(volume)
    run_until(lambda: not job.running)
    assert isinstance(job.error, RuntimeError) and "input volume was removed from the scene" in str(job.error)
    assert slicer.mrmlScene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode") == 0


def test_a_worker_that_cannot_start_is_reported(tmp_path):
    logic = Logic(workerCommand=[str(tmp_path / "no-python"), "-m", "SCONetLib.worker"])
    volume = add_label_volume(blob_labels(), np.eye(4))
    try:
        with pytest.raises(RuntimeError, match=r"^could not start the SCONet worker \(.*no-python\): "):
            logic.process(volume, None, device="cpu")
        assert os.listdir(logic.client()._tempdir) == [] and not logic.isBusy()
    finally:
        logic.shutdown()


def test_error_while_writing_removes_what_was_added(previous_result, monkeypatch):
    logic, volume, segmentation, before = previous_result
    original = slicer.vtkMRMLSegmentationNode.AddSegmentFromBinaryLabelmapRepresentation
    calls = []

    def fail_third(self, *args):
        calls.append(args[1])
        if len(calls) == 3:
            return ""
        return original(self, *args)

    monkeypatch.setattr(slicer.vtkMRMLSegmentationNode, "AddSegmentFromBinaryLabelmapRepresentation", fail_third)
    with pytest.raises(RuntimeError, match="refused the spleen segment"):
        logic.process(volume, segmentation, device="cpu")
    assert calls == ["Liver", "Kidneys", "Spleen"]
    assert snapshot(segmentation) == before
    with pytest.raises(RuntimeError, match="refused the liver segment"):   # a node created for the run goes too
        calls[:] = [None, None]
        logic.process(volume, None, device="cpu")
    assert slicer.mrmlScene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode") == 1


def test_non_linear_parent_transform_is_refused(logic):
    volume = add_label_volume(blob_labels(), oblique_flipped_ijk_to_ras())
    grid_transform = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLGridTransformNode", "warp")
    volume.SetAndObserveTransformNodeID(grid_transform.GetID())
    with pytest.raises(ValueError, match="non-linear transform 'warp'.*Harden"):
        logic.process(volume, None, device="cpu")
    assert logic._client is None and slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLSegmentationNode") is None


def test_output_with_other_segments_under_another_transform_is_refused(logic):
    volume = add_label_volume(blob_labels(), oblique_flipped_ijk_to_ras())
    segmentation = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode")
    segmentation.GetSegmentation().AddEmptySegment("", "Tumor")
    transform = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLLinearTransformNode")
    segmentation.SetAndObserveTransformNodeID(transform.GetID())
    with pytest.raises(ValueError, match="holds other segments"):
        logic.process(volume, segmentation, device="cpu")
    assert segmentation.GetTransformNodeID() == transform.GetID()


def _missing_image_volume():
    return slicer.mrmlScene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "empty")


@pytest.mark.parametrize("kwargs, error, match", [
    ({"organs": []}, ValueError, "at least one"),
    ({"organs": ["heart"]}, ValueError, "unknown organ 'heart'"),
    ({"organs": "liver"}, TypeError, "list of organ names"),
    ({"spacing": 0.0}, ValueError, "spacing must be None"),
    ({"spacing": -1.0}, ValueError, "spacing must be None"),
    ({"spacing": float("nan")}, ValueError, "spacing must be None"),
    ({"spacing": True}, ValueError, "spacing must be None"),
    ({"device": "gpu"}, ValueError, "device must be one of"),
    ({"inputVolume": None}, ValueError, "inputVolume is required"),
    ({"inputVolume": "no voxels"}, ValueError, "'empty' has no image data"),
])
def test_invalid_arguments(logic, kwargs, error, match):
    arguments = {"inputVolume": add_label_volume(blob_labels(), np.eye(4)), "outputSegmentation": None,
                 "device": "cpu", **kwargs}
    if arguments["inputVolume"] == "no voxels":
        arguments["inputVolume"] = _missing_image_volume()
    with pytest.raises(error, match=match):
        logic.process(**arguments)
    assert logic._client is None      # checked before any worker is started


# ---------------------------------------------------------------------------------------------------- spacing and params


def test_output_spacing_mapping():
    volume = add_label_volume(blob_labels(), oblique_flipped_ijk_to_ras(spacing=(0.7, 0.8, 3.0)))
    assert Logic.finestSpacing(volume) == pytest.approx(0.7)
    assert Logic.outputSpacingFor(volume, 0.1) is None
    assert Logic.outputSpacingFor(volume, 0.7) is None
    assert Logic.outputSpacingFor(volume, 1.5) == 1.5
    assert Logic.weightsOrDefault("") is None and Logic.weightsOrDefault(".") is None
    assert Logic.weightsOrDefault("/w/m.pt") == Path("/w/m.pt")


def test_parameter_node_fields_defaults_and_validation():
    parameters = Logic().getParameterNode()
    organ_fields = [name for name, info in parameters.allParameters.items() if info.basetype is bool
                    and name not in ("showUncertainty", "keepLargestComponents")]
    assert organ_fields == [organ.name for organ in ORGANS]
    assert all(parameters.getValue(name) is True for name in organ_fields)
    assert (parameters.device, parameters.outputSpacingMm, parameters.showUncertainty) == ("auto", 0.1, False)
    assert parameters.keepLargestComponents is True   # post-processing on by default, as in sconet-segment
    assert parameters.weightsPath == "" and parameters.inputVolume is None
    with pytest.raises(ValueError, match="must be in one of"):
        parameters.device = "gpu"
    with pytest.raises(ValueError, match=r"within range \[0.1, 5.0\]"):
        parameters.outputSpacingMm = 10.0
    parameters.outputSpacingMm = 2.5
    assert Logic().getParameterNode().outputSpacingMm == 2.5   # a singleton node in the scene


def test_module_description(monkeypatch):
    translated = []
    monkeypatch.setattr(module, "translate", lambda context, text: translated.append((context, text)) or text)
    parent = types.SimpleNamespace(path=str(MODULE_DIR / "SCONetSegmentation.py"))
    module.SCONetSegmentation(parent)
    assert parent.title == "SCONet Segmentation" and parent.categories == ["Segmentation"]
    assert translated == [("qSlicerAbstractCoreModule", "Segmentation")]   # the template's category context
    assert parent.contributors and "liver" in parent.helpText and parent.acknowledgementText.strip()
    assert "SCONetSegmentation" in slicer.selfTests


def test_worker_python(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.delenv(module.WORKER_PYTHON_VARIABLE, raising=False)
    assert module.workerPython() == sys.executable
    fake_python_slicer = tmp_path / "PythonSlicer"
    fake_python_slicer.write_text("#!/bin/sh\n")
    fake_python_slicer.chmod(0o755)
    assert module.workerPython() == str(fake_python_slicer)      # inside Slicer
    monkeypatch.setenv(module.WORKER_PYTHON_VARIABLE, "/opt/python3.11")
    assert module.workerPython() == "/opt/python3.11"
    assert Logic().workerCommand == ["/opt/python3.11", "-m", "SCONetLib.worker"]


# ---------------------------------------------------------------------------------------------------- dependencies


@pytest.fixture
def requirements_file(tmp_path):
    path = tmp_path / "requirements.txt"
    path.write_text("# comment\nnumpy>=1.0\n\nsconet-test-package-that-does-not-exist>=1\n")
    return path


def pytorch_extension(monkeypatch, installed_version=None, install_returns=None):
    """A PyTorch extension (PyTorchUtils) whose torch is ``installed_version`` (None: not installed); returns the
    list of installTorch calls."""
    calls = []

    class PyTorchUtilsLogic:
        @staticmethod
        def torchInstalled():
            return installed_version is not None

        @property
        def torch(self):
            return types.SimpleNamespace(__version__=installed_version)

        def installTorch(self, askConfirmation=False, forceComputationBackend=None, torchVersionRequirement=None):
            calls.append((askConfirmation, torchVersionRequirement))
            if isinstance(install_returns, Exception):
                raise install_returns
            return install_returns

    monkeypatch.setitem(sys.modules, "PyTorchUtils", types.SimpleNamespace(PyTorchUtilsLogic=PyTorchUtilsLogic))
    return calls


@pytest.fixture
def slicer_version(monkeypatch):
    """``slicer_version(minor)``: emulate the slicer.packaging of Slicer 5.<minor> (absent before 5.11,
    pip_ensure from 5.12), not yet imported: the module must import it itself. Returns a function giving the
    pip_ensure calls made since."""
    monkeypatch.delattr(slicer, "packaging", raising=False)
    monkeypatch.delitem(sys.modules, "slicer.packaging", raising=False)

    def choose(minor):
        if minor < 11:
            monkeypatch.setitem(sys.modules, "slicer.packaging", None)        # import fails
        elif minor == 11:
            monkeypatch.setitem(sys.modules, "slicer.packaging", types.ModuleType("slicer.packaging"))
        return lambda: getattr(sys.modules.get("slicer.packaging"), "ensured", [])

    yield choose
    sys.modules.pop("slicer.packaging", None)


def test_pytorch_extension_missing(monkeypatch, requirements_file):
    monkeypatch.setitem(sys.modules, "PyTorchUtils", None)
    with pytest.raises(RuntimeError, match="installed by the 'PyTorch' extension.*Extensions Manager"):
        Logic.installRequirements(requirements_file)


@pytest.mark.parametrize("returns, match", [
    (None, "PyTorch was not installed"),
    (OSError("network unreachable"), r"Installing PyTorch failed \(network unreachable\).*internet"),
])
def test_torch_install_declined_or_failing(requirements_file, monkeypatch, returns, match):
    calls = pytorch_extension(monkeypatch, installed_version=None, install_returns=returns)
    with pytest.raises(RuntimeError, match=match):
        Logic.installRequirements(requirements_file, askConfirmation=True)
    assert calls == [(True, ">=2.1")]


@pytest.mark.parametrize("version, supported", [("1.13.1+cu117", False), ("2.0.1", False), ("2.1.0", True),
                                                ("2.5.1+cu121", True), ("2.13.0+cpu", True)])
def test_installed_torch_version_is_checked(tmp_path, monkeypatch, slicer_version, version, supported):
    ensured = slicer_version(12)
    calls = pytorch_extension(monkeypatch, installed_version=version)
    requirements = tmp_path / "requirements.txt"
    requirements.write_text("numpy>=1.0\n")
    if supported:
        Logic.installRequirements(requirements)
    else:
        with pytest.raises(RuntimeError, match=re.escape(
                f"SCONet needs PyTorch >=2.1, but version {version} is installed. Install a newer one in the "
                "'PyTorch Utils' module")):
            Logic.installRequirements(requirements)
    assert calls == [] and ensured() == []      # torch is never reinstalled here; numpy is already there


def test_only_missing_packages_go_to_pip_ensure(requirements_file, monkeypatch, slicer_version):
    ensured = slicer_version(12)
    pytorch_extension(monkeypatch, installed_version="2.5.0")
    Logic.installRequirements(requirements_file)
    assert ensured() == [(["sconet-test-package-that-does-not-exist>=1"], "SCONet")]


@pytest.mark.parametrize("minor", [8, 11])
def test_without_pip_ensure_pip_install_after_confirmation(requirements_file, monkeypatch, slicer_version, minor):
    slicer_version(minor)
    pytorch_extension(monkeypatch, installed_version="2.5.0")
    installed = []
    monkeypatch.setattr(slicer.util, "pip_install", installed.append)
    Logic.installRequirements(requirements_file, askConfirmation=True)
    assert installed == ["sconet-test-package-that-does-not-exist>=1"]   # numpy is already there


def test_missing_packages_declined_or_offline(requirements_file, monkeypatch, slicer_version):
    slicer_version(8)
    pytorch_extension(monkeypatch, installed_version="2.5.0")
    monkeypatch.setattr(slicer.util, "confirmAnswer", False)
    with pytest.raises(RuntimeError, match="required and were not installed"):
        Logic.installRequirements(requirements_file)
    monkeypatch.setattr(slicer.util, "confirmAnswer", True)
    with pytest.raises(RuntimeError, match="Installing the Python packages .* failed .*internet"):
        Logic.installRequirements(requirements_file)   # the stand-in's pip_install fails like an offline pip


def imports_of(path: Path, package: str) -> set:
    """Absolute names of every module a Python file imports (at any depth), relative imports resolved against
    ``package`` (the file's package)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(parent + ([node.module] if node.module else []))
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)
    return names


def gui_path_imports() -> set:
    """Top-level third-party names imported by the module and every SCONetLib module it (or the worker, whose
    default segmenter is SCONetLib.infer) can reach."""
    def source(name):
        path = REPO / Path(*name.split("."))
        return (path / "__init__.py", name) if path.is_dir() else (path.with_suffix(".py"), name.rpartition(".")[0])

    pending = {name for name in imports_of(MODULE_DIR / "SCONetSegmentation.py", "") if name.startswith("SCONetLib")}
    pending.add("SCONetLib.infer")
    seen, external = set(), set()
    while pending:
        name = pending.pop()
        path, package = source(name)
        if name in seen or not path.is_file():
            continue
        seen.add(name)
        for imported in imports_of(path, package):
            if imported.split(".")[0] == "SCONetLib":
                pending.add(imported)
            else:
                external.add(imported.split(".")[0])
    return external | {name.split(".")[0] for name in imports_of(MODULE_DIR / "SCONetSegmentation.py", "")}


def is_stdlib(name: str) -> bool:
    """Whether a top-level module belongs to the standard library (Python 3.9 lacks sys.stdlib_module_names)."""
    import sysconfig

    names = getattr(sys, "stdlib_module_names", None)
    if names is not None:
        return name in names
    if name in sys.builtin_module_names:
        return True
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.origin:
        return False
    roots = tuple(sysconfig.get_paths()[key] for key in ("stdlib", "platstdlib"))
    return spec.origin.startswith(roots) and "site-packages" not in spec.origin


def test_gui_path_needs_only_what_slicer_ships_or_requirements_list():
    """What the module, the worker and the inference engine import ships with Slicer, comes from the PyTorch
    extension or is in Resources/requirements.txt. PyYAML (training only) is not on that path and not required."""
    shipped_with_slicer = {"numpy", "SimpleITK", "vtk", "torch", "packaging", "scipy", "qt", "slicer", "ctk",
                           "PyTorchUtils"}   # PyTorchUtils: the PyTorch extension (EXTENSION_DEPENDS)
    listed = {re.split(r"[<>=!~ \[]", line.strip())[0].lower()
              for line in (MODULE_DIR / "Resources" / "requirements.txt").read_text(encoding="utf-8").splitlines()
              if line.strip() and not line.startswith("#")}
    assert "pyyaml" not in listed
    third_party = {name for name in gui_path_imports() if not is_stdlib(name)} - {"SCONetLib", "__future__", ""}
    assert "yaml" not in third_party, "the module, the worker or inference imports yaml; import it where training " \
                                      "reads YAML"
    assert {"torch", "numpy", "SimpleITK", "scipy"} <= third_party     # the walk reaches the engine
    missing = {name for name in third_party - shipped_with_slicer if name.lower() not in listed}
    assert not missing, f"add {sorted(missing)} to SCONetSegmentation/Resources/requirements.txt"


# ---------------------------------------------------------------------------------------------------- GUI (stand-in)


def make_widget(logic, monkeypatch):
    """The module's widget as Slicer makes it: created in its module panel, then setup() and enter()."""
    monkeypatch.setattr(slicer.modules, "sconetsegmentation",
                        types.SimpleNamespace(path=str(MODULE_DIR / "SCONetSegmentation.py")), raising=False)
    panel = slicer.qSlicerScriptedLoadableModuleWidget()
    panel.setLayout(qt.QVBoxLayout())
    panel.setMRMLScene(slicer.mrmlScene)
    widget = module.SCONetSegmentationWidget(panel)
    widget.setup()
    widget.logic.shutdown()
    widget.logic = logic             # the fake segmenter's worker
    panel.isEntered = True
    widget.enter()
    return widget


@pytest.fixture
def gui(logic, monkeypatch):
    """(widget, error dialogs shown) with a PyTorch extension whose torch is 2.5.0."""
    pytorch_extension(monkeypatch, installed_version="2.5.0")
    errors = []
    monkeypatch.setattr(slicer.util, "errorDisplay", lambda text, *args, **kwargs: errors.append(text))
    widget = make_widget(logic, monkeypatch)
    yield widget, errors
    widget.cleanup()


def test_gui_full_cycle(gui, fake):
    """Segment organs with progress, drag the slider (decoder only), Cancel mid-run, a killed worker, and closing
    the scene mid-run; no Python thread is started in the GUI process at any point."""
    widget, errors = gui
    ui, logic = widget.ui, widget.logic
    threads = set(threading.enumerate())
    volume = add_label_volume(blob_labels(), oblique_flipped_ijk_to_ras())
    ui.inputVolumeSelector.setCurrentNode(volume)
    parameters = widget._parameterNode
    assert parameters.inputVolume is volume and ui.segmentButton.enabled

    def no_new_thread():
        assert set(threading.enumerate()) == threads

    # Segment organs: progress is shown while the worker runs
    fake(delay=1.5)
    shown = []
    ui.segmentButton.click()
    assert logic.isBusy() and ui.cancelButton.enabled and not ui.segmentButton.enabled and ui.progressBar.visible
    run_until(lambda: not logic.isBusy(), each=lambda: (no_new_thread(), shown.append(ui.progressBar.value)))
    assert ui.statusLabel.text.startswith("Done in ") and not ui.progressBar.visible and not errors
    values = [v for i, v in enumerate(shown) if i == 0 or v != shown[i - 1]]
    assert len(values) >= 4 and values == sorted(values) and 0 < values[1] < 100, values
    segmentation = parameters.outputSegmentation
    assert set(segment_ids_by_organ(segmentation)) == {o.name for o in ORGANS}
    assert ui.outputSegmentationSelector.currentNode() is segmentation
    assert worker_stats(logic)["calls"] == ["prepare", "segment"]

    # drag the Output spacing slider: each new value re-decodes in the live worker, the point stage never reruns
    fake(delay=0.3)
    ui.outputSpacingSliderWidget.value = 1.5
    assert logic.isBusy()
    ui.outputSpacingSliderWidget.value = 2.0      # while busy: the latest value is decoded when the job ends
    ui.outputSpacingSliderWidget.value = 3.0
    run_until(lambda: not logic.isBusy() and segmentation.GetAttribute(module.SPACING_ATTRIBUTE) == "3.0",
              each=no_new_thread)
    assert worker_stats(logic)["calls"] == ["prepare", "segment", "segment", "segment"]
    reference, _ = reference_geometry(segmentation)
    np.testing.assert_allclose(np.linalg.norm(reference[:3, :3], axis=0), 3.0)
    assert dicom_seg_referenced_volume(segmentation) is volume and not errors

    # Cancel mid-run: the segmentation stays as it was, the worker goes on
    before = snapshot(segmentation)
    slicer.util.arrayFromVolumeModified(volume)    # new voxels: a full run
    fake(delay=4.0)
    ui.segmentButton.click()
    run_until(lambda: ui.progressBar.value > 0)
    pid = logic.client().pid
    ui.cancelButton.click()
    ui.segmentButton.click()                       # a second click while it runs is refused (button disabled)
    run_until(lambda: not logic.isBusy(), each=no_new_thread)
    assert ui.statusLabel.text == "Cancelled: the segmentation was left unchanged." and not errors
    assert snapshot(segmentation) == before and logic.client().pid == pid and ui.segmentButton.enabled

    # a killed worker: a clear message, and the next run starts a new one
    ui.segmentButton.click()
    run_until(lambda: ui.progressBar.value > 0)
    os.kill(pid, signal.SIGKILL)
    run_until(lambda: not logic.isBusy(), each=no_new_thread)
    assert ui.statusLabel.text == "Failed: the segmentation was left unchanged."
    assert len(errors) == 1 and "the SCONet worker process stopped unexpectedly" in errors[0]
    assert "started again on the next run" in errors[0] and snapshot(segmentation) == before
    fake(delay=0.0)
    ui.segmentButton.click()
    run_until(lambda: not logic.isBusy(), each=no_new_thread)
    assert ui.statusLabel.text.startswith("Done in ") and logic.client().starts == 2 and logic.client().pid != pid

    # close the scene mid-run: the worker ends, nothing is written into the new scene
    slicer.util.arrayFromVolumeModified(volume)
    fake(delay=4.0)
    ui.segmentButton.click()
    run_until(lambda: ui.progressBar.value > 0)
    slicer.mrmlScene.Clear(0)
    assert not logic.isBusy() and not logic.client().running
    assert ui.statusLabel.text == "Stopped: the scene was closed."
    for _ in range(20):
        qt._idle(0.05)
        slicer.app.processEvents()
    assert slicer.mrmlScene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode") == 0
    assert len(errors) == 1 and not ui.segmentButton.enabled       # no input volume in the new scene
    no_new_thread()


def test_stand_in_connect_gui_returns_its_tag_from_slicer_5_10(monkeypatch):
    widget = qt.QCheckBox()
    widget.setProperty("SlicerParameterName", "liver")
    gui = types.SimpleNamespace(liverCheckBox=widget)
    parameters = Logic().getParameterNode()
    assert parameters.connectGui(gui) is None                 # 5.8
    monkeypatch.setattr(slicer.app, "minorVersion", 10)
    assert parameters.connectGui(gui) == 1


@pytest.mark.parametrize("minor", [8, 10])
def test_gui_bindings_do_not_pile_up(logic, monkeypatch, minor):
    monkeypatch.setattr(slicer.app, "minorVersion", minor)
    widget = make_widget(logic, monkeypatch)
    try:
        for _ in range(4):
            widget.exit()
            widget.parent.isEntered = False
            widget.parent.isEntered = True
            widget.enter()
        slicer.mrmlScene.Clear(0)
        widget.enter()
        slider, liver = widget.ui.outputSpacingSliderWidget, widget.ui.liverCheckBox
        assert len(slider.valueChanged._slots) == 1 and len(liver.stateChanged._slots) == 1
        writes = []
        widget._parameterNode.AddObserver(vtk.vtkCommand.ModifiedEvent, lambda caller, event: writes.append(1))
        liver.checked = False
        assert widget._parameterNode.liver is False and len(writes) == 1
    finally:
        widget.cleanup()


def test_weights_field_is_empty_for_the_bundled_model(gui):
    widget, _ = gui
    field_ = widget.ui.weightsPathLineEdit
    parameters = widget._parameterNode
    assert field_.currentPath == "" and parameters.weightsPath == ""
    parameters.weightsPath = "."                  # saved by an earlier version (an empty pathlib.Path)
    assert field_.currentPath == "" and Logic.weightsOrDefault(parameters.weightsPath) is None
    field_.currentPath = "/models/sconet.pt"
    assert parameters.weightsPath == "/models/sconet.pt"
    field_.currentPath = ""
    assert parameters.weightsPath == ""


def test_reload_stops_polling_and_the_worker(gui, fake):
    """cleanup() (called by Reload) leaves no timer calling into the old widget and ends the worker."""
    widget, errors = gui
    volume = add_label_volume(blob_labels(), np.eye(4))
    widget.ui.inputVolumeSelector.setCurrentNode(volume)
    fake(delay=4.0)
    widget.ui.segmentButton.click()
    run_until(lambda: widget.ui.progressBar.value > 0)
    logic = widget.logic
    status = widget.ui.statusLabel.text
    widget.cleanup()
    assert not logic.isBusy() and not logic.client().running and not qt._active_timers and not qt._pending
    for _ in range(10):
        qt._idle(0.05)
        slicer.app.processEvents()
    assert widget.ui.statusLabel.text == status and not errors
    assert slicer.mrmlScene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode") == 0


def test_self_test_skip_is_reported_not_raised(monkeypatch, caplog):
    """Under Reload and Test (runTest outside a unittest runner) a skip must not raise: Slicer would show a failure
    dialog. Under a unittest runner it is a skip."""
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *args: None if name == "torch" else real_find_spec(name, *args))
    monkeypatch.delenv(module.WORKER_PYTHON_VARIABLE, raising=False)
    module.SCONetSegmentation(types.SimpleNamespace(path=str(MODULE_DIR / "SCONetSegmentation.py")))
    slicer.selfTests["SCONetSegmentation"]()
    assert "SCONet self-test skipped: PyTorch is not installed" in caplog.text
    result = unittest.TextTestRunner(verbosity=0, stream=open(os.devnull, "w")).run(
        unittest.TestLoader().loadTestsFromTestCase(module.SCONetSegmentationTest))
    assert result.wasSuccessful() and len(result.skipped) == 1 and result.testsRun == 1




UI_FILE = MODULE_DIR / "Resources" / "UI" / "SCONetSegmentation.ui"
#: Widget class the parameterNodeWrapper GUI connectors accept for each parameter type (guiConnectors.py).
CONNECTOR_WIDGET = {bool: "QCheckBox", float: "ctkSliderWidget", str: "QComboBox"}


def ui_widgets():
    root = ET.parse(UI_FILE).getroot()
    return root, {w.get("name"): w for w in root.iter("widget")}


def test_ui_top_widget_and_every_ui_name_used_by_the_module():
    root, widgets = ui_widgets()
    top = root.find("widget")
    assert top.get("class") == "qMRMLWidget" and top.get("name") == root.findtext("class") == "SCONetSegmentation"
    source = (MODULE_DIR / "SCONetSegmentation.py").read_text(encoding="utf-8")
    used = set(re.findall(r"self\.ui\.(\w+)", source))
    assert used and used <= set(widgets), f"not in the .ui file: {sorted(used - set(widgets))}"
    declared = {c.findtext("class") for c in root.iter("customwidget")}
    assert {w.get("class") for w in widgets.values() if w.get("class").startswith(("ctk", "qMRML"))} <= declared
    connected = {(c.findtext("sender"), c.findtext("receiver")) for c in root.iter("connection")}
    for name, widget in widgets.items():
        if widget.get("class") == "qMRMLNodeComboBox":
            assert ("SCONetSegmentation", name) in connected, f"{name} must get the scene (mrmlSceneChanged)"


def test_ui_parameter_names_match_the_parameter_node():
    root, widgets = ui_widgets()
    parameters = module.SCONetSegmentationParameterNode.allParameters
    bound = {}
    for name, widget in widgets.items():
        for prop in widget.findall("property"):
            if prop.get("name") == "SlicerParameterName":
                bound[prop.findtext("string")] = widget.get("class")
    assert set(bound) <= set(parameters), f"unknown parameters in the .ui: {sorted(set(bound) - set(parameters))}"
    # uncertaintyVolume is set by the logic; weightsPath is bound by hand (a str, shown empty, never ".")
    assert set(parameters) - set(bound) == {"uncertaintyVolume", "weightsPath"}
    for name, widget_class in bound.items():
        basetype = parameters[name].basetype
        expected = "qMRMLNodeComboBox" if isinstance(basetype, type) and issubclass(basetype, slicer.vtkMRMLNode) \
            else CONNECTOR_WIDGET[basetype]
        assert widget_class == expected, f"{name}: {widget_class} cannot be connected to {basetype}"
    slider = widgets["outputSpacingSliderWidget"]
    values = {p.get("name"): p.findtext("double") for p in slider.findall("property")}
    assert float(values["maximum"]) == module.MAX_OUTPUT_SPACING_MM


# ---------------------------------------------------------------------------------------------------- packaging


CMAKE_SCRIPTS_RE = re.compile(r"set\(\s*SCONETLIB_PYTHON_(SCRIPTS|RESOURCES)\s+(.*?)\)", re.DOTALL)


def test_module_cmakelists_lists_every_engine_file():
    text = (MODULE_DIR / "CMakeLists.txt").read_text(encoding="utf-8")
    listed = {kind: set(body.split()) for kind, body in CMAKE_SCRIPTS_RE.findall(text)}
    assert set(listed) == {"SCRIPTS", "RESOURCES"}
    on_disk = {p.relative_to(REPO).as_posix() for p in (REPO / "SCONetLib").rglob("*")
               if p.is_file() and "__pycache__" not in p.parts and p.suffix != ".pyc"}
    scripts = {p for p in on_disk if p.endswith(".py")}
    assert listed["SCRIPTS"] == scripts, (f"missing: {sorted(scripts - listed['SCRIPTS'])}, "
                                          f"not on disk: {sorted(listed['SCRIPTS'] - scripts)}")
    assert listed["RESOURCES"] == on_disk - scripts, (
        f"missing: {sorted(on_disk - scripts - listed['RESOURCES'])}, "
        f"not on disk: {sorted(listed['RESOURCES'] - (on_disk - scripts))}")
    assert "SOURCE_DIR ${SCONETLIB_ROOT_DIR}" in text and "slicer_add_python_unittest(SCRIPT ${MODULE_NAME}.py)" in text
    for resource in ("Resources/Icons/${MODULE_NAME}.png", "Resources/UI/${MODULE_NAME}.ui",
                     "Resources/requirements.txt"):
        assert resource in text and (MODULE_DIR / resource.replace("${MODULE_NAME}", "SCONetSegmentation")).is_file()


def cmake_variable(text, name):
    match = re.search(rf'set\({name}\s+"([^"]*)"', text)
    return match.group(1) if match else None


def test_extension_metadata_and_catalog_entry():
    text = (REPO / "CMakeLists.txt").read_text(encoding="utf-8")
    assert re.search(r"^project\(SCONet\)", text, re.MULTILINE)
    for name in ("EXTENSION_HOMEPAGE", "EXTENSION_CONTRIBUTORS", "EXTENSION_DESCRIPTION", "EXTENSION_ICONURL",
                 "EXTENSION_SCREENSHOTURLS"):
        assert cmake_variable(text, name), name
    assert cmake_variable(text, "EXTENSION_CATEGORY") == "Segmentation"
    assert cmake_variable(text, "EXTENSION_ICONURL").startswith("https://raw.githubusercontent.com/")
    assert "add_subdirectory(SCONetSegmentation)" in text and "find_package(Slicer REQUIRED)" in text
    entry = json.loads((REPO / "SCONet.json").read_text(encoding="utf-8"))
    allowed = {"$schema", "category", "scm_url", "scm_revision", "scm_type", "build_dependencies",
               "dicom_support_rule", "build_subdirectory", "enabled", "tier"}
    assert set(entry) <= allowed and {"$schema", "category", "scm_url"} <= set(entry)
    assert entry["build_dependencies"] == cmake_variable(text, "EXTENSION_DEPENDS").split() == ["PyTorch"]
    assert entry["category"] == "Segmentation" and 1 <= entry["tier"] <= 5


def png_size_and_colours(path):
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height, depth, colour_type = struct.unpack(">IIBB", data[16:26])
    chunks, offset = [], 8
    while offset < len(data):
        length, kind = struct.unpack(">I4s", data[offset:offset + 8])
        chunks.append((kind, data[offset + 8:offset + 8 + length]))
        offset += 12 + length
    raw = zlib.decompress(b"".join(body for kind, body in chunks if kind == b"IDAT"))
    return width, height, depth, colour_type, raw


@pytest.mark.parametrize("path", [REPO / "SCONet.png", MODULE_DIR / "Resources" / "Icons" / "SCONetSegmentation.png"])
def test_icons_are_128_pixel_pngs_with_content(path):
    width, height, depth, colour_type, raw = png_size_and_colours(path)
    assert (width, height, depth) == (128, 128, 8) and colour_type in (2, 6)
    assert len(set(raw)) > 50      # not a flat image


# ---------------------------------------------------------------------------------------------------- real engine

# ---------------------------------------------------------------------------------------------------- real engine


def test_real_engine_through_the_worker_without_pyyaml(tmp_path, monkeypatch):
    """The logic drives SCONetLib.infer.Segmenter in the worker (an untrained model: labels are meaningless; the
    API, output grids, the prepare-once contract and error types are checked), with PyYAML unimportable in both
    processes (a yaml module that raises ImportError for the worker, None in sys.modules here)."""
    blocker = tmp_path / "no_yaml"
    blocker.mkdir()
    (blocker / "yaml.py").write_text("raise ImportError('PyYAML is not installed (blocked by the test)')\n")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(blocker), str(TESTING), os.environ.get("PYTHONPATH", "")]))
    monkeypatch.setitem(sys.modules, "yaml", None)
    from SCONetLib.phantom import make_phantom

    logic = Logic(workerCommand=[engine_python(), "-m", "SCONetLib.worker", "--factory",
                                 "segmenter_factories:untrained"])
    try:
        ct, _truth = make_phantom(3, size=(40, 40, None), spacing=(8.0, 8.0, 8.0), random_orientation=False)
        ijk_to_ras = oblique_flipped_ijk_to_ras(spacing=ct.GetSpacing())
        volume = slicer.util.addVolumeFromArray(sitk.GetArrayFromImage(ct), ijkToRAS=ijk_to_ras, name="phantom")

        job = run_async(logic, volume, None, organs=["liver", "spleen"], device="cpu")
        assert job.error is None, job.error
        segmentation = job.outputs.segmentation
        assert set(job.outputs.segmentIds) == {"liver", "spleen"} and job.outputs.deviceName == "cpu"
        assert dicom_seg_referenced_volume(segmentation) is volume

        outputs = logic.process(volume, segmentation, organs=["liver", "spleen"], spacing=10.0, device="cpu")
        assert worker_stats(logic)["calls"] == ["prepare", "segment", "segment"]
        expected = Grid.from_ijk_to_ras(ijk_to_ras, ct.GetSize()).with_spacing(10.0)
        checked = 0
        for segment_id in outputs.segmentIds.values():
            labelmap = slicer.vtkOrientedImageData()
            if segmentation.GetBinaryLabelmapRepresentation(segment_id, labelmap):
                checked += 1
                np.testing.assert_allclose(matrix(labelmap.GetImageToWorldMatrix), expected.ijk_to_ras, atol=1e-9)
                extent = np.array(labelmap.GetExtent())
                assert np.all(extent[0::2] >= 0) and np.all(extent[1::2] < expected.size)
        assert checked >= 1, "the untrained model (seed 0) labels some voxels liver or spleen"
        assert dicom_seg_referenced_volume(segmentation) is volume

        before = snapshot(segmentation)    # the engine's own errors cross the process boundary with their type
        with pytest.raises(FileNotFoundError, match="nothing.pt"):
            logic.process(volume, segmentation, device="cpu", weights=tmp_path / "nothing.pt")
        assert snapshot(segmentation) == before and logic.client().starts == 1
    finally:
        logic.shutdown()


def test_module_self_test_runs_with_the_real_engine(monkeypatch):
    """SCONetSegmentationTest (the test Slicer runs) passes on the stand-in with the bundled model in the worker."""
    monkeypatch.setenv(module.WORKER_PYTHON_VARIABLE, engine_python())
    suite = unittest.TestLoader().loadTestsFromTestCase(module.SCONetSegmentationTest)
    result = unittest.TextTestRunner(verbosity=0, stream=open(os.devnull, "w")).run(suite)
    assert result.wasSuccessful() and not result.skipped, result.failures + result.errors + result.skipped
