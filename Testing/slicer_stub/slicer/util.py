"""Stand-in for ``slicer.util``: the numpy/VTK bridges, ``.ui`` loading, dialogs (logged, answered as in testing
mode) and mixins.

Signatures follow Slicer's ``Base/Python/slicer/util.py``. Dialogs never block: as with ``--testing`` in Slicer,
``confirm*Display`` return the answer in ``confirmAnswer`` (default ``True``) and ``*Display`` only log.
"""
from __future__ import annotations

import contextlib
import logging

import numpy as np
import vtk
from vtk.util import numpy_support

#: What confirmOkCancelDisplay / confirmYesNoDisplay answer (tests may change it).
confirmAnswer = True


def arrayFromVolume(volumeNode):
    """Voxel array of a scalar volume node, (K, J, I), sharing memory with the node's vtkImageData."""
    if not volumeNode.IsA("vtkMRMLScalarVolumeNode") and not volumeNode.IsA("vtkMRMLVectorVolumeNode"):
        raise RuntimeError("Unsupported volume type: " + volumeNode.GetClassName())
    image = volumeNode.GetImageData()
    shape = tuple(reversed(image.GetDimensions()))
    components = image.GetNumberOfScalarComponents()
    if components > 1:
        shape = shape + (components,)
    return numpy_support.vtk_to_numpy(image.GetPointData().GetScalars()).reshape(shape)


def arrayFromVolumeModified(volumeNode):
    image = volumeNode.GetImageData()
    if image is not None and image.GetPointData().GetScalars() is not None:
        image.GetPointData().GetScalars().Modified()
    volumeNode.Modified()


def updateVolumeFromArray(volumeNode, narray):
    """Deep-copy a (K, J, I) or (K, J, I, C) array into the node's image data (reallocated to fit)."""
    vshape = tuple(reversed(narray.shape))
    if len(vshape) == 3:
        components = 1
    elif len(vshape) == 4:
        components, vshape = vshape[0], vshape[1:4]
    else:
        raise RuntimeError("Unsupported numpy array shape: " + str(narray.shape))
    image = volumeNode.GetImageData()
    if image is None:
        image = vtk.vtkImageData()
        volumeNode.SetAndObserveImageData(image)
    vtype = numpy_support.get_vtk_array_type(narray.dtype)
    if vtype == vtk.VTK_LONG_LONG:
        raise RuntimeError("Unsupported numpy array type: long long")
    image.SetDimensions(vshape)
    image.AllocateScalars(vtype, components)
    arrayFromVolume(volumeNode)[:] = narray
    volumeNode.StorableModified()
    volumeNode.Modified()
    volumeNode.InvokeEvent(volumeNode.ImageDataModifiedEvent, volumeNode)


def addVolumeFromArray(narray, ijkToRAS=None, name=None, nodeClassName=None):
    import slicer

    volumeNode = slicer.mrmlScene.AddNewNodeByClass(nodeClassName or "vtkMRMLScalarVolumeNode", name or "")
    if ijkToRAS is not None:
        if not isinstance(ijkToRAS, vtk.vtkMatrix4x4):
            ijkToRAS = vtkMatrixFromArray(ijkToRAS)
        volumeNode.SetIJKToRASMatrix(ijkToRAS)
    updateVolumeFromArray(volumeNode, narray)
    volumeNode.CreateDefaultDisplayNodes()
    return volumeNode


def arrayFromVTKMatrix(vmatrix):
    if isinstance(vmatrix, vtk.vtkMatrix4x4):
        size = 4
    elif isinstance(vmatrix, vtk.vtkMatrix3x3):
        size = 3
    else:
        raise RuntimeError("Input must be vtk.vtkMatrix3x3 or vtk.vtkMatrix4x4")
    narray = np.eye(size)
    vmatrix.DeepCopy(narray.ravel(), vmatrix)
    return narray


def updateVTKMatrixFromArray(vmatrix, narray):
    size = 4 if isinstance(vmatrix, vtk.vtkMatrix4x4) else 3
    if narray.shape != (size, size):
        raise RuntimeError(f"Input narray size must match output vmatrix size ({size}x{size})")
    vmatrix.DeepCopy(np.asarray(narray, dtype=np.float64).ravel())


def vtkMatrixFromArray(narray):
    narray = np.asarray(narray)
    if narray.shape == (4, 4):
        vmatrix = vtk.vtkMatrix4x4()
    elif narray.shape == (3, 3):
        vmatrix = vtk.vtkMatrix3x3()
    else:
        raise RuntimeError("Unsupported numpy array shape: " + str(narray.shape) + " expected (4,4)")
    updateVTKMatrixFromArray(vmatrix, narray)
    return vmatrix


class NodeModify:
    """``with NodeModify(node):`` batches the node's Modified events (StartModify / EndModify)."""

    def __init__(self, node):
        self.node = node

    def __enter__(self):
        self.wasModifying = self.node.StartModify()
        return self.node

    def __exit__(self, type, value, traceback):
        self.node.EndModify(self.wasModifying)


class VTKObservationMixin:
    def __init__(self):
        super().__init__()
        self.Observations = []

    def removeObservers(self, method=None):
        for o, e, m, g, t, p in list(self.Observations):
            if method == m or method is None:
                o.RemoveObserver(t)
                self.Observations.remove([o, e, m, g, t, p])

    def addObserver(self, object, event, method, group="none", priority=0.0):
        if self.hasObserver(object, event, method):
            return
        tag = object.AddObserver(event, method, priority)
        self.Observations.append([object, event, method, group, tag, priority])

    def removeObserver(self, object, event, method):
        for o, e, m, g, t, p in list(self.Observations):
            if o == object and e == event and m == method:
                o.RemoveObserver(t)
                self.Observations.remove([o, e, m, g, t, p])

    def hasObserver(self, object, event, method):
        return any(o == object and e == event and m == method for o, e, m, g, t, p in self.Observations)


def errorDisplay(text, windowTitle=None, parent=None, standardButtons=None, **kwargs):
    logging.error(text)


def warningDisplay(text, windowTitle=None, parent=None, standardButtons=None, **kwargs):
    logging.warning(text)


def infoDisplay(text, windowTitle=None, parent=None, standardButtons=None, **kwargs):
    logging.info(text)


def confirmOkCancelDisplay(text, windowTitle=None, parent=None, **kwargs):
    logging.info(text)
    return confirmAnswer


def confirmYesNoDisplay(text, windowTitle=None, parent=None, **kwargs):
    logging.info(text)
    return confirmAnswer


def delayDisplay(message, autoCloseMsec=1000, parent=None, **kwargs):
    logging.info(message)


@contextlib.contextmanager
def tryWithErrorDisplay(message=None, show=True, waitCursor=False):
    try:
        yield
    except Exception as e:
        if show:
            errorDisplay((message + "\n\n" if message else "") + str(e))
        raise


def pip_install(requirements):
    """Slicer runs ``python -m pip install`` (CalledProcessError if pip fails); the stand-in is offline."""
    import subprocess

    raise subprocess.CalledProcessError(1, ["PythonSlicer", "-m", "pip", "install"] + str(requirements).split(),
                                        output="ERROR: Could not find a version that satisfies the requirement "
                                               "(no network in the slicer stand-in)")


# ---------------------------------------------------------------------------------------------------- widgets


def _ui_value(element):
    """Python value of a Qt Designer ``<property>`` child (string, bool, number, double, stringlist, set, enum)."""
    kind, text = element.tag, element.text or ""
    if kind == "bool":
        return text == "true"
    if kind == "number":
        return int(text)
    if kind == "double":
        return float(text)
    if kind == "stringlist":
        return [child.text or "" for child in element]
    if kind in ("string", "set", "enum", "cstring"):
        return text
    return None


def _ui_build(element, parent, named):
    import ctk
    import qt
    import slicer

    class_name = element.get("class")
    cls = next((getattr(m, class_name) for m in (qt, ctk, slicer) if hasattr(m, class_name)), None)
    if cls is None:
        cls = qt.QVBoxLayout if element.tag == "layout" else qt.QWidget
    obj = cls()
    obj.objectName = element.get("name", "")
    if parent is not None:
        if element.tag == "layout" and hasattr(parent, "setLayout") and parent.layout() is None:
            parent.setLayout(obj)
        else:
            parent._add_child(obj)
    if obj.objectName:
        named[obj.objectName] = obj
    for child in element:
        if child.tag == "property" and len(child):
            value = _ui_value(child[0])
            if child.get("stdset") == "0":
                obj.setProperty(child.get("name"), value)
            elif value is not None:
                setattr(obj, child.get("name"), value)
        elif child.tag in ("widget", "layout"):
            _ui_build(child, obj, named)
        elif child.tag == "item":
            for item in child:
                if item.tag in ("widget", "layout"):
                    _ui_build(item, obj, named)
    return obj


def loadUI(path):
    """Top widget of a Qt Designer file, with its properties, dynamic properties and ``<connections>``."""
    import xml.etree.ElementTree as ET

    root = ET.parse(path).getroot()
    named = {}
    top = _ui_build(root.find("widget"), None, named)
    for connection in root.iter("connection"):
        sender, receiver = named[connection.findtext("sender")], named[connection.findtext("receiver")]
        sender.connect(connection.findtext("signal"), getattr(receiver, connection.findtext("slot").split("(")[0]))
    return top


def findChildren(widget=None, name="", text="", title="", className=""):
    return widget.findChildren()


def childWidgetVariables(widget):
    """An object with one attribute per named descendant of ``widget`` (widgets and layouts)."""
    ui = type("", (), {})()
    for child in findChildren(widget):
        if hasattr(child, "name") and child.name:
            setattr(ui, child.name, child)
    return ui


def modulePath(moduleName):
    import slicer

    return getattr(slicer.modules, moduleName.lower()).path
