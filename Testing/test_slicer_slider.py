"""Widget-level stand-in test of the Output spacing slider: a new spacing re-segments from the cached features.

The widget of SCONetSegmentation is driven the way Slicer drives it: its parameter node's ModifiedEvent calls
``_updateGuiState`` (what ``setParameterNode`` registers), the Segment button calls ``_startSegmentation``, and the
event loop of the stand-in (``slicer.app.processEvents``) delivers the background job's completion. The .ui widgets
are plain attribute holders (the stand-in has no Qt). The engine is test_slicer_module's FakeSegmenter, which
records every call, so "decoder only" is checked by counting ``prepare`` calls.
"""
from __future__ import annotations

import time
from types import SimpleNamespace

import pytest
import vtk

import test_slicer_module as stand_in          # puts the Slicer stand-in and the module on sys.path
from test_slicer_module import FakeSegmenter, add_label_volume, blob_labels, matrix, oblique_flipped_ijk_to_ras

from SCONetLib.geometry import Grid

slicer = stand_in.slicer
module = stand_in.module


@pytest.fixture(autouse=True)
def scene(monkeypatch):
    fresh = slicer.vtkMRMLScene()
    monkeypatch.setattr(slicer, "mrmlScene", fresh)
    return fresh


def _widgets() -> SimpleNamespace:
    names = ("outputSpacingSliderWidget", "outputSpacingLabel", "segmentButton", "cancelButton", "progressBar",
             "statusLabel")
    return SimpleNamespace(**{name: SimpleNamespace(minimum=0.0, text="", enabled=True, toolTip="", visible=False,
                                                    value=0) for name in names})


def _widget(logic):
    """The module's widget around ``logic``, with its parameter node observed as ``setParameterNode`` does."""
    widget = module.SCONetSegmentationWidget.__new__(module.SCONetSegmentationWidget)
    slicer.util.VTKObservationMixin.__init__(widget)
    widget.logic, widget.ui = logic, _widgets()
    widget._parameterNode = logic.getParameterNode()
    widget.addObserver(widget._parameterNode, vtk.vtkCommand.ModifiedEvent, widget._updateGuiState)
    return widget


def _wait_until_idle(logic):
    deadline = time.monotonic() + 120
    while logic.isBusy() and time.monotonic() < deadline:
        slicer.app.processEvents()
        time.sleep(0.005)
    assert not logic.isBusy()
    slicer.app.processEvents()


def test_moving_the_slider_resegments_from_the_cached_features():
    made = []
    logic = module.SCONetSegmentationLogic(
        segmenterFactory=lambda weights, device: made.append(FakeSegmenter(weights, device)) or made[-1])
    volume = add_label_volume(blob_labels(), oblique_flipped_ijk_to_ras())
    widget = _widget(logic)
    parameters = widget._parameterNode
    parameters.inputVolume, parameters.device = volume, "cpu"
    assert widget.ui.outputSpacingLabel.text.startswith("input grid")

    widget._startSegmentation()                              # the Segment button
    _wait_until_idle(logic)
    segmentation = parameters.outputSegmentation
    assert segmentation is not None and made[0].calls == ["prepare", "segment"]
    assert segmentation.GetAttribute(module.SPACING_ATTRIBUTE) == "input"

    parameters.outputSpacingMm = 3.0                         # the slider: nothing else is clicked
    assert logic.isBusy() and widget.ui.outputSpacingLabel.text == "isotropic 3.00 mm"
    _wait_until_idle(logic)
    assert made[0].calls == ["prepare", "segment", "segment"]   # decoder only, same segmenter
    assert segmentation.GetAttribute(module.SPACING_ATTRIBUTE) == "3.0"
    expected = Grid.from_ijk_to_ras(matrix(volume.GetIJKToRASMatrix), volume.GetImageData().GetDimensions())
    assert widget.ui.statusLabel.text.startswith("Done")
    assert made[0].image.GetSize() == expected.size          # prepared once, on the input volume

    parameters.outputSpacingMm = 0.5                         # below the finest spacing: back to the input grid
    _wait_until_idle(logic)
    assert made[0].calls == ["prepare", "segment", "segment", "segment"] and len(made) == 1
    assert segmentation.GetAttribute(module.SPACING_ATTRIBUTE) == "input"

    parameters.outputSpacingMm = 0.6                         # still the input grid: nothing to recompute
    assert not logic.isBusy() and len(made[0].calls) == 4
