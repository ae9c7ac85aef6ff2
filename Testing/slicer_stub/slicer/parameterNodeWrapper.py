"""Stand-in for ``slicer.parameterNodeWrapper``: typed properties stored in a vtkMRMLScriptedModuleNode.

Serialises like Slicer's (bool as ``"True"``/``"False"``, numbers and paths with ``str``, nodes as node
references), applies defaults and the validators SCONet uses, and exposes ``allParameters`` / ``dataType`` /
``getValue`` / ``setValue`` / ``parameterNode`` / ``AddObserver`` / ``StartModify``. GUI connection
(``connectGui``) needs Qt and is not emulated.
"""
from __future__ import annotations

import dataclasses
import pathlib
import typing

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
    return classtype


def parameterNodeWrapper(classtype=None):
    if classtype is None:
        return _process_class
    return _process_class(classtype)
