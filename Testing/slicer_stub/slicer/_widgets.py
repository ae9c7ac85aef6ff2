"""MRML widgets of the stand-in (``qMRMLWidget``, ``qMRMLNodeComboBox``, …): Qt stand-in widgets with a scene."""
from __future__ import annotations

from qt import QPushButton, QWidget


class qMRMLWidget(QWidget):
    """A widget with a scene; ``setMRMLScene`` emits ``mrmlSceneChanged`` (which ``.ui`` files connect to their
    node selectors)."""

    _signals = ("mrmlSceneChanged",)

    def __init__(self, parent=None):
        super().__init__(parent)
        self._scene = None

    def setMRMLScene(self, scene) -> None:
        self._scene = scene
        self.mrmlSceneChanged.emit(scene)

    def mrmlScene(self):
        return self._scene


class qSlicerScriptedLoadableModuleWidget(qMRMLWidget):
    """The panel a scripted module's widget lives in; ``isEntered`` is True while the module is shown."""

    def __init__(self, parent=None):
        super().__init__(parent)
        self.isEntered = False


class qMRMLNodeComboBox(qMRMLWidget):
    """Node selector: ``currentNode()`` (None once the node left the scene), ``setCurrentNode``,
    ``currentNodeChanged(vtkMRMLNode*)``."""

    _signals = ("currentNodeChanged", "currentNodeIDChanged")

    def __init__(self, parent=None):
        super().__init__(parent)
        self.nodeTypes = []
        self.showChildNodeTypes = True
        self.addEnabled = True
        self.removeEnabled = True
        self.noneEnabled = False
        self.editEnabled = False
        self.renameEnabled = False
        self.baseName = ""
        self.noneDisplay = ""
        self._node = None

    def currentNode(self):
        node = self._node
        return node if node is not None and node.GetScene() is self._scene else None

    @property
    def currentNodeID(self) -> str:
        node = self.currentNode()
        return node.GetID() if node is not None else ""

    def setCurrentNode(self, node) -> None:
        if node is not self.currentNode():
            self._node = node
            self.currentNodeChanged.emit(node)
            self.currentNodeIDChanged.emit(self.currentNodeID)


class qMRMLSegmentationShow3DButton(QPushButton):
    def __init__(self, parent=None):
        super().__init__(parent)
        self._segmentation = None

    def setSegmentationNode(self, node) -> None:
        self._segmentation = node

    def segmentationNode(self):
        return self._segmentation
