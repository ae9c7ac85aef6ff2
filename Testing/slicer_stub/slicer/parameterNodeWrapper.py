"""Stand-in for ``slicer.parameterNodeWrapper``: typed properties stored in a vtkMRMLScriptedModuleNode.

Serialises like Slicer's (bool as ``"True"``/``"False"``, numbers and paths with ``str``, nodes as node
references), applies defaults and the validators SCONet uses, and exposes ``allParameters`` / ``dataType`` /
``getValue`` / ``setValue`` / ``parameterNode`` / ``AddObserver`` / ``StartModify``.

GUI connection follows ``wrapper.py`` and ``guiConnectors.py``: ``connectParametersToGui(mapping)`` returns a tag,
``connectGui(gui)`` returns it only from Slicer 5.10 on (``None`` before: its connections cannot be removed),
``disconnectGui(tag)``. Connectors match the widget's exact class, as Slicer's do.
"""
from __future__ import annotations

import dataclasses
import pathlib
import typing

import ctk
import qt
import vtk

import slicer

__all__ = ["parameterNodeWrapper", "WithinRange", "Choice", "Minimum", "Maximum", "NotNone", "Default"]

_PATH_TYPES = (pathlib.Path, pathlib.PosixPath, pathlib.WindowsPath, pathlib.PurePath)


class WithinRange:
    def __init__(self, minimum, maximum):
        self.minimum = minimum
        self.maximum = maximum

    def validate(self, value):
        if not self.minimum <= value <= self.maximum:
            raise ValueError(f"Value must be within range [{self.minimum}, {self.maximum}], is {value}")


class Minimum:
    def __init__(self, minimum):
        self.minimum = minimum

    def validate(self, value):
        if value < self.minimum:
            raise ValueError(f"Value must be greater than {self.minimum}, is {value}")


class Maximum:
    def __init__(self, maximum):
        self.maximum = maximum

    def validate(self, value):
        if value > self.maximum:
            raise ValueError(f"Value must be greater than {self.maximum}, is {value}")


class Choice:
    def __init__(self, choices):
        self.choices = choices

    def validate(self, value):
        if value not in self.choices:
            raise ValueError(f"Value is {value}, but must be in one of the following: {self.choices}")


class NotNone:
    def validate(self, value):
        if value is None:
            raise ValueError("Value must not be None")


@dataclasses.dataclass
class Default:
    value: typing.Any


@dataclasses.dataclass
class _ParameterInfo:
    basename: str
    unalteredType: typing.Any
    basetype: type
    validators: list
    default: Default


def _is_node_type(type_):
    return isinstance(type_, type) and issubclass(type_, slicer.vtkMRMLNode)


def _write(info, node, value):
    for validator in info.validators:
        validator.validate(value)
    if _is_node_type(info.basetype):
        if value is not None and not isinstance(value, info.basetype):
            raise TypeError(f"Value must be of type '{info.basetype}', is type '{type(value)}' value '{value}'")
        node.SetParameter(info.basename, "")
        node.SetNodeReferenceID(info.basename, value.GetID() if value is not None else None)
        return
    if value is None or not isinstance(value, (int, float) if info.basetype is float else info.basetype):
        raise TypeError(f"Value must be of type '{info.basetype}', is type '{type(value)}' value '{value}'")
    if info.basetype is bool:
        node.SetParameter(info.basename, "True" if value else "False")
    else:
        node.SetParameter(info.basename, str(value))


def _read(info, node):
    if not _is_node_type(info.basetype) and not node.HasParameter(info.basename):
        _write(info, node, info.default.value)   # e.g. after a scene close reset the node
    if _is_node_type(info.basetype):
        return node.GetNodeReference(info.basename)
    text = node.GetParameter(info.basename)
    return text == "True" if info.basetype is bool else info.basetype(text)


def _serializer_default(basetype):
    if _is_node_type(basetype):
        return None
    if basetype in _PATH_TYPES:
        return basetype()
    return {bool: False, int: 0, float: 0, str: ""}[basetype]


def _process_class(classtype):
    parameters = {}
    for name, annotated in typing.get_type_hints(classtype, include_extras=True).items():
        basetype, extras = annotated, ()
        if typing.get_origin(annotated) is typing.Annotated:
            basetype, *extras = typing.get_args(annotated)
        validators = [x for x in extras if hasattr(x, "validate")]
        defaults = [x for x in extras if isinstance(x, Default)]
        if hasattr(classtype, name):
            default = Default(getattr(classtype, name))
        else:
            default = defaults[0] if defaults else Default(_serializer_default(basetype))
        parameters[name] = _ParameterInfo(name, annotated, basetype, validators, default)
        setattr(classtype, name, property(
            lambda self, info=parameters[name]: _read(info, self.parameterNode),
            lambda self, value, info=parameters[name]: _write(info, self.parameterNode, value)))

    def __init__(self, parameterNode):
        self.parameterNode = parameterNode
        self._parameterGUIs = {}
        self._nextParameterGUIsTag = 0
        self._updatingGUIFromParameterNode = False
        for info in parameters.values():
            if not parameterNode.HasParameter(info.basename):
                _write(info, parameterNode, info.default.value)

    classtype.allParameters = parameters
    classtype.__init__ = __init__
    classtype.dataType = staticmethod(lambda name: parameters[name].unalteredType)
    classtype.default = lambda self, name: parameters[name].default
    classtype.getValue = lambda self, name: getattr(self, name)
    classtype.setValue = lambda self, name, value: setattr(self, name, value)
    classtype.StartModify = lambda self: self.parameterNode.StartModify()
    classtype.EndModify = lambda self, wasModified: self.parameterNode.EndModify(wasModified)
    classtype.AddObserver = (lambda self, event, callback, priority=0.0:
                             self.parameterNode.AddObserver(event, callback, priority))
    classtype.RemoveObserver = lambda self, tag: self.parameterNode.RemoveObserver(tag)
    classtype.Modified = lambda self: self.parameterNode.Modified()
    classtype.connectParametersToGui = _connectParametersToGui
    classtype.connectGui = _connectGui
    classtype.disconnectGui = _disconnectGui
    return classtype


# ---------------------------------------------------------------------------------------------------- GUI


class _Connector:
    """A widget adapted to a parameter type; ``onChanged(callback)`` connects (None: disconnects) its signal."""

    signal = ""

    def __init__(self, widget, datatype):
        self.widget = widget
        self._callback = None

    def onChanged(self, callback):
        if self._callback is not None:
            getattr(self.widget, self.signal).disconnect(self.changed)
        self._callback = callback
        if callback is not None:
            getattr(self.widget, self.signal).connect(self.changed)

    def changed(self, *args):
        if self._callback:
            self._callback()


class _CheckBoxConnector(_Connector):
    signal = "stateChanged"

    def read(self):
        return self.widget.checked

    def write(self, value):
        self.widget.checked = value


class _SliderConnector(_Connector):
    signal = "valueChanged"

    def __init__(self, widget, datatype):
        super().__init__(widget, datatype)
        ranges = [a for a in typing.get_args(datatype)[1:] if isinstance(a, WithinRange)]
        if not ranges:
            raise RuntimeError("Cannot have a connection to ctkSliderWidget where the float types is unbounded.")
        widget.minimum, widget.maximum = ranges[0].minimum, ranges[0].maximum

    def read(self):
        return self.widget.value

    def write(self, value):
        self.widget.value = value


class _ComboBoxConnector(_Connector):
    signal = "currentIndexChanged"

    def __init__(self, widget, datatype):
        super().__init__(widget, datatype)
        choices = [a for a in typing.get_args(datatype)[1:] if isinstance(a, Choice)]
        if not choices:
            raise RuntimeError("ComboBoxToStringableConnector requires the Choice annotation to be used.")
        self._choices = choices[0].choices
        widget.clear()
        for choice in self._choices:
            widget.addItem(str(choice))

    def read(self):
        return self._choices[self.widget.currentIndex]

    def write(self, value):
        self.widget.currentIndex = list(self._choices).index(value)


class _PathConnector(_Connector):
    signal = "currentPathChanged"

    def read(self):
        return pathlib.Path(self.widget.currentPath)

    def write(self, value):
        self.widget.currentPath = str(value)


class _NodeComboBoxConnector(_Connector):
    signal = "currentNodeChanged"

    def __init__(self, widget, datatype):
        super().__init__(widget, datatype)
        widget.nodeTypes = [datatype.__name__]

    def read(self):
        return self.widget.currentNode()

    def write(self, value):
        self.widget.setCurrentNode(value)


def _createGuiConnector(widget, datatype):
    basetype = typing.get_args(datatype)[0] if typing.get_origin(datatype) is typing.Annotated else datatype
    for widgetClass, types, connector in (
            (qt.QCheckBox, (bool,), _CheckBoxConnector), (ctk.ctkSliderWidget, (float,), _SliderConnector),
            (qt.QComboBox, (int, float, str, bool), _ComboBoxConnector),
            (ctk.ctkPathLineEdit, _PATH_TYPES, _PathConnector)):
        if type(widget) is widgetClass and basetype in types:
            return connector(widget, datatype)
    if type(widget) is slicer.qMRMLNodeComboBox and _is_node_type(basetype):
        return _NodeComboBoxConnector(widget, basetype)
    raise RuntimeError(f"Unable to create GUI connector from datatype '{datatype}' to widget type '{type(widget)}'")


def _updateGUIFromParameterNode(self):
    if self._updatingGUIFromParameterNode:
        return
    try:
        self._updatingGUIFromParameterNode = True
        for mapping in self._parameterGUIs.values():
            for name, connector in mapping.items():
                connector.write(self.getValue(name))
    finally:
        self._updatingGUIFromParameterNode = False


def _connectParametersToGui(self, mapping):
    for name in mapping:
        if name not in self.allParameters:
            raise ValueError(f"Cannot find a param with the given name: {name}")
    connectors = {name: _createGuiConnector(widget, self.dataType(name)) for name, widget in mapping.items()}
    tag = self._nextParameterGUIsTag
    self._nextParameterGUIsTag += 1
    self._parameterGUIs[tag] = connectors
    for name, connector in connectors.items():
        connector.write(self.getValue(name))

        def guiToParameter(name=name, connector=connector):
            if not self._updatingGUIFromParameterNode:
                self.setValue(name, connector.read())

        connector.onChanged(guiToParameter)
    self.AddObserver(vtk.vtkCommand.ModifiedEvent, lambda caller, event: _updateGUIFromParameterNode(self))
    return tag


def _connectGui(self, gui):
    """Before Slicer 5.10 ``connectGui`` does not return the tag (Slicer/Slicer issue #7547)."""
    mapping = {}
    for widget in vars(gui).values():
        if widget.property("SlicerParameterName"):
            mapping[widget.property("SlicerParameterName")] = widget
    tag = _connectParametersToGui(self, mapping)
    return tag if (slicer.app.majorVersion, slicer.app.minorVersion) >= (5, 10) else None


def _disconnectGui(self, tag):
    if tag in self._parameterGUIs:
        for connector in self._parameterGUIs[tag].values():
            connector.onChanged(None)
        del self._parameterGUIs[tag]


def parameterNodeWrapper(classtype=None):
    if classtype is None:
        return _process_class
    return _process_class(classtype)
