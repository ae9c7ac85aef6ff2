"""3D SURF descriptors in torch, on the CPU or a CUDA device: the same descriptor as :mod:`.surf3d`.

The geometry (RAS re-orientation, padding, the 0.75 mm grid, each point's samples and Gaussian weights) is the one of
:mod:`SCONetLib.points.surf3d`; this module computes the Haar responses and their weighted sums with torch, so
the volume never leaves the device it was sent to:

1. The original slices a slab of the 0.75 mm grid needs are sent to the device once (as stored, e.g. int16),
   clamped and interpolated in-plane, then along z, with VTK's fixed-point weights in float64 and rounded to
   integers exactly as the NumPy implementation does (the same operations in the same order).
2. Haar responses of every grid sample of the slab: separable box sums along x, y (running sums, exact in
   integers) and z, in int32 or, when a partial sum could exceed it, int64.
3. The responses at the samples of each point whose z sample lies in the slab are gathered (10 × 10 in-plane per
   z sample) and contracted with the point's separable Gaussian weights in float64: points are grouped by their
   weight pattern, so each group's contraction is one matrix product.

Slabs of planes are sized to a voxel budget (:data:`CPU_SLAB_VOXELS`, :data:`CUDA_SLAB_VOXELS`), so memory does not
grow with the volume. Results equal the NumPy implementation's up to the order of float64 additions (float32
descriptors agree to one unit in the last place).
"""
from __future__ import annotations

import logging
from typing import Optional

import numpy as np
import torch

from ..geometry import lps_to_ras
from ..parallel import single_threaded_ops
from ..progress import ProgressCallback, report
from .canny import check_ct_image
from .surf import (_INTENSITY_OFFSET, _MAX_STORED, _SAMPLES, _VTK_ROUND_OFFSET, CLAMP_HU, DEFAULT_SCALE_MM,
                     DESCRIPTOR_SIZE, _check_points, _check_scale, _Contraction, _RasVolume, _SampleLayout)

logger = logging.getLogger(__name__)

#: Grid voxels per slab of planes on the CPU.
CPU_SLAB_VOXELS = 4_000_000
#: Grid voxels per slab on a CUDA device (about 50 bytes each are live at once: ~0.4 GB); a slab recomputes 2h - 1
#: planes of the previous one, so larger slabs waste less.
CUDA_SLAB_VOXELS = 8_000_000
#: (point, z sample) pairs gathered at once (each holds 600 float64 values while it is contracted).
_PAIRS_PER_BATCH = 32_768


def surf3d_torch(image, points_lps, scale_mm: float = DEFAULT_SCALE_MM, *, device: str | torch.device = "cpu",
                 progress: Optional[ProgressCallback] = None) -> np.ndarray:
    """:func:`SCONetLib.points.surf3d` computed with torch on ``device``: the same descriptors.

    Parameters
    ----------
    image, points_lps, scale_mm, progress
        As for :func:`SCONetLib.points.surf3d` (``progress`` is called once per slab of planes).
    device : str or torch.device
        ``"cpu"``, ``"cuda"``, ``"cuda:N"``.

    Returns
    -------
    (N, 48) float32 numpy array, laid out as :func:`SCONetLib.points.surf3d` documents; equal to it up to the order
    of float64 additions.

    Raises
    ------
    TypeError, ValueError
        As :func:`SCONetLib.points.surf3d`.
    """
    check_ct_image(image)
    points_lps = _check_points(points_lps)
    _check_scale(scale_mm)
    if len(points_lps) == 0:
        return np.zeros((0, DESCRIPTOR_SIZE), dtype=np.float32)
    return _surf3d_torch(image, points_lps, scale_mm, torch.device(device), progress)


def _surf3d_torch(image, points_lps: np.ndarray, scale_mm: float, device: torch.device,
                  progress: Optional[ProgressCallback] = None, slab_voxels: int | None = None) -> np.ndarray:
    """:func:`surf3d_torch` on a validated image and (N ≥ 1, 3) float64 points.

    ``slab_voxels``: grid voxels per slab of planes (default :data:`CPU_SLAB_VOXELS` or :data:`CUDA_SLAB_VOXELS`);
    the result does not depend on it. On the CPU, torch runs single-threaded here (safe in forked workers, see
    :mod:`SCONetLib.parallel`): this implementation is meant for CUDA, the NumPy one is the CPU's.
    """
    with single_threaded_ops(device):
        return _descriptors(image, points_lps, scale_mm, device, progress, slab_voxels)


def _descriptors(image, points_lps: np.ndarray, scale_mm: float, device: torch.device,
                 progress: Optional[ProgressCallback], slab_voxels: int | None) -> np.ndarray:
    """The body of :func:`_surf3d_torch`."""
    volume = _RasVolume.of(image)
    layout = _SampleLayout.of(lps_to_ras(points_lps).astype(np.float32), volume.axes, scale_mm)
    layout.check_support(volume.axes)
    n = len(points_lps)
    h = layout.half_box
    samples = layout.samples
    lo = [int(samples[:, 2].min())] + [int(samples[:, a].min()) for a in (1, 0)]          # z, y, x
    hi = [int(samples[:, 2].max()) + 1] + [int(samples[:, a].max()) + 1 for a in (1, 0)]
    my, mx = hi[1] - lo[1], hi[2] - lo[2]
    if slab_voxels is None:
        slab_voxels = CUDA_SLAB_VOXELS if device.type == "cuda" else CPU_SLAB_VOXELS
    planes_per_slab = max(1, slab_voxels // ((my + 2 * h) * (mx + 2 * h)))

    contraction = _Contraction.of(layout)
    matrices = torch.from_numpy(contraction.matrices).to(device)                        # (G, 100, 4) float64
    z_weights = torch.from_numpy(layout.gaussian(layout.distances[:, 2, :])).to(device)  # (N, 10) float64
    # (point, z sample) pairs sorted by the point's weight group, then by the z sample: each slab's pairs of a
    # group are one contiguous range
    z_samples = torch.from_numpy(samples[:, 2, :].astype(np.int64)).to(device).reshape(-1)
    group = torch.from_numpy(contraction.group).to(device).repeat_interleave(2 * _SAMPLES)
    span = hi[0] - lo[0]
    key = group * span + (z_samples - lo[0])
    order = torch.argsort(key)
    key = key[order]
    in_plane = torch.from_numpy(((samples[:, 1, :, None] - lo[1]) * mx + (samples[:, 0, None, :] - lo[2]))
                                .reshape(n, -1).astype(np.int64)).to(device)           # (N, 100), (y, x) order
    sums = torch.zeros(n * 2, 2, 2, 6, dtype=torch.float64, device=device)          # (point, c), b, a, q
    source = _DeviceVolume(volume, lo[1:], hi[1:], h, device)
    for s0 in range(lo[0], hi[0], planes_per_slab):
        s1 = min(hi[0], s0 + planes_per_slab)
        report(progress, (s0 - lo[0]) / span, "3D SURF descriptors")
        responses = _haar_responses(source.planes(s0 - h, s1 + h - 1), h, my, mx)     # (3, planes · my · mx)
        bounds = torch.arange(contraction.n_groups, device=device)[:, None] * span + torch.tensor(
            [s0 - lo[0], s1 - lo[0]], device=device)
        ranges = torch.searchsorted(key, bounds).tolist()
        for g, (first, stop) in enumerate(ranges):
            for b0 in range(first, stop, _PAIRS_PER_BATCH):
                pairs = order[b0:min(stop, b0 + _PAIRS_PER_BATCH)]
                point, k = pairs // (2 * _SAMPLES), pairs % (2 * _SAMPLES)
                index = in_plane[point] + ((z_samples[pairs] - s0) * (my * mx))[:, None]
                weighted = _contract(responses, index, matrices[g]) * z_weights[point, k][:, None, None, None]
                sums.index_add_(0, point * 2 + k // _SAMPLES, weighted)
    report(progress, 1.0, "3D SURF descriptors")
    # (point, c, b, a, q) → (point, a, b, c, q): subregion r = 4a + 2b + c
    descriptors = (sums.reshape(n, 2, 2, 2, 6).permute(0, 3, 2, 1, 4) * layout.inv_sigma3).float()
    return descriptors.reshape(n, DESCRIPTOR_SIZE).cpu().numpy()


def _contract(responses: torch.Tensor, index: torch.Tensor, matrix: torch.Tensor) -> torch.Tensor:
    """Gaussian-weighted in-plane sums at one z sample of each pair, for pairs of one weight group.

    Parameters
    ----------
    responses : (3, V) integer tensor, the slab's dx, dy, dz flattened.
    index : (P, 100) int64 flat indices of each pair's 10 × 10 samples, (y, x) order.
    matrix : (100, 4) float64 products of the group's y and x Gaussian factors, columns (half b of y, half a of x)
        (:class:`SCONetLib.points.surf._Contraction`).

    Returns
    -------
    (P, 2, 2, 6) float64: half b, half a, then Σdx, Σdy, Σdz, Σ|dx|, Σ|dy|, Σ|dz|.
    """
    p = len(index)
    values = torch.empty(6, p, 4 * _SAMPLES ** 2, dtype=torch.float64, device=index.device)
    values[:3] = responses[:, index.reshape(-1)].reshape(3, p, -1)
    torch.abs(values[:3], out=values[3:])
    return (values.reshape(6 * p, -1) @ matrix).reshape(6, p, 2, 2).permute(1, 2, 3, 0)


class _DeviceVolume:
    """Padded, clamped, 0.75 mm resampled intensities of a fixed (y, x) window, computed on a device.

    The original voxels the window needs are sent to the device once; each call resamples a range of planes.

    Parameters
    ----------
    volume : the RAS-ordered view of the image.
    lo, hi : (y, x) grid sample bounds; the window spans ``lo - h … hi + h - 2`` (the Haar boxes' reach).
    """

    def __init__(self, volume: _RasVolume, lo, hi, h: int, device: torch.device):
        self.axes = volume.axes
        self.device = device
        in_plane = [volume.axes[axis].interpolation(lo[1 - axis] - h, hi[1 - axis] + h - 1) for axis in (1, 0)]
        sources = [np.union1d(lower, upper) for lower, upper, _ in in_plane]
        data = volume.data_zyx[:, sources[0]][:, :, sources[1]]
        self.data = torch.from_numpy(np.ascontiguousarray(data)).to(device)
        self.in_plane = [(torch.from_numpy(np.searchsorted(source, lower)).to(device),
                          torch.from_numpy(np.searchsorted(source, upper)).to(device),
                          torch.from_numpy(weight).to(device))
                         for source, (lower, upper, weight) in zip(sources, in_plane)]

    def planes(self, first: int, stop: int) -> torch.Tensor:
        """Resampled planes ``first ≤ z < stop``: (stop - first, My + 2h - 1, Mx + 2h - 1) int32, VTK-rounded HU
        minus ``_INTENSITY_OFFSET`` (the values of :meth:`SCONetLib.points.surf._Resampler.planes`)."""
        lower, upper, weight = (torch.from_numpy(a).to(self.device) for a in self.axes[2].interpolation(first, stop))
        slices, position = torch.unique(torch.cat([lower, upper]), return_inverse=True)
        block = self.data.index_select(0, slices).double().clamp_(*CLAMP_HU)
        (y0, y1, wy), (x0, x1, wx) = self.in_plane
        block = _interpolate(block, x0, x1, wx, dim=2)
        block = _interpolate(block, y0, y1, wy, dim=1)
        block += _VTK_ROUND_OFFSET - _INTENSITY_OFFSET
        below, above = block[position[:len(lower)]], block[position[len(lower):]]
        plane = above - below
        plane *= weight[:, None, None]
        plane += below
        return plane.floor_().to(torch.int32)


def _interpolate(block: torch.Tensor, lower: torch.Tensor, upper: torch.Tensor, weight: torch.Tensor, dim: int):
    """Linear interpolation along ``dim``: ``block[lower] · (1 - weight) + block[upper] · weight`` (float64)."""
    shape = [1] * block.dim()
    shape[dim] = -1
    out = block.index_select(dim, lower)
    out *= (1.0 - weight).reshape(shape)
    out += block.index_select(dim, upper) * weight.reshape(shape)
    return out


def _haar_responses(resampled: torch.Tensor, h: int, my: int, mx: int) -> torch.Tensor:
    """Haar responses of every sample of a slab: (t + 2h - 1, My + 2h - 1, Mx + 2h - 1) resampled planes →
    (3, t · My · Mx) integers dx, dy, dz ("upper half minus lower half" of the 2h-box around each sample).

    dx = Dx By Bz R, dy = Bx Dy Bz R, dz = Bx By Dz R, B the 2h-box sum and D the difference of its halves, from
    running sums along x, then y, then z; exact. int32 when the largest running sum fits, else int64.
    """
    t = resampled.shape[0] - 2 * h + 1
    z_size, y_size, x_size = resampled.shape
    bound = _MAX_STORED * max(x_size, 2 * h * y_size, (2 * h) ** 2 * z_size)     # largest running sum
    dtype = torch.int32 if bound < 2 ** 31 else torch.int64
    lower, upper = _half_sums(resampled.to(dtype), h, 2, mx)
    box_x, diff_x = lower + upper, upper - lower
    del lower, upper
    lower, upper = _half_sums(diff_x, h, 1, my)
    by_dx = lower + upper
    lower, upper = _half_sums(box_x, h, 1, my)
    dy_bx, by_bx = upper - lower, upper + lower
    del lower, upper, diff_x, box_x
    out = torch.empty(3, t, my, mx, dtype=dtype, device=resampled.device)
    lower, upper = _half_sums(by_dx, h, 0, t)
    torch.add(lower, upper, out=out[0])
    lower, upper = _half_sums(dy_bx, h, 0, t)
    torch.add(lower, upper, out=out[1])
    lower, upper = _half_sums(by_bx, h, 0, t)
    torch.sub(upper, lower, out=out[2])
    return out.reshape(3, -1)


def _half_sums(x: torch.Tensor, h: int, dim: int, count: int):
    """Sums of ``h`` consecutive values along ``dim``: ``(x[m … m + h - 1], x[m + h … m + 2h - 1])`` for
    m < ``count``, from one running sum (exact for integers)."""
    shape = list(x.shape)
    shape[dim] = 1
    running = torch.cat([torch.zeros(shape, dtype=x.dtype, device=x.device), torch.cumsum(x, dim, dtype=x.dtype)],
                        dim)
    start, middle, end = (running.narrow(dim, offset, count) for offset in (0, h, 2 * h))
    return middle - start, end - middle
