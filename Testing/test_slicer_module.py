"""SCONetSegmentation (the 3D Slicer module) without Slicer: logic against the stand-in in Testing/slicer_stub,
static checks of the .ui file and of the extension packaging.

The geometry tests place a labelled volume in Slicer with a flipped and oblique IJKToRAS, run the module's
logic with a fake segmenter that returns the labels stored in the voxels it is given (resampled onto the
requested grid), and check in world RAS, independently of SCONetLib.geometry, that every organ comes back
where it was.
"""
from __future__ import annotations

import ast
import importlib
import json
import re
import struct
import sys
import threading
import time
import types
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
for path in (REPO / "Testing" / "slicer_stub", MODULE_DIR):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

import slicer  # noqa: E402  (the stand-in)
import SCONetSegmentation as module  # noqa: E402

from SCONetLib.geometry import Grid  # noqa: E402
from SCONetLib.labels import ORGANS  # noqa: E402
from SCONetLib.progress import Cancelled, report  # noqa: E402

Logic = module.SCONetSegmentationLogic
LPS_FLIP = np.diag([-1.0, -1.0, 1.0])


# ---------------------------------------------------------------------------------------------------- fixtures


class FakeSegmenter:
    """Stands in for SCONetLib.infer.Segmenter: "segments" by reading the labels stored in the image's voxels.

    ``segment(spacing)`` resamples the prepared image (nearest neighbour, SimpleITK, using the image's own
    geometry) onto the input grid or ``Grid.with_spacing(spacing)``, as the real segmenter's output grid is.
    """

    def __init__(self, weights, device):
        self.weights, self.device = weights, device
        self.image = None
        self.calls = []
        self.delay = 0.0
        self.fail_in = None

    @property
    def is_prepared(self):
        return self.image is not None

    def prepare(self, image, progress=None):
        self.calls.append("prepare")
        self.image = None
        self._steps("prepare", progress)
        self.image = image

    def segment(self, spacing=None, progress=None):
        self.calls.append("segment")
        self._steps("segment", progress)
        return self._resampled(spacing, sitk.sitkUInt8)

    def probabilities(self, spacing=None, progress=None):
        self.calls.append("probabilities")
        self._steps("probabilities", progress)
        labels = self._resampled(spacing, sitk.sitkFloat32)
        entropy = sitk.Cast(labels > 0, sitk.sitkFloat32) * 0.25
        entropy.CopyInformation(labels)
        return labels, entropy

    def _steps(self, stage, progress):
        for step in range(5):
            if self.fail_in == stage:
                raise ValueError(f"{stage} failed on purpose")
            report(progress, step / 4, f"{stage} {step}")
            time.sleep(self.delay / 5)

    def _resampled(self, spacing, pixel_type):
        grid = Grid.of(self.image)
        out = grid if spacing is None else grid.with_spacing(spacing)
        return sitk.Resample(self.image, out.size, sitk.Transform(), sitk.sitkNearestNeighbor, out.origin,
                             out.spacing, out.direction, 0, pixel_type)


@pytest.fixture(autouse=True)
def scene(monkeypatch):
    """A fresh MRML scene for every test."""
    fresh = slicer.vtkMRMLScene()
    monkeypatch.setattr(slicer, "mrmlScene", fresh)
    return fresh


@pytest.fixture
def segmenters():
    """Every FakeSegmenter a logic created, and a logic that creates them."""
    made = []

    def factory(weights, device):
        made.append(FakeSegmenter(weights, device))
        return made[-1]

    return made, Logic(segmenterFactory=factory)


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


def run_async(logic, *args, **kwargs):
    """startProcessing + the event loop until the completion callback ran; returns the job."""
    completed = []
    job = logic.startProcessing(*args, completedCallback=completed.append, **kwargs)
    deadline = time.monotonic() + 300     # generous: CI machines may be loaded
    while not completed and time.monotonic() < deadline:
        slicer.app.processEvents()
        time.sleep(0.005)
    assert completed == [job], f"no completion callback after 300 s (job progress {job.progress})"
    for _ in range(3):                     # no second callback
        slicer.app.processEvents()
    assert completed == [job]
    return job


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
def test_organs_come_back_in_their_physical_place(segmenters, spacing, max_centroid_error_mm, min_dice,
                                                  transformed):
    made, logic = segmenters
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


def test_the_segmenter_receives_the_volume_geometry(segmenters):
    made, logic = segmenters
    ijk_to_ras = oblique_flipped_ijk_to_ras(spacing=(0.8, 0.9, 3.0))
    volume = add_label_volume(blob_labels(), ijk_to_ras)
    logic.process(volume, None, organs=["liver"], device="cpu")
    image = made[0].image
    np.testing.assert_allclose(image.GetOrigin(), LPS_FLIP @ ijk_to_ras[:3, 3], atol=1e-12)
    np.testing.assert_allclose(np.reshape(image.GetDirection(), (3, 3)) * image.GetSpacing(),
                               LPS_FLIP @ ijk_to_ras[:3, :3], atol=1e-12)
    assert made[0].device == "cpu" and made[0].weights is None


# ---------------------------------------------------------------------------------------------------- segments


def test_segments_have_standard_names_colours_terminology_and_reference_geometry(segmenters):
    made, logic = segmenters
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
    assert segmentation.GetNodeReference(segmentation.GetReferenceImageGeometryReferenceRole()) is volume
    assert segmentation.GetAttribute(module.SPACING_ATTRIBUTE) == "input"
    sh = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(slicer.mrmlScene)
    assert sh.GetItemParent(sh.GetItemByDataNode(segmentation)) == sh.GetItemParent(sh.GetItemByDataNode(volume))


def test_reference_geometry_is_the_resampled_grid(segmenters):
    made, logic = segmenters
    ijk_to_ras = oblique_flipped_ijk_to_ras()
    volume = add_label_volume(blob_labels(), ijk_to_ras)
    outputs = logic.process(volume, None, spacing=2.0, device="cpu")
    segmentation = outputs.segmentation
    geometry = segmentation.GetSegmentation().GetConversionParameter(
        slicer.vtkSegmentationConverter.GetReferenceImageGeometryParameterName())
    geometry_matrix, extent = vtk.vtkMatrix4x4(), [0] * 6
    assert slicer.vtkSegmentationConverter.DeserializeImageGeometry(geometry, geometry_matrix, extent)
    reference = slicer.util.arrayFromVTKMatrix(geometry_matrix)
    expected = Grid.from_ijk_to_ras(ijk_to_ras, (30, 34, 26)).with_spacing(2.0)
    np.testing.assert_allclose(reference, expected.ijk_to_ras, atol=1e-9)
    np.testing.assert_allclose(np.linalg.norm(reference[:3, :3], axis=0), 2.0)
    assert extent == [0, expected.size[0] - 1, 0, expected.size[1] - 1, 0, expected.size[2] - 1]
    assert segmentation.GetNodeReference(segmentation.GetReferenceImageGeometryReferenceRole()) is None
    assert segmentation.GetAttribute(module.SPACING_ATTRIBUTE) == "2.0"


def test_rerun_replaces_own_segments_and_keeps_the_users(segmenters):
    made, logic = segmenters
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


def test_empty_organ_gives_an_empty_segment(segmenters):
    made, logic = segmenters
    labels = blob_labels()
    labels[labels == 4] = 0
    volume = add_label_volume(labels, oblique_flipped_ijk_to_ras())
    outputs = logic.process(volume, None, device="cpu")
    pancreas = outputs.segmentation.GetSegmentation().GetSegment(outputs.segmentIds["pancreas"])
    assert pancreas.GetName() == "Pancreas" and pancreas.GetRepresentation("Binary labelmap") is None


def test_uncertainty_volume_is_on_the_output_grid_under_the_same_transform(segmenters):
    made, logic = segmenters
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
    assert made[0].calls == ["prepare", "segment", "probabilities"]
    assert logic.process(volume, outputs.segmentation, device="cpu").uncertaintyVolume is None


# ---------------------------------------------------------------------------------------------------- caching


def test_new_spacing_reuses_the_prepared_features(segmenters):
    made, logic = segmenters
    volume = add_label_volume(blob_labels(), oblique_flipped_ijk_to_ras())
    segmentation = logic.process(volume, None, device="cpu").segmentation
    assert logic.isPrepared(volume, "cpu") and not logic.isPrepared(volume, "auto")
    assert logic.canResegment(volume, segmentation, 2.0, "cpu")
    assert not logic.canResegment(volume, segmentation, None, "cpu")   # that result is already there
    logic.process(volume, segmentation, spacing=2.0, device="cpu")
    logic.process(volume, segmentation, spacing=3.0, device="cpu")
    assert len(made) == 1 and made[0].calls == ["prepare", "segment", "segment", "segment"]

    slicer.util.arrayFromVolume(volume)[0, 0, 0] = 1          # new voxels: the features must be recomputed
    slicer.util.arrayFromVolumeModified(volume)
    assert not logic.isPrepared(volume, "cpu")
    logic.process(volume, segmentation, spacing=3.0, device="cpu")
    assert len(made) == 1 and made[0].calls[-2:] == ["prepare", "segment"]

    logic.process(volume, segmentation, spacing=3.0, device="auto")   # another device: another segmenter
    assert len(made) == 2 and made[1].calls == ["prepare", "segment"]


def test_background_job_reports_progress_and_reuses_features(segmenters):
    made, logic = segmenters
    volume = add_label_volume(blob_labels(), oblique_flipped_ijk_to_ras())
    seen = []
    job = run_async(logic, volume, None, device="cpu", progressCallback=lambda f, m: seen.append((f, m)))
    assert job.error is None and not job.cancelled and not logic.isBusy()
    assert seen[-1] == (1.0, "done") and all(0.0 <= f <= 1.0 for f, _ in seen)
    segmentation = job.outputs.segmentation
    assert set(segment_ids_by_organ(segmentation)) == {o.name for o in ORGANS}
    assert threading.current_thread() is threading.main_thread()

    job = run_async(logic, volume, segmentation, spacing=2.0, device="cpu")
    assert job.error is None and made[0].calls == ["prepare", "segment", "segment"]
    assert segmentation.GetAttribute(module.SPACING_ATTRIBUTE) == "2.0"


def test_only_one_job_at_a_time(segmenters):
    made, logic = segmenters
    volume = add_label_volume(blob_labels(), oblique_flipped_ijk_to_ras())
    logic.startProcessing(volume, None, device="cpu")
    made_while_running = len(made)
    with pytest.raises(RuntimeError, match="already running"):
        logic.startProcessing(volume, None, device="cpu")
    assert logic.isBusy()
    while logic.isBusy():
        slicer.app.processEvents()
        time.sleep(0.005)
    assert made_while_running <= 1


# ---------------------------------------------------------------------------------------------------- failures


@pytest.fixture
def previous_result(segmenters):
    """A segmentation holding a finished result and a user segment, and its snapshot."""
    made, logic = segmenters
    volume = add_label_volume(blob_labels(), oblique_flipped_ijk_to_ras())
    segmentation = logic.process(volume, None, spacing=3.0, device="cpu").segmentation
    segmentation.GetSegmentation().AddEmptySegment("", "Tumor", (1.0, 0.0, 0.0))
    return made, logic, volume, segmentation, snapshot(segmentation)


def test_cancelled_job_leaves_the_segmentation_untouched(previous_result):
    made, logic, volume, segmentation, before = previous_result
    made[0].delay = 0.5
    slicer.util.arrayFromVolumeModified(volume)   # force a new prepare, so the job runs for a while
    completed = []
    job = logic.startProcessing(volume, segmentation, device="cpu", completedCallback=completed.append)
    time.sleep(0.15)
    logic.cancel()
    while not completed:
        slicer.app.processEvents()
        time.sleep(0.005)
    assert job.cancelled and job.error is None and job.outputs is None
    assert snapshot(segmentation) == before
    assert not logic.isPrepared(volume, "cpu")     # prepare did not finish: nothing stale is cached


def test_cancel_from_the_progress_callback_of_process(previous_result):
    made, logic, volume, segmentation, before = previous_result

    def cancel_when_segmenting(fraction, message):
        if message.startswith("segment"):
            raise Cancelled("stop")

    with pytest.raises(Cancelled):
        logic.process(volume, segmentation, spacing=2.0, device="cpu", progressCallback=cancel_when_segmenting)
    assert snapshot(segmentation) == before
    assert logic.isPrepared(volume, "cpu")        # the features are still valid and kept


@pytest.mark.parametrize("stage", ["prepare", "segment"])
def test_engine_error_leaves_the_segmentation_untouched(previous_result, stage):
    made, logic, volume, segmentation, before = previous_result
    made[0].fail_in = stage
    slicer.util.arrayFromVolumeModified(volume)
    job = run_async(logic, volume, segmentation, device="cpu")
    assert isinstance(job.error, ValueError) and str(job.error) == f"{stage} failed on purpose"
    assert job.outputs is None and snapshot(segmentation) == before


def test_error_while_writing_removes_what_was_added(previous_result, monkeypatch):
    made, logic, volume, segmentation, before = previous_result
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


def test_non_linear_parent_transform_is_refused(segmenters):
    made, logic = segmenters
    volume = add_label_volume(blob_labels(), oblique_flipped_ijk_to_ras())
    grid_transform = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLGridTransformNode", "warp")
    volume.SetAndObserveTransformNodeID(grid_transform.GetID())
    with pytest.raises(ValueError, match="non-linear transform 'warp'.*Harden"):
        logic.process(volume, None, device="cpu")
    assert made == [] and slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLSegmentationNode") is None


def test_output_with_other_segments_under_another_transform_is_refused(segmenters):
    made, logic = segmenters
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
def test_invalid_arguments(segmenters, kwargs, error, match):
    made, logic = segmenters
    arguments = {"inputVolume": add_label_volume(blob_labels(), np.eye(4)), "outputSegmentation": None,
                 "device": "cpu", **kwargs}
    if arguments["inputVolume"] == "no voxels":
        arguments["inputVolume"] = _missing_image_volume()
    with pytest.raises(error, match=match):
        logic.process(**arguments)
    assert made == []


# ---------------------------------------------------------------------------------------------------- spacing and params


def test_output_spacing_mapping():
    volume = add_label_volume(blob_labels(), oblique_flipped_ijk_to_ras(spacing=(0.7, 0.8, 3.0)))
    assert Logic.finestSpacing(volume) == pytest.approx(0.7)
    assert Logic.outputSpacingFor(volume, 0.1) is None
    assert Logic.outputSpacingFor(volume, 0.7) is None
    assert Logic.outputSpacingFor(volume, 1.5) == 1.5
    assert Logic.weightsOrDefault(Path()) is None and Logic.weightsOrDefault("") is None
    assert Logic.weightsOrDefault("/w/m.pt") == Path("/w/m.pt")


def test_parameter_node_fields_defaults_and_validation():
    parameters = Logic().getParameterNode()
    organ_fields = [name for name, info in parameters.allParameters.items() if info.basetype is bool
                    and name != "showUncertainty"]
    assert organ_fields == [organ.name for organ in ORGANS]
    assert all(parameters.getValue(name) is True for name in organ_fields)
    assert (parameters.device, parameters.outputSpacingMm, parameters.showUncertainty) == ("auto", 0.1, False)
    assert parameters.weightsPath == Path() and parameters.inputVolume is None
    with pytest.raises(ValueError, match="must be in one of"):
        parameters.device = "gpu"
    with pytest.raises(ValueError, match=r"within range \[0.1, 5.0\]"):
        parameters.outputSpacingMm = 10.0
    parameters.outputSpacingMm = 2.5
    assert Logic().getParameterNode().outputSpacingMm == 2.5   # a singleton node in the scene


def test_module_description():
    parent = types.SimpleNamespace(path=str(MODULE_DIR / "SCONetSegmentation.py"))
    module.SCONetSegmentation(parent)
    assert parent.title == "SCONet Segmentation" and parent.categories == ["Segmentation"]
    assert parent.contributors and "liver" in parent.helpText and parent.acknowledgementText.strip()
    assert "SCONetSegmentation" in slicer.selfTests


# ---------------------------------------------------------------------------------------------------- dependencies


@pytest.fixture
def torch_missing(monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "torch" else real_find_spec(name, *a))
    monkeypatch.delitem(sys.modules, "PyTorchUtils", raising=False)


@pytest.fixture
def requirements_file(tmp_path):
    path = tmp_path / "requirements.txt"
    path.write_text("# comment\nnumpy>=1.0\n\nsconet-test-package-that-does-not-exist>=1\n")
    return path


def fake_pytorch_extension(monkeypatch, returns):
    calls = []

    class PyTorchUtilsLogic:
        def installTorch(self, askConfirmation=False, forceComputationBackend=None, torchVersionRequirement=None):
            calls.append((askConfirmation, torchVersionRequirement))
            if isinstance(returns, Exception):
                raise returns
            return returns

    monkeypatch.setitem(sys.modules, "PyTorchUtils", types.SimpleNamespace(PyTorchUtilsLogic=PyTorchUtilsLogic))
    return calls


def test_torch_missing_without_pytorch_extension(torch_missing, requirements_file):
    with pytest.raises(RuntimeError, match="installed by the 'PyTorch' extension.*Extensions Manager"):
        Logic.installRequirements(requirements_file)


@pytest.mark.parametrize("returns, match", [
    (None, "PyTorch was not installed"),
    (OSError("network unreachable"), r"Installing PyTorch failed \(network unreachable\).*internet"),
])
def test_torch_install_declined_or_failing(torch_missing, requirements_file, monkeypatch, returns, match):
    calls = fake_pytorch_extension(monkeypatch, returns)
    with pytest.raises(RuntimeError, match=match):
        Logic.installRequirements(requirements_file, askConfirmation=True)
    assert calls == [(True, ">=2.1")]


def test_torch_installed_then_missing_packages_with_pip_install(torch_missing, requirements_file, monkeypatch):
    calls = fake_pytorch_extension(monkeypatch, types.SimpleNamespace(__version__="2.5"))
    monkeypatch.delattr(slicer, "packaging", raising=False)
    installed = []
    monkeypatch.setattr(slicer.util, "pip_install", installed.append)
    Logic.installRequirements(requirements_file, askConfirmation=True)
    assert calls == [(True, ">=2.1")]
    assert installed == ["sconet-test-package-that-does-not-exist>=1"]   # numpy is already there


def test_missing_packages_declined_or_offline(requirements_file, monkeypatch):
    monkeypatch.delattr(slicer, "packaging", raising=False)
    monkeypatch.setattr(slicer.util, "confirmAnswer", False)
    with pytest.raises(RuntimeError, match="required and were not installed"):
        Logic.installRequirements(requirements_file)
    monkeypatch.setattr(slicer.util, "confirmAnswer", True)
    with pytest.raises(RuntimeError, match="Installing the Python packages .* failed .*internet"):
        Logic.installRequirements(requirements_file)   # the stand-in's pip_install fails like an offline pip


def test_pip_ensure_is_used_when_slicer_has_it(requirements_file, monkeypatch):
    ensured = []
    monkeypatch.setattr(slicer, "packaging", types.SimpleNamespace(
        pip_ensure=lambda requirements, requester=None: ensured.append(([str(r) for r in requirements], requester))),
        raising=False)
    Logic.installRequirements(requirements_file)
    assert ensured == [(["numpy>=1.0", "sconet-test-package-that-does-not-exist>=1"], "SCONet")]


def test_requirements_cover_the_engine_imports():
    """Every third-party package SCONetLib imports ships with Slicer, comes from the PyTorch extension or is in
    Resources/requirements.txt."""
    shipped_with_slicer = {"numpy", "SimpleITK", "vtk", "torch", "packaging",
                           "matplotlib"}  # only SCONetLib.figures (command lines), not on the module's path
    distribution = {"skimage": "scikit-image", "yaml": "PyYAML"}
    listed = {re.split(r"[<>=!~ \[]", line.strip())[0].lower()
              for line in (MODULE_DIR / "Resources" / "requirements.txt").read_text(encoding="utf-8").splitlines()
              if line.strip() and not line.startswith("#")}
    imported = set()
    for path in (REPO / "SCONetLib").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                imported.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                imported.add(node.module.split(".")[0])
    third_party = {name for name in imported - set(sys.stdlib_module_names) - {"SCONetLib", "__future__"}}
    missing = {name for name in third_party - shipped_with_slicer if distribution.get(name, name).lower() not in listed}
    assert not missing, f"add {sorted(missing)} to SCONetSegmentation/Resources/requirements.txt"


# ---------------------------------------------------------------------------------------------------- GUI (static)


UI_FILE = MODULE_DIR / "Resources" / "UI" / "SCONetSegmentation.ui"
#: Widget class the parameterNodeWrapper GUI connectors accept for each parameter type (guiConnectors.py).
CONNECTOR_WIDGET = {bool: "QCheckBox", float: "ctkSliderWidget", str: "QComboBox", Path: "ctkPathLineEdit"}


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
    assert set(parameters) - set(bound) == {"uncertaintyVolume"}      # set by the logic, not shown
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


def test_real_segmenter_api_in_the_background_thread():
    """The logic drives SCONetLib.infer.Segmenter itself (an untrained model: labels are meaningless, the API,
    threading, output grids and the prepare-once contract are what is checked)."""
    torch = pytest.importorskip("torch")
    from SCONetLib.infer import Segmenter
    from SCONetLib.model import build_model
    from SCONetLib.phantom import make_phantom

    class CountingSegmenter(Segmenter):
        prepared = 0

        def prepare(self, image, progress=None):
            CountingSegmenter.prepared += 1
            super().prepare(image, progress)

    torch.manual_seed(0)
    model = build_model("A")
    logic = Logic(segmenterFactory=lambda weights, device: CountingSegmenter.from_model(model, device=device,
                                                                                        n_points=2000))
    ct, _truth = make_phantom(3, size=(40, 40, None), spacing=(8.0, 8.0, 8.0), random_orientation=False)
    ijk_to_ras = oblique_flipped_ijk_to_ras(spacing=ct.GetSpacing())
    volume = slicer.util.addVolumeFromArray(sitk.GetArrayFromImage(ct), ijkToRAS=ijk_to_ras, name="phantom")

    job = run_async(logic, volume, None, organs=["liver", "spleen"], device="cpu")
    assert job.error is None, job.error
    segmentation = job.outputs.segmentation
    assert set(job.outputs.segmentIds) == {"liver", "spleen"} and job.outputs.deviceName == "cpu"
    assert segmentation.GetNodeReference(segmentation.GetReferenceImageGeometryReferenceRole()) is volume

    outputs = logic.process(volume, segmentation, organs=["liver", "spleen"], spacing=10.0, device="cpu")
    assert CountingSegmenter.prepared == 1
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


def test_module_self_test_runs_with_the_real_engine():
    """SCONetSegmentationTest (the test Slicer runs) passes on the stand-in with the real Segmenter."""
    import unittest

    suite = unittest.TestLoader().loadTestsFromTestCase(module.SCONetSegmentationTest)
    result = unittest.TextTestRunner(verbosity=0).run(suite)
    assert result.wasSuccessful() and not result.skipped, result.failures + result.errors + result.skipped
