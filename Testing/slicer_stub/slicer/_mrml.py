"""MRML node classes of the stand-in (see ../README.md): real names and signatures, reduced behaviour.

Nodes derive from ``vtk.vtkObject`` so ``AddObserver``, ``InvokeEvent``, ``GetMTime`` and ``Modified`` are VTK's
own. Geometry follows Slicer: a volume's voxels live in a ``vtkImageData`` whose origin and spacing are ignored;
its placement is the node's IJKToRAS matrix (RAS mm). A segment's binary labelmap is a ``vtkOrientedImageData``
whose image-to-world matrix maps voxel indices to the segmentation node's coordinates, which its parent
transform maps to world RAS.
"""
from __future__ import annotations

import itertools

import numpy as np
import vtk
from vtk.util import numpy_support


def _array_from_matrix(matrix: vtk.vtkMatrix4x4) -> np.ndarray:
    return np.array([[matrix.GetElement(r, c) for c in range(4)] for r in range(4)], dtype=np.float64)


def _matrix_from_array(array) -> vtk.vtkMatrix4x4:
    matrix = vtk.vtkMatrix4x4()
    matrix.DeepCopy(np.asarray(array, dtype=np.float64).ravel())
    return matrix


# ---------------------------------------------------------------------------------------------------- nodes


class vtkMRMLNode(vtk.vtkObject):
    """Base node: ID, name, attributes, node references, batched Modified events."""

    def __init__(self):
        super().__init__()
        self._id = None
        self._name = ""
        self._scene = None
        self._attributes = {}
        self._references = {}
        self._singleton_tag = None
        self._disable_modified = 0
        self._modified_pending = False

    def GetClassName(self):
        return type(self).__name__

    def IsA(self, className):
        return any(cls.__name__ == className for cls in type(self).__mro__)

    def GetID(self):
        return self._id

    def GetName(self):
        return self._name

    def SetName(self, name):
        self._name = name
        self.Modified()

    def GetScene(self):
        return self._scene

    def SetSingletonTag(self, tag):
        self._singleton_tag = tag

    def GetSingletonTag(self):
        return self._singleton_tag

    def SetAttribute(self, name, value):
        self._attributes[name] = value
        self.Modified()

    def GetAttribute(self, name):
        return self._attributes.get(name)

    def Modified(self):
        if self._disable_modified:
            self._modified_pending = True
            return
        super().Modified()

    def StartModify(self):
        previous = self._disable_modified
        self._disable_modified = 1
        return previous

    def EndModify(self, previous):
        self._disable_modified = previous
        if not previous and self._modified_pending:
            self._modified_pending = False
            self.Modified()
        return 0

    def SetNodeReferenceID(self, referenceRole, referencedNodeID):
        if referencedNodeID:
            self._references[referenceRole] = [referencedNodeID]
        else:
            self._references.pop(referenceRole, None)
        self.Modified()

    def GetNodeReferenceID(self, referenceRole):
        ids = self._references.get(referenceRole)
        return ids[0] if ids else None

    def GetNodeReference(self, referenceRole):
        node_id = self.GetNodeReferenceID(referenceRole)
        return self._scene.GetNodeByID(node_id) if node_id and self._scene is not None else None

    def RemoveNodeReferenceIDs(self, referenceRole):
        self._references.pop(referenceRole, None)
        self.Modified()

    def _remove_references_to(self, node_id):
        for role in [role for role, ids in self._references.items() if node_id in ids]:
            del self._references[role]


class vtkMRMLScriptedModuleNode(vtkMRMLNode):
    """String parameters of a scripted module (what ``parameterNodeWrapper`` serialises into)."""

    def __init__(self):
        super().__init__()
        self._parameters = {}

    def SetParameter(self, name, value):
        if self._parameters.get(name) != value:
            self._parameters[name] = value
            self.Modified()

    def GetParameter(self, name):
        return self._parameters.get(name, "")

    def HasParameter(self, name):
        return name in self._parameters

    def UnsetParameter(self, name):
        if self._parameters.pop(name, None) is not None:
            self.Modified()

    def Reset(self, defaultNode=None):
        """What a scene close does to a singleton node: back to a new node's content (tag, name and ID kept)."""
        self._parameters, self._attributes, self._references = {}, {}, {}
        self.Modified()


class vtkMRMLTransformableNode(vtkMRMLNode):
    """A node that can sit under a parent transform (reference role ``transform``)."""

    TRANSFORM_ROLE = "transform"

    def SetAndObserveTransformNodeID(self, transformNodeID):
        self.SetNodeReferenceID(self.TRANSFORM_ROLE, transformNodeID)
        return True

    def GetTransformNodeID(self):
        return self.GetNodeReferenceID(self.TRANSFORM_ROLE)

    def GetParentTransformNode(self):
        return self.GetNodeReference(self.TRANSFORM_ROLE)


class vtkMRMLTransformNode(vtkMRMLTransformableNode):
    """Base transform node; subclasses say whether they are linear."""

    def IsLinear(self):
        return 0

    def GetMatrixTransformToParent(self, matrix):
        return 0

    def IsTransformToWorldLinear(self):
        node = self
        while node is not None:
            if not node.IsLinear():
                return 0
            node = node.GetParentTransformNode()
        return 1

    def GetMatrixTransformToWorld(self, transformToWorld):
        """Concatenated matrix of this transform and its parents (``transformToWorld`` is filled); 0 if non-linear."""
        total = np.eye(4)
        node = self
        while node is not None:
            to_parent = vtk.vtkMatrix4x4()
            if not node.GetMatrixTransformToParent(to_parent):
                return 0
            total = _array_from_matrix(to_parent) @ total
            node = node.GetParentTransformNode()
        transformToWorld.DeepCopy(total.ravel())
        return 1


class vtkMRMLLinearTransformNode(vtkMRMLTransformNode):
    def __init__(self):
        super().__init__()
        self._to_parent = vtk.vtkMatrix4x4()

    def IsLinear(self):
        return 1

    def SetMatrixTransformToParent(self, matrix):
        self._to_parent.DeepCopy(matrix)
        self.Modified()

    def GetMatrixTransformToParent(self, matrix):
        matrix.DeepCopy(self._to_parent)
        return 1


class vtkMRMLGridTransformNode(vtkMRMLTransformNode):
    """A displacement-field (non-linear) transform; only its non-linearity matters here."""


class vtkMRMLVolumeNode(vtkMRMLTransformableNode):
    """The voxels are held on the VTK (C++) side only, as in Slicer: ``GetImageData()`` hands out a new Python
    wrapper whenever no Python reference to the previous one is left, so ``id()`` of it is no identity."""

    ImageDataModifiedEvent = 18001

    def __init__(self):
        super().__init__()
        self._ijk_to_ras = vtk.vtkMatrix4x4()
        self._image_holder = vtk.vtkCollection()

    def SetIJKToRASMatrix(self, mat):
        self._ijk_to_ras.DeepCopy(mat)
        self.Modified()

    def GetIJKToRASMatrix(self, mat):
        mat.DeepCopy(self._ijk_to_ras)

    def GetRASToIJKMatrix(self, mat):
        vtk.vtkMatrix4x4.Invert(self._ijk_to_ras, mat)

    def GetSpacing(self):
        return tuple(float(s) for s in np.linalg.norm(_array_from_matrix(self._ijk_to_ras)[:3, :3], axis=0))

    def GetOrigin(self):
        return tuple(float(o) for o in _array_from_matrix(self._ijk_to_ras)[:3, 3])

    def SetAndObserveImageData(self, imageData):
        self._image_holder.RemoveAllItems()
        if imageData is not None:
            self._image_holder.AddItem(imageData)
        self.Modified()

    def GetImageData(self):
        return self._image_holder.GetItemAsObject(0) if self._image_holder.GetNumberOfItems() else None

    def StorableModified(self):
        pass

    def CreateDefaultDisplayNodes(self):
        pass


class vtkMRMLScalarVolumeNode(vtkMRMLVolumeNode):
    pass


class vtkMRMLLabelMapVolumeNode(vtkMRMLScalarVolumeNode):
    pass


class vtkMRMLVectorVolumeNode(vtkMRMLVolumeNode):
    pass


# ---------------------------------------------------------------------------------------------------- segmentations


class vtkOrientedImageData(vtk.vtkImageData):
    """vtkImageData with axis directions: voxel index → world = directions · diag(spacing) · index + origin."""

    def __init__(self):
        super().__init__()
        self._directions = np.eye(3)

    def SetImageToWorldMatrix(self, mat):
        array = _array_from_matrix(mat)
        spacing = np.linalg.norm(array[:3, :3], axis=0)
        self._directions = array[:3, :3] / spacing
        self.SetSpacing(*spacing)
        self.SetOrigin(*array[:3, 3])

    def GetImageToWorldMatrix(self, mat):
        array = np.eye(4)
        array[:3, :3] = self._directions * np.asarray(self.GetSpacing())
        array[:3, 3] = self.GetOrigin()
        mat.DeepCopy(array.ravel())

    def GetWorldToImageMatrix(self, mat):
        image_to_world = vtk.vtkMatrix4x4()
        self.GetImageToWorldMatrix(image_to_world)
        vtk.vtkMatrix4x4.Invert(image_to_world, mat)

    def DeepCopy(self, source):
        super().DeepCopy(source)
        if isinstance(source, vtkOrientedImageData):
            self._directions = source._directions.copy()


class vtkSegmentationConverter(vtk.vtkObject):
    """Static helpers of Slicer's segmentation converter used by SCONet (representation names, geometry strings)."""

    @staticmethod
    def GetReferenceImageGeometryParameterName():
        return "Reference image geometry"

    @staticmethod
    def GetSegmentationBinaryLabelmapRepresentationName():
        return "Binary labelmap"

    @staticmethod
    def GetSegmentationClosedSurfaceRepresentationName():
        return "Closed surface"

    @staticmethod
    def SerializeImageGeometry(*args):
        """``(orientedImageData)``, ``(geometryMatrix, imageData)`` or ``(geometryMatrix, extent[6])``."""
        if len(args) == 1:
            matrix = vtk.vtkMatrix4x4()
            args[0].GetImageToWorldMatrix(matrix)
            extent = args[0].GetExtent()
        else:
            matrix, second = args
            extent = second.GetExtent() if isinstance(second, vtk.vtkImageData) else second
        values = [matrix.GetElement(r, c) for r in range(4) for c in range(4)] + [int(e) for e in extent]
        return ";".join(repr(float(v)) if i < 16 else str(v) for i, v in enumerate(values)) + ";"

    @staticmethod
    def DeserializeImageGeometry(geometryString, geometryMatrix, extent):
        """Fill ``geometryMatrix`` (vtkMatrix4x4) and ``extent`` (list of 6 ints, modified in place)."""
        parts = [p for p in geometryString.split(";") if p]
        if len(parts) != 22:
            return False
        geometryMatrix.DeepCopy([float(p) for p in parts[:16]])
        extent[:] = [int(p) for p in parts[16:]]
        return True


class vtkSegment(vtk.vtkObject):
    def __init__(self):
        super().__init__()
        self._segment_name = ""
        self._color = (0.5, 0.5, 0.5)
        self._tags = {}
        self._representations = {}

    @staticmethod
    def GetTerminologyEntryTagName():
        return "TerminologyEntry"

    def GetName(self):
        return self._segment_name

    def SetName(self, _arg):
        self._segment_name = _arg
        self.Modified()

    def GetColor(self):
        return self._color

    def SetColor(self, *args):
        rgb = args[0] if len(args) == 1 else args
        self._color = tuple(float(c) for c in rgb)
        self.Modified()

    def SetTag(self, tag, value):
        self._tags[tag] = str(value)
        self.Modified()

    def GetTag(self, tag, value):
        """``value`` is a ``vtk.reference`` that receives the tag's value; returns whether the tag exists."""
        if tag not in self._tags:
            return False
        value.set(self._tags[tag])
        return True

    def HasTag(self, tag):
        return tag in self._tags

    def RemoveTag(self, tag):
        self._tags.pop(tag, None)

    def AddRepresentation(self, type, representation):
        self._representations[type] = representation
        return True

    def GetRepresentation(self, name):
        return self._representations.get(name)

    def RemoveRepresentation(self, name):
        return self._representations.pop(name, None) is not None

    def GetLabelValue(self):
        return 1


class vtkSegmentation(vtk.vtkObject):
    def __init__(self):
        super().__init__()
        self._segments = {}
        self._order = []
        self._parameters = {}
        self._id_counter = itertools.count(1)

    def GenerateUniqueSegmentID(self, id):
        if id and id not in self._segments:
            return id
        base = id or "Segment"
        while True:
            candidate = f"{base}_{next(self._id_counter)}"
            if candidate not in self._segments:
                return candidate

    def AddSegment(self, segment, segmentId="", insertBeforeSegmentId=""):
        segment_id = self.GenerateUniqueSegmentID(segmentId)
        self._segments[segment_id] = segment
        position = self._order.index(insertBeforeSegmentId) if insertBeforeSegmentId in self._order else len(self._order)
        self._order.insert(position, segment_id)
        self.Modified()
        return True

    def AddEmptySegment(self, segmentId="", segmentName="", color=None):
        segment = vtkSegment()
        segment_id = self.GenerateUniqueSegmentID(segmentId)
        segment.SetName(segmentName or segment_id)
        if color is not None:
            segment.SetColor(color)
        self.AddSegment(segment, segment_id)
        return segment_id

    def RemoveSegment(self, segmentId):
        if not isinstance(segmentId, str):
            segmentId = self.GetSegmentIdBySegment(segmentId)
        if segmentId in self._segments:
            del self._segments[segmentId]
            self._order.remove(segmentId)
            self.Modified()

    def RemoveAllSegments(self):
        self._segments.clear()
        self._order.clear()
        self.Modified()

    def GetSegment(self, segmentId):
        return self._segments.get(segmentId)

    def GetNumberOfSegments(self):
        return len(self._order)

    def GetNthSegmentID(self, index):
        return self._order[index] if 0 <= index < len(self._order) else ""

    def GetNthSegment(self, index):
        return self._segments[self._order[index]] if 0 <= index < len(self._order) else None

    def GetSegmentIDs(self, segmentIds):
        segmentIds.Reset()
        for segment_id in self._order:
            segmentIds.InsertNextValue(segment_id)

    def GetSegmentIdBySegment(self, segment):
        return next((sid for sid, seg in self._segments.items() if seg is segment), "")

    def GetSegmentIdBySegmentName(self, name):
        return next((sid for sid in self._order if self._segments[sid].GetName().lower() == name.lower()), "")

    def SetConversionParameter(self, name, value):
        self._parameters[name] = value

    def GetConversionParameter(self, name):
        return self._parameters.get(name, "")


class vtkMRMLSegmentationNode(vtkMRMLTransformableNode):
    def __init__(self):
        super().__init__()
        self._segmentation = vtkSegmentation()

    @staticmethod
    def GetReferenceImageGeometryReferenceRole():
        return "referenceImageGeometryRef"

    def GetSegmentation(self):
        return self._segmentation

    def CreateDefaultDisplayNodes(self):
        pass

    def SetSourceRepresentationToBinaryLabelmap(self):
        return True

    def AddSegmentFromBinaryLabelmapRepresentation(self, imageData, segmentName="", color=None, segmentId=""):
        segment = vtkSegment()
        labelmap = vtkOrientedImageData()
        labelmap.DeepCopy(imageData)
        segment.AddRepresentation(vtkSegmentationConverter.GetSegmentationBinaryLabelmapRepresentationName(), labelmap)
        segment_id = self._segmentation.GenerateUniqueSegmentID(segmentId)
        segment.SetName(segmentName or segment_id)
        if color is not None:
            segment.SetColor(color)
        if not self._segmentation.AddSegment(segment, segment_id):
            return ""
        self.Modified()
        return segment_id

    def RemoveSegment(self, segmentID):
        self._segmentation.RemoveSegment(segmentID)
        self.Modified()

    def GetBinaryLabelmapRepresentation(self, segmentId, outputBinaryLabelmap):
        segment = self._segmentation.GetSegment(segmentId)
        name = vtkSegmentationConverter.GetSegmentationBinaryLabelmapRepresentationName()
        if segment is None or segment.GetRepresentation(name) is None:
            return False
        outputBinaryLabelmap.DeepCopy(segment.GetRepresentation(name))
        return True

    def CreateClosedSurfaceRepresentation(self):
        """Discrete flying edges on each segment's labelmap, points mapped to the segmentation's coordinates."""
        labelmap_name = vtkSegmentationConverter.GetSegmentationBinaryLabelmapRepresentationName()
        surface_name = vtkSegmentationConverter.GetSegmentationClosedSurfaceRepresentationName()
        for segment_id in self._segmentation._order:
            segment = self._segmentation.GetSegment(segment_id)
            labelmap = segment.GetRepresentation(labelmap_name)
            if labelmap is None:
                return False
            segment.AddRepresentation(surface_name, _labelmap_surface(labelmap))
        self.Modified()
        return True

    def SetReferenceImageGeometryParameterFromVolumeNode(self, volumeNode):
        if volumeNode is None or volumeNode is self or volumeNode.GetImageData() is None:
            return
        ijk_to_ras = vtk.vtkMatrix4x4()
        volumeNode.GetIJKToRASMatrix(ijk_to_ras)
        volume_parent, own_parent = volumeNode.GetParentTransformNode(), self.GetParentTransformNode()
        if volume_parent is not own_parent:
            volume_to_world = _to_world(volume_parent)
            own_to_world = _to_world(own_parent)
            if volume_to_world is not None and own_to_world is not None:
                ijk_to_ras = _matrix_from_array(
                    np.linalg.inv(own_to_world) @ volume_to_world @ _array_from_matrix(ijk_to_ras))
        self._segmentation.SetConversionParameter(
            vtkSegmentationConverter.GetReferenceImageGeometryParameterName(),
            vtkSegmentationConverter.SerializeImageGeometry(ijk_to_ras, volumeNode.GetImageData()))
        self.SetNodeReferenceID(self.GetReferenceImageGeometryReferenceRole(), volumeNode.GetID())


def _to_world(transform_node):
    """(4, 4) matrix of a parent transform to world (identity for none); None if non-linear."""
    if transform_node is None:
        return np.eye(4)
    matrix = vtk.vtkMatrix4x4()
    return _array_from_matrix(matrix) if transform_node.GetMatrixTransformToWorld(matrix) else None


def _labelmap_surface(labelmap: vtkOrientedImageData) -> vtk.vtkPolyData:
    surface = vtk.vtkPolyData()
    if labelmap.GetNumberOfPoints() == 0:
        return surface
    plain = vtk.vtkImageData()
    plain.ShallowCopy(labelmap)
    plain.SetOrigin(0.0, 0.0, 0.0)
    plain.SetSpacing(1.0, 1.0, 1.0)
    edges = vtk.vtkDiscreteFlyingEdges3D()
    edges.SetInputData(plain)
    edges.SetValue(0, 1)
    edges.Update()
    image_to_world = vtk.vtkMatrix4x4()
    labelmap.GetImageToWorldMatrix(image_to_world)
    transform = vtk.vtkTransform()
    transform.SetMatrix(image_to_world)
    mapper = vtk.vtkTransformFilter()
    mapper.SetInputConnection(edges.GetOutputPort())
    mapper.SetTransform(transform)
    mapper.Update()
    surface.DeepCopy(mapper.GetOutput())
    return surface


class vtkMRMLSubjectHierarchyNode(vtkMRMLNode):
    """Subject hierarchy: items for data nodes, each with a parent item (the scene item by default)."""

    def __init__(self):
        super().__init__()
        self._scene_item = 1
        self._next_item = itertools.count(2)
        self._item_of_node = {}
        self._parent_of_item = {}

    @staticmethod
    def GetSubjectHierarchyNode(scene):
        existing = scene.GetFirstNodeByClass("vtkMRMLSubjectHierarchyNode")
        return existing if existing is not None else scene.AddNewNodeByClass("vtkMRMLSubjectHierarchyNode")

    def GetInvalidItemID(self):
        return 0

    def GetSceneItemID(self):
        return self._scene_item

    def GetItemByDataNode(self, dataNode):
        node_id = dataNode.GetID()
        if node_id not in self._item_of_node:
            item = next(self._next_item)
            self._item_of_node[node_id] = item
            self._parent_of_item[item] = self._scene_item
        return self._item_of_node[node_id]

    def GetItemDataNode(self, itemID):
        node_id = next((nid for nid, item in self._item_of_node.items() if item == itemID), None)
        return self._scene.GetNodeByID(node_id) if node_id else None

    def GetItemParent(self, itemID):
        return self._parent_of_item.get(itemID, self.GetInvalidItemID())

    def SetItemParent(self, itemID, parentItemID):
        self._parent_of_item[itemID] = parentItemID
        self.Modified()


# ---------------------------------------------------------------------------------------------------- scene


class vtkMRMLScene(vtk.vtkObject):
    StartCloseEvent = 0x2000 + 3
    EndCloseEvent = 0x2000 + 4

    def __init__(self):
        super().__init__()
        self._nodes = []
        self._id_counters = {}

    def CreateNodeByClass(self, className):
        return NODE_CLASSES[className]()

    def GenerateUniqueName(self, baseName):
        names = {node.GetName() for node in self._nodes}
        if baseName not in names:
            return baseName
        return next(f"{baseName}_{i}" for i in itertools.count(1) if f"{baseName}_{i}" not in names)

    def AddNode(self, node):
        class_name = node.GetClassName()
        counter = self._id_counters.get(class_name, 0) + 1
        while self.GetNodeByID(f"{class_name}{counter}") is not None:   # a singleton kept by Clear()
            counter += 1
        self._id_counters[class_name] = counter
        node._id = f"{class_name}{counter}"
        node._scene = self
        if not node.GetName():
            node._name = self.GenerateUniqueName(class_name.replace("vtkMRML", "").replace("Node", ""))
        self._nodes.append(node)
        return node

    def AddNewNodeByClass(self, className, nodeBaseName=""):
        node = self.CreateNodeByClass(className)
        if nodeBaseName:
            node._name = self.GenerateUniqueName(nodeBaseName)
        return self.AddNode(node)

    def RemoveNode(self, n):
        if n in self._nodes:
            self._nodes.remove(n)
            for node in self._nodes:
                node._remove_references_to(n.GetID())
            n._scene = None

    def GetNodeByID(self, id):
        return next((node for node in self._nodes if node.GetID() == id), None)

    def GetNumberOfNodes(self):
        return len(self._nodes)

    def GetNthNode(self, n):
        return self._nodes[n] if 0 <= n < len(self._nodes) else None

    def GetNumberOfNodesByClass(self, className):
        return sum(1 for node in self._nodes if node.IsA(className))

    def GetNthNodeByClass(self, n, className):
        matching = [node for node in self._nodes if node.IsA(className)]
        return matching[n] if 0 <= n < len(matching) else None

    def GetFirstNodeByClass(self, className):
        return self.GetNthNodeByClass(0, className)

    def GetSingletonNode(self, singletonTag, className):
        return next((node for node in self._nodes
                     if node.IsA(className) and node.GetSingletonTag() == singletonTag), None)

    def Clear(self, removeSingletons=False):
        """As ``vtkMRMLScene::Clear``: StartCloseEvent, remove the nodes (singletons are reset instead unless
        ``removeSingletons``), new node IDs start again, EndCloseEvent."""
        self.InvokeEvent(self.StartCloseEvent)
        for node in list(self._nodes):
            if removeSingletons or node.GetSingletonTag() is None:
                self.RemoveNode(node)
            elif hasattr(node, "Reset"):
                node.Reset(None)
        self._id_counters = {}
        self.InvokeEvent(self.EndCloseEvent)


NODE_CLASSES = {cls.__name__: cls for cls in (
    vtkMRMLScriptedModuleNode, vtkMRMLLinearTransformNode, vtkMRMLGridTransformNode, vtkMRMLScalarVolumeNode,
    vtkMRMLLabelMapVolumeNode, vtkMRMLVectorVolumeNode, vtkMRMLSegmentationNode, vtkMRMLSubjectHierarchyNode)}
