"""Stand-in for 3D Slicer's ``slicer`` package (see ../README.md): MRML classes and widgets, ``mrmlScene``, ``app``.

Importing it makes a fresh scene; ``app.processEvents()`` runs the ``qt.QTimer`` callbacks that are due.
``app.majorVersion`` / ``app.minorVersion`` choose version-dependent behaviour (``connectGui``'s return value).
"""
from __future__ import annotations

import types

import qt

from ._mrml import (  # noqa: F401  (re-exported under their Slicer names)
    vtkMRMLGridTransformNode,
    vtkMRMLLabelMapVolumeNode,
    vtkMRMLLinearTransformNode,
    vtkMRMLNode,
    vtkMRMLScalarVolumeNode,
    vtkMRMLScene,
    vtkMRMLScriptedModuleNode,
    vtkMRMLSegmentationNode,
    vtkMRMLSubjectHierarchyNode,
    vtkMRMLTransformableNode,
    vtkMRMLTransformNode,
    vtkMRMLVectorVolumeNode,
    vtkMRMLVolumeNode,
    vtkOrientedImageData,
    vtkSegment,
    vtkSegmentation,
    vtkSegmentationConverter,
)
from ._widgets import (  # noqa: F401
    qMRMLNodeComboBox,
    qMRMLSegmentationShow3DButton,
    qMRMLWidget,
    qSlicerScriptedLoadableModuleWidget,
)


class _Application:
    """The few ``slicer.app`` members SCONet touches (``qSlicerApplication``)."""

    def __init__(self):
        self._testing = True
        self.majorVersion = 5
        self.minorVersion = 8

    def testingEnabled(self):
        return self._testing

    def processEvents(self):
        qt._process_due_timers()


mrmlScene = vtkMRMLScene()
app = _Application()
modules = types.SimpleNamespace()
selfTests = {}

from . import util  # noqa: E402,F401  (loaded at startup in Slicer)
