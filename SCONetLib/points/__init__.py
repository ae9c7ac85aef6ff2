"""Point stage of SCONet: Canny edge points of a CT and their 3D SURF descriptors.

``extract_point_cloud(image)`` is the entry point; ``canny_points`` and ``surf3d`` are its two steps, and
``canny_points_torch`` and ``surf3d_torch`` the same steps in torch (CPU or CUDA), chosen per device by
``extract_point_cloud(..., implementation="auto", device=...)``.
"""
from .canny import canny_points
from .canny_torch import canny_points_torch
from .cloud import PointCloud, extract_point_cloud
from .surf import surf3d
from .surf3d_torch import surf3d_torch

__all__ = ["PointCloud", "canny_points", "canny_points_torch", "extract_point_cloud", "surf3d", "surf3d_torch"]
