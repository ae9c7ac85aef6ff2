"""SCONet Segmentation: liver, kidneys, spleen and pancreas in abdominal CT, as a 3D Slicer module.

The module is a thin shell around the ``SCONetLib`` engine (``SCONetLib.infer.Segmenter``):

* ``SCONetSegmentationLogic`` turns a volume node into a SimpleITK image with its exact geometry, runs the
  segmenter in a background thread (the worker touches only numpy / SimpleITK / torch, never MRML), and writes
  one segment per organ into a segmentation node on the main thread, only after the whole computation
  succeeded. It keeps the prepared (encoded) volume, so a new output spacing re-runs only the decoder.
* ``SCONetSegmentationWidget`` mirrors a ``SCONetSegmentationParameterNode`` (all user choices live there, so
  they are saved with the scene) and calls the logic.

Frames: Slicer nodes are RAS (IJKToRAS); SimpleITK images are LPS. The conversion goes through
``SCONetLib.geometry.Grid`` only (``Grid.from_ijk_to_ras`` in, ``Grid.ijk_to_ras`` out).

Parent transforms: voxels and IJKToRAS of a volume ignore its parent transform, so the segmentation is computed
in the volume's own frame and the output segmentation (and uncertainty volume) is put under the *same* linear
parent transform; a non-linear parent transform is refused (harden it first).

The Slicer APIs used here were checked against Slicer's source; the list is in ``docs/slicer-api-check.md``.
"""

import importlib
import importlib.util
import logging
import os
import pathlib
import sys
import threading
import time
import warnings
from dataclasses import dataclass, field
from typing import Annotated, Callable, Optional

import numpy as np
import qt
import vtk
from vtk.util import numpy_support

import slicer
from slicer import vtkMRMLScalarVolumeNode, vtkMRMLSegmentationNode
from slicer.i18n import tr as _
from slicer.parameterNodeWrapper import Choice, WithinRange, parameterNodeWrapper
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin


def _ensureSCONetLibImportable() -> None:
    """Make ``import SCONetLib`` work both when installed (package beside this file) and from a source checkout.

    The extension build copies ``SCONetLib`` next to this file (see ``CMakeLists.txt``), and Slicer puts the
    module folder on ``sys.path``. In a source checkout ``SCONetLib`` sits one level up, at the repository root.
    """
    if importlib.util.find_spec("SCONetLib") is None:
        repositoryRoot = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        if os.path.isdir(os.path.join(repositoryRoot, "SCONetLib")):
            sys.path.append(repositoryRoot)


_ensureSCONetLibImportable()

from SCONetLib.labels import ORGANS  # noqa: E402  (pure Python, cheap: safe at module load)
from SCONetLib.progress import Cancelled, sub_progress  # noqa: E402

logger = logging.getLogger(__name__)

#: Device choices offered in the GUI (``SCONetLib.infer.Segmenter`` also accepts ``cuda:N``).
DEVICE_CHOICES = ("auto", "cpu", "cuda")
#: Largest output spacing offered by the slider (mm).
MAX_OUTPUT_SPACING_MM = 5.0
#: Lowest value the parameter node accepts for the output spacing (mm); the slider's minimum is raised to the
#: finest spacing of the selected input, and that minimum means "the input grid itself".
MIN_OUTPUT_SPACING_MM = 0.1
#: Minimum torch version requested from the PyTorch extension.
TORCH_REQUIREMENT = ">=2.1"
#: Segment tag holding the organ name, to find the segments this module wrote.
ORGAN_TAG = "SCONet.Organ"
#: Segmentation node attribute holding the output spacing of the last result ("input" or mm).
SPACING_ATTRIBUTE = "SCONet.OutputSpacingMm"
#: Interval at which the main thread polls a running job (ms).
POLL_INTERVAL_MS = 100


#
# SCONetSegmentation
#


class SCONetSegmentation(ScriptedLoadableModule):
    """Module description (no heavy imports here: this runs at application startup)."""

    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("SCONet Segmentation")
        self.parent.categories = ["Segmentation"]
        self.parent.dependencies = []
        self.parent.contributors = ["SCONet developers"]
        self.parent.helpText = _("""
Automatic segmentation of the liver, kidneys, spleen and pancreas in abdominal CT with SCONet, a convolutional
occupancy network: the CT is turned into a cloud of edge points, encoded once into a 3D feature grid, and organ
labels can then be decoded on any grid. Choose the input CT and the organs, click <b>Segment organs</b>; move
<b>Output spacing</b> to recompute the segments at another resolution without re-encoding.
See the <a href="https://github.com/sconet/SlicerSCONet">extension documentation</a>.
""")
        self.parent.acknowledgementText = _("""
SCONet is based on convolutional occupancy networks for multi-organ segmentation of abdominal CT.
The bundled model is trained on synthetic phantoms: it demonstrates the method and is not for clinical use.
""")


#
# SCONetSegmentationParameterNode
#


@parameterNodeWrapper
class SCONetSegmentationParameterNode:
    """Everything the user chose (saved with the scene).

    inputVolume - CT to segment (Hounsfield units).
    outputSegmentation - segmentation receiving one segment per organ; created on first run if empty.
    liver, kidneys, spleen, pancreas - organs to write (names of ``SCONetLib.labels.ORGANS``).
    device - "auto" (CUDA if available), "cpu" or "cuda".
    outputSpacingMm - isotropic output spacing (mm); at or below the input's finest spacing: the input grid.
    weightsPath - SCONet checkpoint; empty: the bundled model.
    showUncertainty - also compute the normalised class entropy as a scalar volume.
    uncertaintyVolume - volume receiving the entropy (created on first run if empty).
    """

    inputVolume: vtkMRMLScalarVolumeNode
    outputSegmentation: vtkMRMLSegmentationNode
    liver: bool = True
    kidneys: bool = True
    spleen: bool = True
    pancreas: bool = True
    device: Annotated[str, Choice(list(DEVICE_CHOICES))] = "auto"
    outputSpacingMm: Annotated[float, WithinRange(MIN_OUTPUT_SPACING_MM, MAX_OUTPUT_SPACING_MM)] = MIN_OUTPUT_SPACING_MM
    weightsPath: pathlib.Path
    showUncertainty: bool = False
    uncertaintyVolume: vtkMRMLScalarVolumeNode


#
# SCONetSegmentationWidget
#


class SCONetSegmentationWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """GUI: mirrors the parameter node and starts/cancels logic jobs; holds no segmentation state itself."""

    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/SCONetSegmentation.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)

        self.logic = SCONetSegmentationLogic()

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)

        self.ui.segmentButton.connect("clicked(bool)", self.onSegmentButton)
        self.ui.cancelButton.connect("clicked(bool)", self.onCancelButton)
        self.ui.detectDevicesButton.connect("clicked(bool)", self.onDetectDevices)
        self.ui.outputSegmentationSelector.connect(
            "currentNodeChanged(vtkMRMLNode*)", self.ui.segmentationShow3DButton.setSegmentationNode)

        self._showRunning(False)
        self.initializeParameterNode()

    def cleanup(self) -> None:
        """Module closing or reloading: stop observing, ask a running job to stop."""
        self.removeObservers()
        if self.logic:
            self.logic.cancel()

    def enter(self) -> None:
        self.initializeParameterNode()

    def exit(self) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._updateGuiState)

    def onSceneStartClose(self, caller, event) -> None:
        self.logic.cancel()
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event) -> None:
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self) -> None:
        self.setParameterNode(self.logic.getParameterNode())
        if not self._parameterNode.inputVolume:
            firstVolumeNode = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")
            if firstVolumeNode:
                self._parameterNode.inputVolume = firstVolumeNode

    def setParameterNode(self, inputParameterNode: Optional[SCONetSegmentationParameterNode]) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._updateGuiState)
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            # Widgets carry a "SlicerParameterName" dynamic property in the .ui file.
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._updateGuiState)
            self._showDeviceDescriptions()
            self._updateGuiState()

    def _updateGuiState(self, caller=None, event=None) -> None:
        """Derived GUI state (slider range, spacing description, Segment button); re-segments on a new spacing."""
        p = self._parameterNode
        if not p:
            return
        inputVolume = p.inputVolume
        if inputVolume and inputVolume.GetImageData():
            finest = self.logic.finestSpacing(inputVolume)
            self.ui.outputSpacingSliderWidget.minimum = min(finest, MAX_OUTPUT_SPACING_MM)
            spacing = self.logic.outputSpacingFor(inputVolume, p.outputSpacingMm)
            self.ui.outputSpacingLabel.text = (
                _("input grid ({spacing} mm)").format(spacing=" × ".join(f"{s:.2g}" for s in inputVolume.GetSpacing()))
                if spacing is None else _("isotropic {spacing:.2f} mm").format(spacing=spacing))
        else:
            self.ui.outputSpacingLabel.text = ""
        organs = self._selectedOrgans()
        canRun = bool(inputVolume) and bool(organs) and not self.logic.isBusy()
        self.ui.segmentButton.enabled = canRun
        self.ui.segmentButton.toolTip = (
            _("Segment the selected organs") if canRun
            else _("Select an input volume and at least one organ") if not self.logic.isBusy()
            else _("A segmentation is running"))
        self._resegmentIfSpacingChanged()

    def _selectedOrgans(self) -> list[str]:
        return [organ.name for organ in ORGANS if self._parameterNode.getValue(organ.name)]

    def _showDeviceDescriptions(self) -> None:
        descriptions = self.logic.deviceDescriptions(detect=False)
        for index, choice in enumerate(DEVICE_CHOICES):
            self.ui.deviceComboBox.setItemText(index, descriptions[choice])
        self.ui.deviceStatusLabel.text = descriptions["summary"]

    def onDetectDevices(self) -> None:
        with slicer.util.tryWithErrorDisplay(_("Failed to detect compute devices."), waitCursor=True):
            self.logic.deviceDescriptions(detect=True)
            self._showDeviceDescriptions()

    def _showRunning(self, running: bool) -> None:
        self.ui.cancelButton.enabled = running
        self.ui.progressBar.visible = running
        if running:
            self.ui.progressBar.value = 0

    def onSegmentButton(self) -> None:
        with slicer.util.tryWithErrorDisplay(_("Failed to start the SCONet segmentation."), waitCursor=True):
            self.logic.installRequirements(self.resourcePath("requirements.txt"), askConfirmation=True)
            self._startSegmentation()

    def _startSegmentation(self) -> None:
        p = self._parameterNode
        self.ui.statusLabel.text = _("Starting…")
        self.logic.startProcessing(
            p.inputVolume, p.outputSegmentation, organs=self._selectedOrgans(),
            spacing=self.logic.outputSpacingFor(p.inputVolume, p.outputSpacingMm), device=p.device,
            weights=self.logic.weightsOrDefault(p.weightsPath), uncertainty=p.showUncertainty,
            uncertaintyVolume=p.uncertaintyVolume,
            progressCallback=self.onProgress, completedCallback=self.onCompleted)
        self._showRunning(True)
        self._updateGuiState()

    def onProgress(self, fraction: float, message: str) -> None:
        self.ui.progressBar.value = int(round(100 * fraction))
        self.ui.statusLabel.text = message

    def onCompleted(self, job: "SCONetSegmentationJob") -> None:
        self._showRunning(False)
        p = self._parameterNode
        if job.cancelled:
            self.ui.statusLabel.text = _("Cancelled: the segmentation was left unchanged.")
        elif job.error is not None:
            self.ui.statusLabel.text = _("Failed: the segmentation was left unchanged.")
            slicer.util.errorDisplay(_("SCONet segmentation failed:\n{error}").format(error=job.error))
        else:
            if p:
                p.outputSegmentation = job.outputs.segmentation
                if job.outputs.uncertaintyVolume is not None:
                    p.uncertaintyVolume = job.outputs.uncertaintyVolume
            notes = "\n".join(job.outputs.warnings)
            self.ui.statusLabel.text = _("Done in {seconds:.1f} s on {device}.").format(
                seconds=job.elapsedSeconds, device=job.outputs.deviceName) + ("\n" + notes if notes else "")
        self._updateGuiState()

    def onCancelButton(self) -> None:
        self.logic.cancel()
        self.ui.statusLabel.text = _("Cancelling…")

    def _resegmentIfSpacingChanged(self) -> None:
        """Re-segment from the cached feature grid when the chosen spacing differs from the shown result's."""
        p = self._parameterNode
        if not p or not p.inputVolume or not p.outputSegmentation or self.logic.isBusy():
            return
        spacing = self.logic.outputSpacingFor(p.inputVolume, p.outputSpacingMm)
        if self.logic.canResegment(p.inputVolume, p.outputSegmentation, spacing, p.device,
                                   self.logic.weightsOrDefault(p.weightsPath)):
            with slicer.util.tryWithErrorDisplay(_("Failed to re-segment at the new spacing.")):
                self._startSegmentation()


#
# SCONetSegmentationLogic
#


@dataclass
class SCONetSegmentationOutputs:
    """What a finished run produced (MRML nodes are in the scene)."""

    segmentation: object
    segmentIds: dict
    uncertaintyVolume: object = None
    warnings: list = field(default_factory=list)
    deviceName: str = ""


@dataclass
class _Request:
    """Everything the worker needs; no MRML object (the worker thread must not touch MRML)."""

    image: object            # sitk.Image to prepare, or None when the cached features are reused
    organs: tuple            # SCONetLib.labels.Organ, in ORGANS order
    spacing: Optional[float]
    uncertainty: bool
    segmenterKey: tuple      # (weights, device) of the segmenter to use
    preparedKey: tuple       # identity of the input volume content and geometry


@dataclass
class _Result:
    """Worker output: numpy arrays on the output grid (KJI) and its IJKToRAS."""

    ijkToRAS: np.ndarray                         # (4, 4) float64, voxel index -> RAS mm (volume's own frame)
    size: tuple                                  # (3,) voxels along i, j, k
    masks: dict                                  # organ name -> (uint8 (K, J, I) crop, (i0, j0, k0)) or None
    entropy: Optional[np.ndarray] = None         # float32 (K, J, I), 0 certain .. 1 uniform
    sameGridAsInput: bool = True
    warnings: list = field(default_factory=list)
    deviceName: str = ""


class SCONetSegmentationJob:
    """One segmentation run; the worker thread computes, the main thread writes MRML when it is done.

    Attributes read by callers: ``running``, ``cancelled``, ``error`` (exception or None), ``outputs``
    (:class:`SCONetSegmentationOutputs` after success), ``progress`` ((fraction, message)), ``elapsedSeconds``.
    """

    def __init__(self, progressCallback=None, completedCallback=None):
        self.progressCallback = progressCallback
        self.completedCallback = completedCallback
        self.cancelled = False
        self.error = None
        self.outputs = None
        self.result = None
        self.segmenter = None           # engine object used; None after a failed prepare
        self.elapsedSeconds = 0.0
        self._progress = (0.0, _("starting"))
        self._lock = threading.Lock()
        self._cancelRequested = threading.Event()
        self._thread = None
        self._finished = False
        self._startTime = time.monotonic()

    @property
    def running(self) -> bool:
        """True from the start of the worker until the completion callback has run."""
        return self._thread is not None and not self._finished

    @property
    def progress(self) -> tuple:
        with self._lock:
            return self._progress

    def cancel(self) -> None:
        """Ask the worker to stop at its next progress report (the output is then left untouched)."""
        self._cancelRequested.set()

    def reportProgress(self, fraction: float, message: str) -> None:
        """Progress callback handed to the engine (worker thread); raises ``Cancelled`` after ``cancel()``."""
        if self._cancelRequested.is_set():
            raise Cancelled("cancelled by the user")
        with self._lock:
            self._progress = (float(fraction), message)


class SCONetSegmentationLogic(ScriptedLoadableModuleLogic):
    """Segmentation of abdominal organs with SCONet; usable without the GUI.

    Parameters
    ----------
    segmenterFactory : callable(weights, device) -> segmenter, optional
        Creates the engine object (default ``SCONetLib.infer.Segmenter``, imported on first use since it
        imports torch). It must provide ``prepare(image, progress)``, ``segment(spacing, progress)`` and
        ``probabilities(spacing, progress)`` as ``SCONetLib.infer.Segmenter`` does.

    Examples
    --------
    In Slicer's Python console (blocking)::

        logic = SCONetSegmentationLogic()
        outputs = logic.process(getNode("CTLiver"), None, organs=["liver", "spleen"], spacing=2.0)
    """

    def __init__(self, segmenterFactory: Optional[Callable] = None) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        self._segmenterFactory = segmenterFactory
        self._segmenter = None
        self._segmenterKey = None
        self._preparedKey = None
        self._job = None
        self._deviceDescriptions = None

    def getParameterNode(self) -> SCONetSegmentationParameterNode:
        return SCONetSegmentationParameterNode(super().getParameterNode())

    # ------------------------------------------------------------------ inputs

    @staticmethod
    def volumeToImage(volumeNode):
        """SimpleITK image (LPS) of a scalar volume node: a copy of its voxels with its exact geometry.

        The voxel array is (K, J, I) as ``slicer.util.arrayFromVolume`` returns it; the geometry comes from the
        node's IJKToRAS matrix through ``Grid.from_ijk_to_ras`` (RAS -> LPS). The parent transform is not applied.
        """
        from SCONetLib.geometry import Grid

        SCONetSegmentationLogic._checkInputVolume(volumeNode)
        array = np.array(slicer.util.arrayFromVolume(volumeNode), copy=True)
        ijkToRAS = vtk.vtkMatrix4x4()
        volumeNode.GetIJKToRASMatrix(ijkToRAS)
        grid = Grid.from_ijk_to_ras(slicer.util.arrayFromVTKMatrix(ijkToRAS), array.shape[::-1])
        return grid.image_from_array(array)

    @staticmethod
    def _checkInputVolume(volumeNode) -> None:
        if volumeNode is None:
            raise ValueError("inputVolume is required (a scalar volume node), got None")
        if volumeNode.GetImageData() is None:
            raise ValueError(f"inputVolume {volumeNode.GetName()!r} has no image data (a volume node without voxels)")
        if volumeNode.GetImageData().GetNumberOfScalarComponents() != 1:
            raise ValueError(f"inputVolume {volumeNode.GetName()!r} has "
                             f"{volumeNode.GetImageData().GetNumberOfScalarComponents()} components per voxel; "
                             "expected a scalar CT volume")

    @staticmethod
    def finestSpacing(volumeNode) -> float:
        """Smallest voxel spacing of a volume node (mm)."""
        return float(min(volumeNode.GetSpacing()))

    @classmethod
    def outputSpacingFor(cls, volumeNode, spacingMm: float) -> Optional[float]:
        """Spacing argument for the segmenter: ``None`` (input grid) at or below the finest input spacing."""
        return None if spacingMm <= cls.finestSpacing(volumeNode) + 1e-6 else float(spacingMm)

    @staticmethod
    def weightsOrDefault(weightsPath) -> Optional[pathlib.Path]:
        """A checkpoint path, or ``None`` (the bundled model) for an empty path."""
        if weightsPath is None or str(weightsPath) in ("", "."):
            return None
        return pathlib.Path(weightsPath)

    @staticmethod
    def _checkParentTransform(inputVolume, outputSegmentation) -> None:
        """Refuse non-linear parent transforms and an output that would move other segments."""
        parent = inputVolume.GetParentTransformNode()
        if parent is not None and not parent.IsTransformToWorldLinear():
            raise ValueError(
                f"inputVolume {inputVolume.GetName()!r} is under the non-linear transform {parent.GetName()!r}; "
                "SCONet segments the voxels in the volume's own frame and can only follow a linear parent "
                "transform. Harden the transform on the volume (Data module: right-click > Harden transform) "
                "and run again")
        if outputSegmentation is None:
            return
        if outputSegmentation.GetTransformNodeID() != inputVolume.GetTransformNodeID() and any(
                not SCONetSegmentationLogic._isOwnSegment(outputSegmentation, i)
                for i in range(outputSegmentation.GetSegmentation().GetNumberOfSegments())):
            raise ValueError(
                f"outputSegmentation {outputSegmentation.GetName()!r} holds other segments and is under a "
                f"different parent transform than inputVolume {inputVolume.GetName()!r}; moving it would move "
                "those segments. Choose another output segmentation (or none to create one)")

    @staticmethod
    def _isOwnSegment(segmentationNode, index: int) -> bool:
        return segmentationNode.GetSegmentation().GetNthSegment(index).HasTag(ORGAN_TAG)

    @staticmethod
    def _organsFromNames(organs) -> tuple:
        from SCONetLib.labels import organ_by_name

        if organs is None:
            return ORGANS
        if isinstance(organs, str):
            raise TypeError(f"organs must be a list of organ names, got the string {organs!r}")
        chosen = {organ_by_name(name).name for name in organs}
        if not chosen:
            raise ValueError(f"organs must name at least one of {[o.name for o in ORGANS]}, got an empty list")
        return tuple(organ for organ in ORGANS if organ.name in chosen)

    @staticmethod
    def _checkSpacing(spacing) -> Optional[float]:
        if spacing is None:
            return None
        if isinstance(spacing, bool) or not isinstance(spacing, (int, float)) or not np.isfinite(spacing) \
                or spacing <= 0:
            raise ValueError(f"spacing must be None (input grid) or a positive number of mm, got {spacing!r}")
        return float(spacing)

    @staticmethod
    def _checkDevice(device: str) -> str:
        if not isinstance(device, str) or not (device in DEVICE_CHOICES or device.startswith("cuda:")):
            raise ValueError(f"device must be one of {list(DEVICE_CHOICES)} or 'cuda:N', got {device!r}")
        return device

    @staticmethod
    def _preparedKeyOf(volumeNode) -> tuple:
        """Identity of what ``prepare`` depends on: node, voxel buffer and its modified time, IJKToRAS."""
        ijkToRAS = vtk.vtkMatrix4x4()
        volumeNode.GetIJKToRASMatrix(ijkToRAS)
        image = volumeNode.GetImageData()
        return (volumeNode.GetID(), id(image), image.GetMTime(),
                tuple(slicer.util.arrayFromVTKMatrix(ijkToRAS).ravel()))

    def isPrepared(self, inputVolume, device: str = "auto", weights=None) -> bool:
        """Whether the feature grid of ``inputVolume`` (as it is now) is cached for this device and model."""
        return (self._segmenter is not None and self._segmenterKey == (self.weightsOrDefault(weights), device)
                and self._preparedKey == self._preparedKeyOf(inputVolume))

    def canResegment(self, inputVolume, outputSegmentation, spacing, device="auto", weights=None) -> bool:
        """True if ``outputSegmentation`` holds a result for ``inputVolume`` at another spacing and the features
        are cached, so a new spacing only needs the decoder."""
        if not self.isPrepared(inputVolume, device, weights) or self.isBusy():
            return False
        last = outputSegmentation.GetAttribute(SPACING_ATTRIBUTE)
        return last is not None and last != self._spacingText(spacing)

    @staticmethod
    def _spacingText(spacing: Optional[float]) -> str:
        return "input" if spacing is None else repr(float(spacing))

    # ------------------------------------------------------------------ running

    def isBusy(self) -> bool:
        return self._job is not None and self._job.running

    def cancel(self) -> None:
        """Cancel the running job, if any (its output is left untouched)."""
        if self._job is not None:
            self._job.cancel()

    def process(self, inputVolume, outputSegmentation=None, organs=None, spacing=None, device="auto",
                weights=None, progressCallback=None, uncertainty=False, uncertaintyVolume=None,
                createSurfaces=True) -> SCONetSegmentationOutputs:
        """Segment ``inputVolume`` and wait for the result (for scripts and tests).

        Parameters
        ----------
        inputVolume : vtkMRMLScalarVolumeNode
            CT in Hounsfield units; a linear parent transform is followed, a non-linear one is refused.
        outputSegmentation : vtkMRMLSegmentationNode or None
            Receives one segment per organ (segments of a previous SCONet run are replaced, others are kept);
            ``None`` creates a node named after the input.
        organs : list of str, optional
            Names from ``SCONetLib.labels.ORGANS`` (``"liver"``, ``"kidneys"``, ``"spleen"``, ``"pancreas"``);
            default all.
        spacing : float, optional
            Isotropic output spacing (mm) over the input's physical box; ``None``: the input grid itself.
        device : str
            ``"auto"``, ``"cpu"``, ``"cuda"`` or ``"cuda:N"``.
        weights : path, optional
            SCONet checkpoint; ``None``: the bundled model.
        progressCallback : callable(fraction, message), optional
            Called in this thread; may raise ``SCONetLib.progress.Cancelled`` to stop (nothing is written).
        uncertainty : bool
            Also write the normalised class entropy (0 certain .. 1 uniform) into a scalar volume.
        uncertaintyVolume : vtkMRMLScalarVolumeNode, optional
            Volume receiving the entropy; ``None`` with ``uncertainty`` creates one.
        createSurfaces : bool
            Create the closed-surface representation (3D display) after writing.

        Raises
        ------
        ValueError, TypeError
            Invalid arguments, non-linear parent transform, missing or unusable weights, non-CT input.
        SCONetLib.progress.Cancelled
            If ``progressCallback`` cancelled the run (the segmentation is unchanged).
        """
        if self.isBusy():
            raise RuntimeError("a SCONet segmentation is already running; cancel it or wait until it finishes")
        job = SCONetSegmentationJob(progressCallback)
        request = self._makeRequest(job, inputVolume, outputSegmentation, organs, spacing, device, weights,
                                    uncertainty)

        def forward(fraction, message):
            job.reportProgress(fraction, message)
            if progressCallback is not None:
                progressCallback(fraction, message)

        try:
            job.result = self._compute(job, request, forward)
        finally:
            self._keepPrepared(job, request)
        return self._apply(inputVolume, outputSegmentation, job.result, request, uncertaintyVolume, createSurfaces)

    def startProcessing(self, inputVolume, outputSegmentation=None, organs=None, spacing=None, device="auto",
                        weights=None, uncertainty=False, uncertaintyVolume=None, createSurfaces=True,
                        progressCallback=None, completedCallback=None) -> SCONetSegmentationJob:
        """Start a segmentation in a background thread and return at once (for the GUI).

        Arguments as for :meth:`process`. ``progressCallback(fraction, message)`` and ``completedCallback(job)``
        are called on the main thread (from a ``qt.QTimer``); when ``completedCallback`` runs, either
        ``job.outputs`` is set (segments written), or ``job.cancelled`` / ``job.error`` tell why nothing was
        written. Only one job runs at a time.
        """
        if self.isBusy():
            raise RuntimeError("a SCONet segmentation is already running; cancel it or wait until it finishes")
        job = SCONetSegmentationJob(progressCallback, completedCallback)
        request = self._makeRequest(job, inputVolume, outputSegmentation, organs, spacing, device, weights,
                                    uncertainty)
        context = (inputVolume, outputSegmentation, request, uncertaintyVolume, createSurfaces)

        def work():
            try:
                job.result = self._compute(job, request, job.reportProgress)
            except Cancelled:
                job.cancelled = True
            except Exception as error:  # reported to the main thread, which shows it
                logger.exception("SCONet segmentation failed")
                job.error = error

        self._job = job
        job._thread = threading.Thread(target=work, name="SCONetSegmentation", daemon=True)
        job._thread.start()
        qt.QTimer.singleShot(POLL_INTERVAL_MS, lambda: self._poll(job, context))
        return job

    def _poll(self, job: SCONetSegmentationJob, context: tuple) -> None:
        """Main thread: forward progress; when the worker is done, write the result into MRML."""
        if job.progressCallback is not None:
            job.progressCallback(*job.progress)
        if job._thread.is_alive():
            qt.QTimer.singleShot(POLL_INTERVAL_MS, lambda: self._poll(job, context))
            return
        inputVolume, outputSegmentation, request, uncertaintyVolume, createSurfaces = context
        self._keepPrepared(job, request)
        if job.result is not None and not job.cancelled and job.error is None:
            try:
                job.outputs = self._apply(inputVolume, outputSegmentation, job.result, request, uncertaintyVolume,
                                          createSurfaces)
                if job.progressCallback is not None:
                    job.progressCallback(1.0, _("done"))
            except Exception as error:
                logger.exception("writing the SCONet segmentation failed")
                job.error = error
        job.elapsedSeconds = time.monotonic() - job._startTime
        job._finished = True
        if job.completedCallback is not None:
            job.completedCallback(job)

    def _makeRequest(self, job, inputVolume, outputSegmentation, organs, spacing, device, weights,
                     uncertainty) -> _Request:
        """Validate on the main thread and snapshot what the worker needs (no MRML crosses to the worker)."""
        self._checkInputVolume(inputVolume)
        organTuple = self._organsFromNames(organs)
        spacing = self._checkSpacing(spacing)
        device = self._checkDevice(device)
        self._checkParentTransform(inputVolume, outputSegmentation)
        segmenterKey = (self.weightsOrDefault(weights), device)
        preparedKey = self._preparedKeyOf(inputVolume)
        reuse = self._segmenterKey == segmenterKey and self._preparedKey == preparedKey
        image = None if reuse else self.volumeToImage(inputVolume)
        if not reuse:
            self._preparedKey = None   # the cached features no longer match
        job.segmenter = self._segmenter if self._segmenterKey == segmenterKey else None
        return _Request(image, organTuple, spacing, bool(uncertainty), segmenterKey, preparedKey)

    def _keepPrepared(self, job: SCONetSegmentationJob, request: _Request) -> None:
        """Cache the job's segmenter if its prepare step completed (even if a later step failed)."""
        segmenter = job.segmenter
        if segmenter is not None and getattr(segmenter, "is_prepared", True):
            self._segmenter, self._segmenterKey, self._preparedKey = segmenter, request.segmenterKey, \
                request.preparedKey

    def _newSegmenter(self, weights, device):
        if self._segmenterFactory is not None:
            return self._segmenterFactory(weights, device)
        from SCONetLib.infer import Segmenter

        return Segmenter(weights=weights, device=device)

    def _compute(self, job: SCONetSegmentationJob, request: _Request, progress) -> _Result:
        """Worker: prepare (if needed), segment, optional entropy; returns numpy arrays only."""
        import SimpleITK as sitk

        from SCONetLib.geometry import Grid

        # Engine warnings (non-CT intensities, field of view larger than the model's box) are shown to the user.
        # catch_warnings swaps the warnings module's global state; the main thread only waits meanwhile.
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            segmenter = job.segmenter
            if request.image is not None:
                if segmenter is None:
                    progress(0.0, "loading the SCONet model")
                    segmenter = self._newSegmenter(*request.segmenterKey)
                job.segmenter = None
                segmenter.prepare(request.image, progress=sub_progress(progress, 0.0, 0.6))
                job.segmenter = segmenter
                start = 0.6
            else:
                start = 0.0
            stop = 0.85 if request.uncertainty else 0.95
            labelImage = segmenter.segment(spacing=request.spacing, progress=sub_progress(progress, start, stop))
            entropy = None
            if request.uncertainty:
                _probabilities, entropyImage = segmenter.probabilities(
                    spacing=request.spacing, progress=sub_progress(progress, stop, 0.95))
                del _probabilities
                entropy = sitk.GetArrayFromImage(entropyImage).astype(np.float32, copy=False)
            labels = sitk.GetArrayFromImage(labelImage)
            grid = Grid.of(labelImage)
            masks = {organ.name: self._cropMask(labels == organ.label) for organ in request.organs}
            progress(0.95, "writing the segments")
        deviceName = str(getattr(segmenter, "device_name", getattr(segmenter, "device", "")))
        return _Result(grid.ijk_to_ras, grid.size, masks, entropy, request.spacing is None,
                       [str(w.message) for w in caught], deviceName)

    @staticmethod
    def _cropMask(mask: np.ndarray):
        """(uint8 crop, (i0, j0, k0)) of a (K, J, I) boolean mask's bounding box, or None if it is empty."""
        if not mask.any():
            return None
        bounds = []
        for axis in range(3):
            present = np.flatnonzero(mask.any(axis=tuple(a for a in range(3) if a != axis)))
            bounds.append((present[0], present[-1] + 1))
        (k0, k1), (j0, j1), (i0, i1) = bounds
        return np.ascontiguousarray(mask[k0:k1, j0:j1, i0:i1], dtype=np.uint8), (int(i0), int(j0), int(k0))

    # ------------------------------------------------------------------ writing MRML (main thread)

    @staticmethod
    def _orientedImage(ijkToRAS: np.ndarray, extent, voxels: Optional[np.ndarray] = None):
        """vtkOrientedImageData on the output grid: ``extent`` (i0, i1, j0, j1, k0, k1), optional (K, J, I) voxels."""
        image = slicer.vtkOrientedImageData()
        image.SetExtent(*extent)
        image.SetImageToWorldMatrix(slicer.util.vtkMatrixFromArray(ijkToRAS))
        if voxels is not None:
            image.GetPointData().SetScalars(numpy_support.numpy_to_vtk(voxels.ravel(), deep=True,
                                                                       array_type=vtk.VTK_UNSIGNED_CHAR))
        return image

    def _apply(self, inputVolume, outputSegmentation, result: _Result, request: _Request, uncertaintyVolume,
               createSurfaces: bool) -> SCONetSegmentationOutputs:
        """Write the segments (replacing this module's previous ones) and the optional entropy volume.

        New segments are added first and the previous SCONet segments removed only after every new one was
        added, so a failure leaves the segmentation as it was (the segments added so far are removed).
        """
        from SCONetLib.io import terminology_entry

        self._checkParentTransform(inputVolume, outputSegmentation)
        if outputSegmentation is not None and outputSegmentation.GetScene() is not slicer.mrmlScene:
            raise RuntimeError("the output segmentation was removed from the scene while SCONet was running")
        parentTransformID = inputVolume.GetTransformNodeID()
        images = []
        for organ in request.organs:
            crop = result.masks[organ.name]
            if crop is None:
                images.append((organ, None))
                continue
            voxels, (i0, j0, k0) = crop
            extent = (i0, i0 + voxels.shape[2] - 1, j0, j0 + voxels.shape[1] - 1, k0, k0 + voxels.shape[0] - 1)
            images.append((organ, self._orientedImage(result.ijkToRAS, extent, voxels)))

        created = outputSegmentation is None
        if created:
            outputSegmentation = slicer.mrmlScene.AddNewNodeByClass(
                "vtkMRMLSegmentationNode", f"{inputVolume.GetName()} SCONet")
        segmentation = outputSegmentation.GetSegmentation()
        previous = [segmentation.GetNthSegmentID(i) for i in range(segmentation.GetNumberOfSegments())
                    if self._isOwnSegment(outputSegmentation, i)]
        added = {}
        with slicer.util.NodeModify(outputSegmentation):
            try:
                if segmentation.GetNumberOfSegments() == 0:
                    outputSegmentation.SetSourceRepresentationToBinaryLabelmap()
                for organ, image in images:
                    color = tuple(c / 255.0 for c in organ.color)
                    if image is None:
                        logger.warning("SCONet found no %s in %s", organ.name, inputVolume.GetName())
                        segmentId = segmentation.AddEmptySegment("", organ.display_name, color)
                    else:
                        segmentId = outputSegmentation.AddSegmentFromBinaryLabelmapRepresentation(
                            image, organ.display_name, color, "")
                    if not segmentId:
                        raise RuntimeError(f"Slicer refused the {organ.name} segment")
                    added[organ.name] = segmentId
                    segment = segmentation.GetSegment(segmentId)
                    segment.SetTag(segment.GetTerminologyEntryTagName(), terminology_entry(organ))
                    segment.SetTag(ORGAN_TAG, organ.name)
            except Exception:
                for segmentId in added.values():
                    outputSegmentation.RemoveSegment(segmentId)
                if created:
                    slicer.mrmlScene.RemoveNode(outputSegmentation)
                raise
            for segmentId in previous:
                outputSegmentation.RemoveSegment(segmentId)
            outputSegmentation.SetAndObserveTransformNodeID(parentTransformID)
            self._setReferenceGeometry(inputVolume, outputSegmentation, result)
            outputSegmentation.SetAttribute(SPACING_ATTRIBUTE, self._spacingText(request.spacing))
        outputSegmentation.CreateDefaultDisplayNodes()
        self._placeBesideInput(inputVolume, outputSegmentation)
        if createSurfaces:
            outputSegmentation.CreateClosedSurfaceRepresentation()

        if result.entropy is not None:
            if uncertaintyVolume is None:
                uncertaintyVolume = slicer.mrmlScene.AddNewNodeByClass(
                    "vtkMRMLScalarVolumeNode", f"{inputVolume.GetName()} SCONet uncertainty")
            slicer.util.updateVolumeFromArray(uncertaintyVolume, result.entropy)
            uncertaintyVolume.SetIJKToRASMatrix(slicer.util.vtkMatrixFromArray(result.ijkToRAS))
            uncertaintyVolume.SetAndObserveTransformNodeID(parentTransformID)
            uncertaintyVolume.CreateDefaultDisplayNodes()
        return SCONetSegmentationOutputs(outputSegmentation, added,
                                         uncertaintyVolume if result.entropy is not None else None,
                                         result.warnings, result.deviceName)

    def _setReferenceGeometry(self, inputVolume, outputSegmentation, result: _Result) -> None:
        """Reference geometry = the output grid: the input volume itself if unchanged, else the resampled grid."""
        if result.sameGridAsInput:
            outputSegmentation.SetReferenceImageGeometryParameterFromVolumeNode(inputVolume)
            return
        size = result.size
        grid = self._orientedImage(result.ijkToRAS, (0, size[0] - 1, 0, size[1] - 1, 0, size[2] - 1))
        outputSegmentation.GetSegmentation().SetConversionParameter(
            slicer.vtkSegmentationConverter.GetReferenceImageGeometryParameterName(),
            slicer.vtkSegmentationConverter.SerializeImageGeometry(grid))
        outputSegmentation.SetNodeReferenceID(outputSegmentation.GetReferenceImageGeometryReferenceRole(), None)

    @staticmethod
    def _placeBesideInput(inputVolume, outputSegmentation) -> None:
        """Put the segmentation in the same subject-hierarchy folder (study) as the input volume."""
        shNode = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(slicer.mrmlScene)
        studyItem = shNode.GetItemParent(shNode.GetItemByDataNode(inputVolume))
        shNode.SetItemParent(shNode.GetItemByDataNode(outputSegmentation), studyItem)

    # ------------------------------------------------------------------ devices and dependencies

    def deviceDescriptions(self, detect: bool = False) -> dict:
        """Labels for the device choices and a one-line summary; ``detect`` imports torch to find devices."""
        if detect and self._deviceDescriptions is None:
            devices = self.availableDevices()
            cuda = [d for d in devices if d.startswith("cuda")]
            self._deviceDescriptions = {
                "auto": _("auto: {device}").format(device=cuda[0] if cuda else "cpu"),
                "cpu": "cpu",
                "cuda": _("cuda: {device}").format(device=cuda[0]) if cuda else _("cuda (not available)"),
                "summary": _("Detected: {devices}").format(devices=", ".join(devices)),
            }
        if self._deviceDescriptions is not None:
            return self._deviceDescriptions
        return {"auto": "auto", "cpu": "cpu", "cuda": "cuda",
                "summary": _("Devices not detected yet (click Detect; needs PyTorch).")}

    @staticmethod
    def availableDevices() -> list:
        """Compute devices, e.g. ``["cpu", "cuda:0 (NVIDIA …)"]`` (imports torch)."""
        import SCONetLib.infer as infer

        if hasattr(infer, "available_devices"):
            return list(infer.available_devices())
        import torch

        devices = ["cpu"]
        if torch.cuda.is_available():
            devices += [f"cuda:{i} ({torch.cuda.get_device_name(i)})" for i in range(torch.cuda.device_count())]
        return devices

    @staticmethod
    def installRequirements(requirementsPath, askConfirmation: bool = True) -> None:
        """Make sure torch and the engine's other packages are importable, offering to install them.

        torch comes from the PyTorch extension (``PyTorchUtils``) so the wheel matches the GPU driver; the other
        packages (``Resources/requirements.txt``) through ``slicer.packaging.pip_ensure`` when this Slicer has it,
        else ``slicer.util.pip_install`` after a confirmation.

        Raises
        ------
        RuntimeError
            If the PyTorch extension is missing, the user declines, or an installation fails (e.g. offline).
        """
        if importlib.util.find_spec("torch") is None:
            try:
                import PyTorchUtils
            except ModuleNotFoundError as error:
                raise RuntimeError(
                    "SCONet needs PyTorch, which is installed by the 'PyTorch' extension. Install 'PyTorch' from "
                    "the Extensions Manager, restart Slicer and try again.") from error
            try:
                torch = PyTorchUtils.PyTorchUtilsLogic().installTorch(
                    askConfirmation=askConfirmation, torchVersionRequirement=TORCH_REQUIREMENT)
            except Exception as error:
                raise RuntimeError(
                    f"Installing PyTorch failed ({error}). Check the internet connection (or proxy settings) "
                    "and try again, or install it from the 'PyTorch Utils' module.") from error
            if torch is None:
                raise RuntimeError("PyTorch was not installed, so SCONet cannot run. Click 'Segment organs' again "
                                   "to be asked again, or install it from the 'PyTorch Utils' module.")

        from packaging.requirements import Requirement

        with open(requirementsPath) as requirementsFile:
            lines = [line.strip() for line in requirementsFile]
        requirements = [Requirement(line) for line in lines if line and not line.startswith(("#", "-"))]
        try:
            if hasattr(slicer, "packaging") and hasattr(slicer.packaging, "pip_ensure"):
                slicer.packaging.pip_ensure(requirements, requester="SCONet")
                return
            missing = [str(r) for r in requirements if not SCONetSegmentationLogic._isInstalled(r)]
            if not missing:
                return
            if askConfirmation and not slicer.util.confirmOkCancelDisplay(
                    _("SCONet needs these Python packages, which will be downloaded and installed now:\n{packages}")
                    .format(packages="\n".join(missing)), _("Install Python packages")):
                raise RuntimeError(f"the Python packages {missing} are required and were not installed")
            slicer.util.pip_install(" ".join(missing))
        except RuntimeError:
            raise
        except Exception as error:
            raise RuntimeError(
                f"Installing the Python packages {[str(r) for r in requirements]} failed ({error}). Check the "
                "internet connection (or proxy settings), or install them from Slicer's Python console with "
                "slicer.util.pip_install(...).") from error

    @staticmethod
    def _isInstalled(requirement) -> bool:
        import importlib.metadata

        try:
            return requirement.specifier.contains(importlib.metadata.version(requirement.name), prereleases=True)
        except importlib.metadata.PackageNotFoundError:
            return False


#
# SCONetSegmentationTest
#


class SCONetSegmentationTest(ScriptedLoadableModuleTest):
    """Self-test in Slicer: a synthetic phantom stored flipped and oblique, segmented with the bundled model."""

    #: Phantom seed whose grid is stored with flipped i and j axes and tilted by about 5 degrees.
    PHANTOM_SEED = 10
    #: Lowest Dice of each organ against the phantom's own labels. The bundled phantom-trained model scores
    #: 0.82 (pancreas) to 0.95 (liver) on this phantom with SCONetLib alone; 0.7 leaves room for platform noise
    #: while still failing on a misplaced, flipped or missing organ.
    MIN_DICE = 0.7

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_phantom_segmentation()

    @staticmethod
    def segmentMaskOnVolumeGrid(segmentationNode, segmentId, volumeNode) -> np.ndarray:
        """Segment resampled (nearest neighbour) onto a volume's grid: bool (K, J, I), both nodes' transforms used."""
        labelmap = slicer.vtkOrientedImageData()
        if not segmentationNode.GetBinaryLabelmapRepresentation(segmentId, labelmap):
            raise ValueError(f"segment {segmentId!r} has no binary labelmap")
        dims = volumeNode.GetImageData().GetDimensions()
        if labelmap.GetNumberOfPoints() == 0:
            return np.zeros(dims[::-1], dtype=bool)
        segment = segmentationNode.GetSegmentation().GetSegment(segmentId)
        k, j, i = np.meshgrid(*(np.arange(n) for n in dims[::-1]), indexing="ij")
        ijk = np.stack([i.ravel(), j.ravel(), k.ravel(), np.ones(i.size)])
        test = SCONetSegmentationTest
        volumeToWorld = test._nodeToWorld(volumeNode) @ test._matrix(volumeNode.GetIJKToRASMatrix)
        worldToLabelmap = np.linalg.inv(test._nodeToWorld(segmentationNode)
                                        @ test._matrix(labelmap.GetImageToWorldMatrix))
        index = np.rint((worldToLabelmap @ volumeToWorld @ ijk)[:3]).astype(np.int64)
        extent = labelmap.GetExtent()
        voxels = numpy_support.vtk_to_numpy(labelmap.GetPointData().GetScalars()).reshape(
            labelmap.GetDimensions()[::-1])
        low, high = np.array(extent[0::2])[:, None], np.array(extent[1::2])[:, None]
        inside = np.all((index >= low) & (index <= high), axis=0)
        mask = np.zeros(ijk.shape[1], dtype=bool)
        local = index[:, inside] - low
        mask[inside] = voxels[local[2], local[1], local[0]] == segment.GetLabelValue()
        return mask.reshape(dims[::-1])

    @staticmethod
    def _matrix(getter) -> np.ndarray:
        matrix = vtk.vtkMatrix4x4()
        getter(matrix)
        return slicer.util.arrayFromVTKMatrix(matrix)

    @staticmethod
    def _nodeToWorld(node) -> np.ndarray:
        parent = node.GetParentTransformNode()
        return np.eye(4) if parent is None else SCONetSegmentationTest._matrix(parent.GetMatrixTransformToWorld)

    def test_phantom_segmentation(self):
        """Bundled model on a phantom: standard segments on the input grid, Dice of every organ above MIN_DICE."""
        if importlib.util.find_spec("torch") is None:
            self.skipTest("PyTorch is not installed (install the PyTorch extension)")
        import SimpleITK as sitk

        from SCONetLib.checkpoint import default_weights_path
        from SCONetLib.geometry import Grid
        from SCONetLib.metrics import dice_of_masks
        from SCONetLib.phantom import make_phantom

        try:
            default_weights_path()
        except FileNotFoundError as error:
            self.skipTest(str(error))
        self.delayDisplay("Creating a phantom")
        ct, truth = make_phantom(self.PHANTOM_SEED, size=(64, 64, None))
        ijkToRAS = Grid.of(ct).ijk_to_ras
        directionsLPS = np.reshape(ct.GetDirection(), (3, 3))
        self.assertTrue(np.any(np.diag(directionsLPS) < 0) and np.abs(directionsLPS - np.diag(np.diag(directionsLPS)))
                        .max() > 0.01, "the phantom grid should be stored flipped and oblique")
        volume = slicer.util.addVolumeFromArray(sitk.GetArrayFromImage(ct), ijkToRAS=ijkToRAS, name="phantom")
        truthLabels = sitk.GetArrayFromImage(truth)

        self.delayDisplay("Segmenting")
        outputs = SCONetSegmentationLogic().process(volume, None, device="cpu")
        segmentation = outputs.segmentation
        self.assertEqual(sorted(segmentation.GetSegmentation().GetSegment(i).GetName()
                                for i in outputs.segmentIds.values()), sorted(o.display_name for o in ORGANS))
        self.assertIs(segmentation.GetNodeReference(segmentation.GetReferenceImageGeometryReferenceRole()), volume)
        for organ in ORGANS:
            segmentId = outputs.segmentIds[organ.name]
            labelmap = slicer.vtkOrientedImageData()
            if segmentation.GetBinaryLabelmapRepresentation(segmentId, labelmap):
                np.testing.assert_allclose(self._matrix(labelmap.GetImageToWorldMatrix), ijkToRAS, atol=1e-6)
            mask = self.segmentMaskOnVolumeGrid(segmentation, segmentId, volume)
            score = dice_of_masks(mask, truthLabels == organ.label)
            self.assertGreaterEqual(score, self.MIN_DICE, f"{organ.name}: Dice {score:.3f}")
        self.delayDisplay("Test passed")
