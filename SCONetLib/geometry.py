"""Every change of coordinate frame SCONet makes, in one place.

Frames
------
* **voxel index** ``ijk``: continuous index in SimpleITK order (i fastest, i.e. the *last* axis of a
  ``GetArrayFromImage`` array, which is KJI).
* **LPS** ``xyz_lps``: physical millimetres as SimpleITK reports them (x to the patient's Left,
  y Posterior, z Superior).
* **RAS** ``xyz_ras``: physical millimetres as 3D Slicer and NIfTI/nibabel report them; ``(-x, -y, z)`` of LPS.
* **object frame** ``xyz_obj``: the model's normalised frame, ``(xyz_ras - centre_ras) / scale_mm``, axes
  aligned with RAS. ``centre`` is the centre of the volume's voxel box. The model's grid covers
  ``|xyz_obj| <= 0.5 * (1 + padding + 0.001)`` on every axis, i.e. ±220.2 mm around the centre for the reference
  ``scale_mm = 400`` and ``padding = 0.1``; anything further out is clamped into the border cells by the model.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk

#: Multiplying LPS by this gives RAS and vice versa.
LPS_TO_RAS = np.array([-1.0, -1.0, 1.0])
#: Reference object-frame scale (mm per unit).
DEFAULT_SCALE_MM = 400.0
#: Reference unit-cube padding of the feature grid.
DEFAULT_PADDING = 0.1


def lps_to_ras(xyz: np.ndarray) -> np.ndarray:
    """(N, 3) LPS mm → (N, 3) RAS mm (also RAS → LPS: the map is its own inverse)."""
    return np.asarray(xyz, dtype=np.float64) * LPS_TO_RAS


ras_to_lps = lps_to_ras


def spacing_mm(spacing) -> np.ndarray:
    """(3,) float64 spacing (mm, i/j/k) from one or three positive finite numbers; ``ValueError`` otherwise."""
    try:
        values = np.asarray(spacing, dtype=np.float64).reshape(-1)
    except (TypeError, ValueError):
        values = None
    if values is None or isinstance(spacing, (bool, str, bytes)) or values.size not in (1, 3) \
            or not np.all(np.isfinite(values)) or np.any(values <= 0):
        raise ValueError(f"spacing must be one or three positive finite numbers (mm), got {spacing!r}")
    return np.broadcast_to(values, (3,)).copy()


@dataclass(frozen=True)
class Grid:
    """Voxel grid with its physical placement, in SimpleITK's LPS convention.

    Attributes
    ----------
    size : (3,) int tuple, voxels along i, j, k.
    spacing : (3,) float tuple, mm.
    origin : (3,) float tuple, LPS mm of the centre of voxel (0, 0, 0).
    direction : (9,) float tuple, row-major 3×3 matrix whose columns are the i, j, k axes in LPS.
    """

    size: tuple
    spacing: tuple
    origin: tuple
    direction: tuple

    @classmethod
    def of(cls, image: sitk.Image) -> "Grid":
        """Geometry of a 3D SimpleITK image."""
        if image.GetDimension() != 3:
            raise ValueError(f"expected a 3D image, got a {image.GetDimension()}D image")
        return cls(tuple(int(s) for s in image.GetSize()), tuple(float(s) for s in image.GetSpacing()),
                   tuple(float(o) for o in image.GetOrigin()), tuple(float(d) for d in image.GetDirection()))

    @property
    def direction_matrix(self) -> np.ndarray:
        """(3, 3) float64 direction cosines, columns = i, j, k axes in LPS."""
        return np.asarray(self.direction, dtype=np.float64).reshape(3, 3)

    @property
    def ijk_to_lps(self) -> np.ndarray:
        """(4, 4) float64 homogeneous matrix from voxel index to LPS mm."""
        m = np.eye(4)
        m[:3, :3] = self.direction_matrix * np.asarray(self.spacing)
        m[:3, 3] = self.origin
        return m

    @property
    def ijk_to_ras(self) -> np.ndarray:
        """(4, 4) float64 homogeneous matrix from voxel index to RAS mm (Slicer's IJKToRAS)."""
        return np.diag(np.append(LPS_TO_RAS, 1.0)) @ self.ijk_to_lps

    @classmethod
    def from_ijk_to_ras(cls, ijk_to_ras: np.ndarray, size) -> "Grid":
        """Grid from a Slicer-style (4, 4) IJKToRAS matrix and a size in (i, j, k) order."""
        m = np.diag(np.append(LPS_TO_RAS, 1.0)) @ np.asarray(ijk_to_ras, dtype=np.float64)
        spacing = np.linalg.norm(m[:3, :3], axis=0)
        if np.any(spacing <= 0):
            raise ValueError(f"IJKToRAS has a zero-length axis: spacing {tuple(spacing)}")
        return cls(tuple(int(s) for s in size), tuple(float(s) for s in spacing), tuple(float(o) for o in m[:3, 3]),
                   tuple(float(d) for d in (m[:3, :3] / spacing).ravel()))

    def index_to_lps(self, ijk: np.ndarray) -> np.ndarray:
        """(N, 3) continuous voxel indices → (N, 3) float64 LPS mm."""
        m = self.ijk_to_lps
        return np.asarray(ijk, dtype=np.float64) @ m[:3, :3].T + m[:3, 3]

    def lps_to_index(self, xyz_lps: np.ndarray) -> np.ndarray:
        """(N, 3) LPS mm → (N, 3) float64 continuous voxel indices."""
        m = self.ijk_to_lps
        return np.linalg.solve(m[:3, :3], (np.asarray(xyz_lps, dtype=np.float64) - m[:3, 3]).T).T

    @property
    def centre_lps(self) -> np.ndarray:
        """(3,) LPS mm of the centre of the voxel box (index (size - 1) / 2)."""
        return self.index_to_lps(((np.asarray(self.size, dtype=np.float64) - 1.0) / 2.0)[None])[0]

    @property
    def extent_mm(self) -> np.ndarray:
        """(3,) physical length of the voxel box along i, j, k (size × spacing), mm."""
        return np.asarray(self.size) * np.asarray(self.spacing)

    def with_spacing(self, spacing) -> "Grid":
        """Grid covering the same physical box at another spacing, same direction.

        ``spacing`` is one number or three (mm, i/j/k order). The box's low corner (the outer face of voxel 0) is
        kept, the size along each axis is ``max(1, round(extent / spacing))``, so the box changes by less than half
        a new voxel at the high end. The new origin is ``corner + D · spacing / 2``.
        """
        new = spacing_mm(spacing)
        old = np.asarray(self.spacing)
        size = self.size_at(new).astype(int)
        d = self.direction_matrix
        origin = np.asarray(self.origin) + d @ ((new - old) / 2.0)
        return Grid(tuple(int(s) for s in size), tuple(float(s) for s in new), tuple(float(o) for o in origin),
                    self.direction)

    def size_at(self, spacing) -> np.ndarray:
        """(3,) float64 voxel counts of :meth:`with_spacing` at ``spacing``, computed in floating point so that a
        budget can be checked before any integer size (or array) is made, even for absurdly small spacings."""
        return np.maximum(1.0, np.round(self.extent_mm / spacing_mm(spacing)))

    def voxel_count(self) -> int:
        return int(np.prod(np.asarray(self.size, dtype=np.int64)))

    def apply_to(self, image: sitk.Image) -> sitk.Image:
        """Set this geometry on ``image`` (whose size must match) and return it."""
        if tuple(image.GetSize()) != self.size:
            raise ValueError(f"image size {image.GetSize()} does not match grid size {self.size}")
        image.SetSpacing(self.spacing)
        image.SetOrigin(self.origin)
        image.SetDirection(self.direction)
        return image

    def image_from_array(self, array_kji: np.ndarray) -> sitk.Image:
        """SimpleITK image of a (K, J, I) array placed on this grid."""
        return self.apply_to(sitk.GetImageFromArray(np.ascontiguousarray(array_kji), isVector=False))

    def all_index_lps(self) -> np.ndarray:
        """(K·J·I, 3) float64 LPS mm of every voxel centre, in KJI (C-order) array order."""
        k, j, i = np.meshgrid(*(np.arange(n, dtype=np.float64) for n in self.size[::-1]), indexing="ij")
        return self.index_to_lps(np.stack([i.ravel(), j.ravel(), k.ravel()], axis=1))


@dataclass(frozen=True)
class ObjectFrame:
    """The model's object frame for one volume: ``xyz_obj = (xyz_ras - centre_ras) / scale_mm``.

    Attributes
    ----------
    centre_lps : (3,) float tuple, LPS mm of the volume box centre.
    scale_mm : float, millimetres per object-frame unit (reference 400).
    """

    centre_lps: tuple
    scale_mm: float = DEFAULT_SCALE_MM

    @classmethod
    def of(cls, grid: Grid, scale_mm: float = DEFAULT_SCALE_MM) -> "ObjectFrame":
        """Object frame centred on ``grid``'s voxel box.

        The reference centres on ``origin + size · spacing / 2`` (half a voxel past the true centre, for
        axis-aligned volumes only); we use the exact box centre, which also holds for oblique directions.
        """
        if not np.isfinite(scale_mm) or scale_mm <= 0:
            raise ValueError(f"scale_mm must be a positive number, got {scale_mm!r}")
        return cls(tuple(float(c) for c in grid.centre_lps), float(scale_mm))

    def lps_to_object(self, xyz_lps: np.ndarray) -> np.ndarray:
        """(N, 3) LPS mm → (N, 3) float32 object-frame coordinates (RAS-aligned axes)."""
        xyz = np.asarray(xyz_lps, dtype=np.float64) - np.asarray(self.centre_lps)
        return (xyz * LPS_TO_RAS / self.scale_mm).astype(np.float32)

    @property
    def lps_to_object_matrix(self) -> np.ndarray:
        """(4, 4) float64 homogeneous matrix of :meth:`lps_to_object` (before its float32 rounding)."""
        m = np.eye(4)
        m[:3, :3] = np.diag(LPS_TO_RAS / self.scale_mm)
        m[:3, 3] = -LPS_TO_RAS * np.asarray(self.centre_lps) / self.scale_mm
        return m

    def object_to_lps(self, xyz_obj: np.ndarray) -> np.ndarray:
        """(N, 3) object-frame coordinates → (N, 3) float64 LPS mm."""
        return np.asarray(xyz_obj, dtype=np.float64) * self.scale_mm * LPS_TO_RAS + np.asarray(self.centre_lps)

    def half_extent_mm(self, padding: float = DEFAULT_PADDING) -> float:
        """Half side (mm) of the cube around the centre that the feature grid covers; beyond it, clamping."""
        return 0.5 * (1.0 + padding + 0.001) * self.scale_mm

    def fraction_outside(self, xyz_lps: np.ndarray, padding: float = DEFAULT_PADDING) -> float:
        """Fraction of the (N, 3) LPS points that fall outside the grid's cube (and get clamped by the model)."""
        xyz = np.abs(np.asarray(xyz_lps, dtype=np.float64) - np.asarray(self.centre_lps))
        if len(xyz) == 0:
            return 0.0
        return float(np.mean(np.any(xyz > self.half_extent_mm(padding), axis=1)))
