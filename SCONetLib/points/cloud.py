"""SCONet's input point cloud: Canny edge points with their int8-stored 3D SURF descriptors."""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Optional

import numpy as np
import SimpleITK as sitk
import torch

from ..geometry import ObjectFrame
from ..io import atomic_output
from ..progress import ProgressCallback, report, sub_progress
from ..validate import check_int
from .canny import _canny_points, check_ct_image
from .canny_torch import _canny_points_torch
from .surf import DEFAULT_SCALE_MM, DESCRIPTOR_SIZE, _surf3d
from .surf3d_torch import _surf3d_torch

logger = logging.getLogger(__name__)

#: Points drawn per volume by the reference configuration (``pointcloud_n``).
DEFAULT_N_POINTS = 50_000
#: Levels of the int8 descriptor storage: values map to [-127, 127] per column.
_INT8_LEVELS = 127
#: Added to each column's maximum before scaling, as the reference does (avoids a division by zero).
_SCALE_EPSILON = 1e-6
#: Version of the .npz layout written by :meth:`PointCloud.save`.
_FILE_VERSION = 1
#: Implementations of the point stage: ``"numpy"`` (SimpleITK's Canny filter and the NumPy SURF of :mod:`.surf3d`,
#: on the CPU), ``"torch"`` (:mod:`.canny_torch` and :mod:`.surf3d_torch`, on the given device), ``"auto"``.
IMPLEMENTATIONS = ("auto", "numpy", "torch")
#: What ``"auto"`` runs for each step, per device type: on the CPU the faster implementation on 2 cores
#: (``Testing/benchmarks/bench_points.py --compare``), elsewhere torch. Both give the same points and descriptors.
AUTO_IMPLEMENTATION = {"cpu": {"canny": "torch", "surf3d": "numpy"}, "cuda": {"canny": "torch", "surf3d": "torch"}}


@dataclass(frozen=True)
class PointCloud:
    """Edge points of one CT volume and their descriptors, stored as the reference does.

    Attributes
    ----------
    xyz_lps : (N, 3) float64
        Point positions, LPS millimetres.
    surf_int8 : (N, 48) int8
        3D SURF descriptors quantised per column: ``trunc(surf · 127 / maxima)`` with ``maxima`` the column's
        ``max |surf| + 1e-6`` over the cloud.
    surf_scale : (48,) float32
        ``maxima / 127``; ``features = surf_int8 · surf_scale``.
    """

    xyz_lps: np.ndarray
    surf_int8: np.ndarray
    surf_scale: np.ndarray

    def __post_init__(self):
        n = len(self.xyz_lps)
        expected = {"xyz_lps": ((n, 3), np.float64), "surf_int8": ((n, DESCRIPTOR_SIZE), np.int8),
                    "surf_scale": ((DESCRIPTOR_SIZE,), np.float32)}
        for name, (shape, dtype) in expected.items():
            value = getattr(self, name)
            if not isinstance(value, np.ndarray) or value.shape != shape or value.dtype != dtype:
                got = (value.shape, value.dtype) if isinstance(value, np.ndarray) else type(value).__name__
                raise ValueError(f"PointCloud.{name} must be a {shape} {np.dtype(dtype).name} array, got {got}")

    @classmethod
    def from_descriptors(cls, xyz_lps: np.ndarray, surf: np.ndarray) -> "PointCloud":
        """Quantise float descriptors to the reference's per-column int8 storage.

        Parameters
        ----------
        xyz_lps : (N, 3) float64, LPS mm.
        surf : (N, 48) float32 descriptors from :func:`SCONetLib.points.surf3d`.
        """
        surf = np.asarray(surf, dtype=np.float32)
        maxima = np.max(np.abs(surf) + np.float32(_SCALE_EPSILON), axis=0) if len(surf) else \
            np.full(DESCRIPTOR_SIZE, _SCALE_EPSILON, dtype=np.float32)
        quantised = (surf * np.float32(_INT8_LEVELS) / maxima).astype(np.int8)
        return cls(np.asarray(xyz_lps, dtype=np.float64), quantised,
                   (maxima / np.float32(_INT8_LEVELS)).astype(np.float32))

    @property
    def features(self) -> np.ndarray:
        """(N, 48) float32 de-quantised descriptors, as the model sees them."""
        return self.surf_int8.astype(np.float32) * self.surf_scale

    def model_input(self, frame: ObjectFrame) -> np.ndarray:
        """(N, 51) float32 model input: object-frame coordinates (3) then descriptor features (48)."""
        return np.concatenate([frame.lps_to_object(self.xyz_lps), self.features], axis=1).astype(np.float32)

    def save(self, path: str | os.PathLike) -> None:
        """Write a compressed ``.npz`` (no pickled objects), written to a temporary file then renamed."""
        with atomic_output(path, ".npz") as temporary:
            np.savez_compressed(temporary, version=np.int64(_FILE_VERSION), xyz_lps=self.xyz_lps,
                                surf_int8=self.surf_int8, surf_scale=self.surf_scale)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "PointCloud":
        """Read a file written by :meth:`save`."""
        with np.load(os.fspath(path), allow_pickle=False) as data:
            missing = {"version", "xyz_lps", "surf_int8", "surf_scale"} - set(data.files)
            if missing:
                raise ValueError(f"{os.fspath(path)!r} is not a SCONet point cloud: missing {sorted(missing)}")
            version = int(data["version"])
            if version != _FILE_VERSION:
                raise ValueError(f"{os.fspath(path)!r} has point-cloud format version {version}, "
                                 f"expected {_FILE_VERSION}")
            return cls(data["xyz_lps"], data["surf_int8"], data["surf_scale"])


def choose_implementations(implementation: str = "auto", device: str | torch.device = "cpu") -> dict:
    """``{"canny": name, "surf3d": name}``: the implementation of each step for ``implementation`` on ``device``.

    Raises
    ------
    ValueError
        ``implementation`` is not one of :data:`IMPLEMENTATIONS`.
    """
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"implementation must be one of {list(IMPLEMENTATIONS)}, got {implementation!r}")
    if implementation != "auto":
        return {"canny": implementation, "surf3d": implementation}
    return dict(AUTO_IMPLEMENTATION.get(torch.device(device).type, AUTO_IMPLEMENTATION["cuda"]))


def extract_point_cloud(image: sitk.Image, n_points: Optional[int] = DEFAULT_N_POINTS, seed: int = 0,
                        progress: Optional[ProgressCallback] = None, *, implementation: str = "auto",
                        device: str | torch.device = "cpu") -> PointCloud:
    """SCONet's input point cloud of a CT volume.

    Parameters
    ----------
    image : SimpleITK.Image
        3D CT volume in Hounsfield units, any pixel type and direction.
    n_points : int or None
        Points drawn uniformly **with replacement** from all Canny edge points (duplicates occur), as the
        reference does for training and testing; ``None`` keeps every edge point once, in Canny order.
    seed : int
        Seed of ``numpy.random.default_rng`` for the draw.
    progress : callable, optional
        ``progress(fraction, message)``; may raise :class:`SCONetLib.progress.Cancelled`, which propagates.
    implementation : str
        ``"auto"`` (see :data:`AUTO_IMPLEMENTATION`), ``"numpy"`` or ``"torch"``; all give the same cloud.
    device : str or torch.device
        Where the torch steps run (``"cpu"``, ``"cuda"``, ``"cuda:N"``); the volume is sent there once per step.

    Returns
    -------
    PointCloud
        ``xyz_lps`` (n_points, 3) float64 LPS mm, descriptors stored as int8 per column.

    Raises
    ------
    TypeError, ValueError
        Bad image (see :func:`SCONetLib.points.canny_points`), no edges, ``n_points`` not a positive integer, or an
        unknown ``implementation``.

    Notes
    -----
    Descriptors are computed once per distinct drawn point, then repeated. The int8 column maxima are taken over
    the drawn points, whereas the reference takes them over all edge points before drawing; the stored values
    therefore differ by at most one quantisation step of the column.
    """
    check_int("n_points", n_points, allow_none=True)
    steps = choose_implementations(implementation, device)
    device = torch.device(device)
    check_ct_image(image)
    report(progress, 0.0, "Canny edges")
    edges_lps = _canny_points_torch(image, device) if steps["canny"] == "torch" else _canny_points(image)
    report(progress, 0.2, f"{len(edges_lps)} edge points")
    if n_points is None:
        drawn = np.arange(len(edges_lps))
        unique, inverse = drawn, drawn
    else:
        drawn = np.random.default_rng(seed).integers(0, len(edges_lps), size=int(n_points))
        unique, inverse = np.unique(drawn, return_inverse=True)
    surf_progress = sub_progress(progress, 0.2, 1.0)
    surf = (_surf3d_torch(image, edges_lps[unique], DEFAULT_SCALE_MM, device, surf_progress)
            if steps["surf3d"] == "torch" else _surf3d(image, edges_lps[unique], DEFAULT_SCALE_MM, surf_progress))
    logger.info("point cloud: %d points (%d distinct) from %d edge voxels", len(drawn), len(unique), len(edges_lps))
    return PointCloud.from_descriptors(edges_lps[drawn], surf[inverse.reshape(-1)])
