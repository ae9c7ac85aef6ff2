"""Point stage of SCONet: Canny edge points of a CT and their 3D SURF descriptors.

``extract_point_cloud(image)`` is the entry point; ``canny_points`` (module :mod:`.canny`) and ``surf3d`` (module
:mod:`.surf`) are its two steps.
"""
from .canny import canny_points
from .cloud import PointCloud, extract_point_cloud
from .surf import surf3d

__all__ = ["PointCloud", "canny_points", "extract_point_cloud", "surf3d"]
