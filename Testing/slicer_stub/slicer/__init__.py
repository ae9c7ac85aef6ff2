"""Stand-in for 3D Slicer's ``slicer`` package (see ../README.md): MRML classes, ``mrmlScene``, ``app``.

Importing it makes a fresh scene; ``app.processEvents()`` runs due ``qt.QTimer.singleShot`` callbacks.
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


class _Application:
    """The few ``slicer.app`` members SCONet touches (``qSlicerApplication``)."""

    def __init__(self):
        self._testing = True

    def testingEnabled(self):
        return self._testing

    def processEvents(self):
        qt._process_due_timers()


mrmlScene = vtkMRMLScene()
app = _Application()
modules = types.SimpleNamespace()
selfTests = {}
