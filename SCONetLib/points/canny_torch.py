"""3D Canny edges in torch, on the CPU or a CUDA device: voxel for voxel SimpleITK's ``CannyEdgeDetection``.

The four steps of ITK's ``CannyEdgeDetectionImageFilter`` (as documented in the ITK Software Guide, section
"Canny Edge Detection", and in its class reference) are reproduced with the same arithmetic, so that the edge
voxels are the same as SimpleITK's, not merely similar:

1. Gaussian smoothing (``DiscreteGaussianImageFilter``): Lindeberg's discrete Gaussian kernel ``e^-t I_n(t)`` per
   axis (t the variance in voxels², I_n the modified Bessel functions), truncated where its mass reaches
   ``1 - maximum_error`` and renormalised; applied along z, then y, then x, each pass accumulated in float64 tap
   by tap and stored as float32; zero-flux Neumann borders (edge voxels repeated).
2. The second derivative along the gradient, ``(Σ_ij g_i g_j g_ij) / (|g|² + 1e-4)``, from central differences:
   each difference operator summed in float64 and rounded to float32, the mixed terms added in float64, the rest
   in float32, in ITK's order of operations.
3. Non-maximum suppression: voxels where that derivative crosses zero towards a face neighbour (the voxel of the
   pair with the smaller magnitude, ties to the voxel below), and where the derivative of it along the gradient is
   ``≤ 0``; the edge strength there is ``|g|`` (float32 square root of the float32 sum).
4. Hysteresis: 26-connected components of ``strength > lower`` that contain a voxel of ``strength > upper``.

Steps 1–3 run as three passes over slabs of slices, each with a one-slice halo (the result does not depend on the
slab size), so memory is two float32 volumes of the 256² grid, two boolean volumes and the slabs' temporaries.
Step 4 uses ``scipy.ndimage.label`` for CPU tensors and, on CUDA, a sparse connected-components pass over the
candidate voxels (hooking and pointer jumping, as in Shiloach and Vishkin's algorithm) that never leaves the device.

References
----------
J. Canny, "A Computational Approach to Edge Detection", IEEE PAMI 8(6), 1986. T. Lindeberg, "Scale-space for
discrete signals", IEEE PAMI 12(3), 1990 (the discrete Gaussian). M. Abramowitz, I. Stegun, *Handbook of
Mathematical Functions*, 9.8.1–9.8.4 (the polynomial approximations of I_0 and I_1), and the downward recurrence
of I_n (Miller's algorithm) as given in *Numerical Recipes*, section 6.6. Y. Shiloach, U. Vishkin, "An O(log n)
parallel connectivity algorithm", J. Algorithms 3(1), 1982. ITK: https://github.com/InsightSoftwareConsortium/ITK.
"""
from __future__ import annotations

import math

import numpy as np
import SimpleITK as sitk
import torch
import torch.nn.functional as F
from scipy import ndimage

from ..parallel import ordered_map, single_threaded_ops
from .canny import (CANNY_MAXIMUM_ERROR, CANNY_RESOLUTION, CANNY_THRESHOLDS, CANNY_VARIANCE_MM2, _edge_points,
                    _resample_in_plane, check_ct_image)

#: ITK's default longest Gaussian kernel (taps on one side, centre included, beyond which it is truncated).
MAXIMUM_KERNEL_WIDTH = 32
#: Added to the squared gradient magnitude before dividing or taking its root (ITK's ``alpha²``).
_GRADIENT_EPSILON = np.float32(1e-4)
#: Voxels per slab (slices × in-plane voxels) on the CPU: a slab's arrays stay in the processor's cache.
CPU_SLAB_VOXELS = 262_144
#: Voxels per slab on a CUDA device: about 20 float32 arrays of this size live at once (~320 MB).
CUDA_SLAB_VOXELS = 4_194_304
#: Face neighbours in the order ITK's zero-crossing filter visits them: (dimension of a (K, J, I) tensor, step);
#: -x, -y, -z, then +x, +y, +z. A tie in magnitude marks the voxel only towards the last three.
_FACE_NEIGHBOURS = ((2, -1), (1, -1), (0, -1), (2, 1), (1, 1), (0, 1))


def canny_points_torch(image: sitk.Image, device: str | torch.device = "cpu") -> np.ndarray:
    """:func:`SCONetLib.points.canny_points` computed with torch on ``device``: the same points, in the same order.

    Parameters
    ----------
    image : SimpleITK.Image
        3D CT volume in Hounsfield units, any pixel type and direction.
    device : str or torch.device
        ``"cpu"``, ``"cuda"``, ``"cuda:N"``.

    Returns
    -------
    (N, 3) float64
        LPS mm of the edge voxel centres of the 256 × 256 in-plane grid, first image axis slowest.

    Raises
    ------
    TypeError, ValueError
        As :func:`SCONetLib.points.canny_points`.
    """
    check_ct_image(image)
    return _canny_points_torch(image, torch.device(device))


def _canny_points_torch(image: sitk.Image, device: torch.device) -> np.ndarray:
    """:func:`canny_points_torch` on an already validated image."""
    resampled = sitk.Cast(_resample_in_plane(image, CANNY_RESOLUTION), sitk.sitkFloat32)
    with single_threaded_ops(device) as workers:
        volume = torch.from_numpy(sitk.GetArrayFromImage(resampled)).to(device)
        edges = canny_edges(volume, resampled.GetSpacing(), CANNY_VARIANCE_MM2, CANNY_THRESHOLDS,
                            CANNY_MAXIMUM_ERROR, workers=workers)
        # (i, j, k) view: points listed with the first image axis slowest, as SimpleITK's path lists them
        ijk = torch.nonzero(edges.permute(2, 1, 0)).cpu().numpy()
    return _edge_points(resampled, ijk, image)


def canny_edges(volume: torch.Tensor, spacing, variance_mm2: float, thresholds, maximum_error: float,
                slab_voxels: int | None = None, workers: int = 1) -> torch.Tensor:
    """Edge voxels of a volume, as ``sitk.CannyEdgeDetection`` finds them.

    Parameters
    ----------
    volume : (K, J, I) tensor, any real dtype, any device
        Voxel values (converted to float32 first, as the SimpleITK call receives a float32 image).
    spacing : 3 floats
        Voxel spacing along i, j, k (mm); the Gaussian variance is divided by its square per axis.
    variance_mm2 : float
        Gaussian variance in physical units (mm²).
    thresholds : (lower, upper) floats
        Hysteresis thresholds on the gradient magnitude (value units per voxel step), compared in float32.
    maximum_error : float
        Kernel truncation error (the mass left out of the kernel).
    slab_voxels : int, optional
        Voxels per slab of slices; default :data:`CPU_SLAB_VOXELS` or :data:`CUDA_SLAB_VOXELS`. The result does
        not depend on it.
    workers : int
        Slabs computed at once on threads (CPU; see :mod:`SCONetLib.parallel`, best with torch's intra-op
        parallelism off, as :func:`canny_points_torch` runs it).

    Returns
    -------
    (K, J, I) bool tensor on ``volume``'s device
        True on edge voxels.

    Notes
    -----
    Three passes over slabs of slices, each reading the previous pass's float32 volume with a one-slice halo:
    smoothing, the second directional derivative, then the edge strength, which is thresholded at once. The slabs of
    a pass may run on ``workers`` threads. Peak memory is the input, two float32 volumes, two boolean volumes and
    the slabs' temporaries.
    """
    lower, upper = (float(np.float32(t)) for t in thresholds)
    k_size, j_size, i_size = volume.shape
    kernels = [gaussian_kernel(variance_mm2 / float(s) ** 2, maximum_error) for s in reversed(tuple(spacing))]
    if slab_voxels is None:
        slab_voxels = CUDA_SLAB_VOXELS if volume.device.type == "cuda" else CPU_SLAB_VOXELS
    slab = max(1, slab_voxels // (j_size * i_size))
    slabs = [(z0, min(k_size, z0 + slab)) for z0 in range(0, k_size, slab)]
    return hysteresis(*_thresholded_strength(volume, kernels, slabs, lower, upper, workers))


def _thresholded_strength(volume: torch.Tensor, kernels, slabs, lower: float, upper: float, workers: int):
    """Steps 1–3 over ``slabs``: (K, J, I) bool ``strength > lower`` and ``strength > upper``."""
    smoothed = torch.empty(volume.shape, dtype=torch.float32, device=volume.device)
    second = torch.empty_like(smoothed)
    candidates = torch.empty(volume.shape, dtype=torch.bool, device=volume.device)
    seeds = torch.empty_like(candidates)

    def smooth(slab):
        smoothed[slab[0]:slab[1]] = _smooth(volume, kernels, *slab)

    def differentiate(slab):
        second[slab[0]:slab[1]] = _second_derivative(_halo(smoothed, *slab))

    def threshold(slab):
        strength = _edge_strength(_halo(smoothed, *slab), _halo(second, *slab))
        torch.gt(strength, lower, out=candidates[slab[0]:slab[1]])
        torch.gt(strength, upper, out=seeds[slab[0]:slab[1]])

    for step in (smooth, differentiate, threshold):          # each pass reads the previous one's whole volume
        for _ in ordered_map(step, slabs, workers):
            pass
    return candidates, seeds


def gaussian_kernel(variance: float, maximum_error: float, maximum_width: int = MAXIMUM_KERNEL_WIDTH) -> np.ndarray:
    """Discrete Gaussian kernel of ITK's ``GaussianOperator``: ``e^-t I_n(t)`` for n = -r … r, normalised.

    Parameters
    ----------
    variance : float
        t, in voxels².
    maximum_error : float
        Taps are added (both sides at once) until their sum reaches ``1 - maximum_error``, or the half-kernel
        exceeds ``maximum_width`` taps; the kernel is then divided by that sum.

    Returns
    -------
    (2r + 1,) float64, symmetric, sums to 1.
    """
    decay = math.exp(-variance)
    half = [decay * _bessel_i0(variance), decay * _bessel_i1(variance)]
    total = half[0] + 2.0 * half[1]
    order = 2
    while total < 1.0 - maximum_error:
        half.append(decay * _bessel_in(order, variance))
        total += 2.0 * half[order]
        if half[order] <= 0.0 or len(half) > maximum_width:
            break
        order += 1
    half = np.asarray(half) / total
    return np.concatenate([half[:0:-1], half])


def _bessel_i0(y: float) -> float:
    """Modified Bessel function I_0, Abramowitz & Stegun 9.8.1 / 9.8.2 (relative error < 2e-7)."""
    d = abs(y)
    if d < 3.75:
        m = (y / 3.75) ** 2
        return 1.0 + m * (3.5156229 + m * (3.0899424 + m * (1.2067492 + m * (0.2659732 + m * (0.360768e-1
                                                                                             + m * 0.45813e-2)))))
    m = 3.75 / d
    return (_exp(d) / math.sqrt(d)) * (0.39894228 + m * (0.1328592e-1 + m * (0.225319e-2 + m * (
        -0.157565e-2 + m * (0.916281e-2 + m * (-0.2057706e-1 + m * (0.2635537e-1 + m * (-0.1647633e-1
                                                                                       + m * 0.392377e-2))))))))


def _exp(x: float) -> float:
    """``e^x``, infinite beyond the float64 range (as in C), so that an absurd variance gives a NaN kernel and no
    edges, like ITK, instead of an exception."""
    return math.exp(x) if x < 709.0 else math.inf


def _bessel_i1(y: float) -> float:
    """Modified Bessel function I_1, Abramowitz & Stegun 9.8.3 / 9.8.4."""
    d = abs(y)
    if d < 3.75:
        m = (y / 3.75) ** 2
        value = d * (0.5 + m * (0.87890594 + m * (0.51498869 + m * (0.15084934 + m * (0.2658733e-1 + m * (
            0.301532e-2 + m * 0.32411e-3))))))
    else:
        m = 3.75 / d
        value = 0.2282967e-1 + m * (-0.2895312e-1 + m * (0.1787654e-1 - m * 0.420059e-2))
        value = 0.39894228 + m * (-0.3988024e-1 + m * (-0.362018e-2 + m * (0.163801e-2 + m * (-0.1031555e-1
                                                                                           + m * value))))
        value *= _exp(d) / math.sqrt(d)
    return -value if y < 0.0 else value


def _bessel_in(n: int, y: float) -> float:
    """Modified Bessel function I_n, n ≥ 2: Miller's downward recurrence normalised by I_0 (Numerical Recipes)."""
    if y == 0.0:
        return 0.0
    two_over_y = 2.0 / abs(y)
    below, value, current = 0.0, 0.0, 1.0
    for j in range(2 * (n + int(math.sqrt(40.0 * n))), 0, -1):
        below, current = current, below + j * two_over_y * current
        if abs(current) > 1.0e10:
            value *= 1.0e-10
            current *= 1.0e-10
            below *= 1.0e-10
        if j == n:
            value = below
    value *= _bessel_i0(y) / current
    return -value if (y < 0.0 and n % 2) else value


def _smooth(volume: torch.Tensor, kernels, first: int, stop: int) -> torch.Tensor:
    """(stop - first, J, I) float32 Gaussian smoothing (step 1) of slices ``first … stop - 1`` of a (K, J, I)
    volume: along z, y then x, each pass summing tap after tap in float64 and storing float32 (as ITK does for a
    float32 image)."""
    k_size = volume.shape[0]
    radius = len(kernels[0]) // 2
    rows = torch.arange(first - radius, stop + radius, device=volume.device).clamp_(0, k_size - 1)
    x = _correlate(volume.index_select(0, rows).to(torch.float32), kernels[0], 0, stop - first)
    for dim in (1, 2):
        radius = len(kernels[dim]) // 2
        size = x.shape[dim]
        index = torch.arange(-radius, size + radius, device=x.device).clamp_(0, size - 1)
        x = _correlate(x.index_select(dim, index), kernels[dim], dim, size)
    return x


def _correlate(x: torch.Tensor, kernel: np.ndarray, dim: int, size: int) -> torch.Tensor:
    """``Σ_t kernel[t] · x[t + m]`` along ``dim`` for m < ``size``: float32 in and out, summed tap after tap from the
    first in float64."""
    x = x.double()
    out = x.narrow(dim, 0, size) * float(kernel[0])
    term = torch.empty_like(out)
    for tap in range(1, len(kernel)):
        torch.mul(x.narrow(dim, tap, size), float(kernel[tap]), out=term)
        out += term
    return out.float()




def _halo(x: torch.Tensor, z0: int, z1: int) -> torch.Tensor:
    """Slices ``z0 - 1 … z1`` of a (K, J, I) volume, padded by one voxel in-plane: (z1 - z0 + 2, J + 2, I + 2);
    voxels beyond the volume repeat its border (ITK's zero-flux Neumann condition)."""
    rows = torch.arange(z0 - 1, z1 + 1, device=x.device).clamp_(0, x.shape[0] - 1)
    return F.pad(x.index_select(0, rows), (1, 1, 1, 1), mode="replicate")


def _shifted(x: torch.Tensor, offset) -> torch.Tensor:
    """The (n, J, I) inner part of a padded (n + 2, J + 2, I + 2) slab, shifted by ``offset = (dz, dy, dx)``."""
    dz, dy, dx = offset
    n, j_size, i_size = x.shape[0] - 2, x.shape[1] - 2, x.shape[2] - 2
    return x[1 + dz:1 + dz + n, 1 + dy:1 + dy + j_size, 1 + dx:1 + dx + i_size]


def _unit(axis: int, step: int):
    """Offset (dz, dy, dx) of ``step`` voxels along ITK axis ``axis`` (0 = x, 1 = y, 2 = z)."""
    offset = [0, 0, 0]
    offset[2 - axis] = step
    return offset


def _central_difference(x: torch.Tensor, axis: int) -> torch.Tensor:
    """ITK's first-derivative operator (½, 0, -½) along ITK axis ``axis`` of a padded slab, in float32."""
    out = _shifted(x, _unit(axis, -1)) * 0.5
    out -= _shifted(x, _unit(axis, 1)) * 0.5
    return out


def _gradient(g: torch.Tensor):
    """Gradient (ITK axes x, y, z; 3 × (n, J, I) float32) and ``Σ g_i² + 1e-4`` (float32, summed in that order)."""
    gradient = [_central_difference(g, axis) for axis in range(3)]
    squared = torch.full_like(gradient[0], float(_GRADIENT_EPSILON))
    for component in gradient:
        squared += component * component
    return gradient, squared


def _second_derivative(g: torch.Tensor) -> torch.Tensor:
    """(n, J, I) float32 second derivative along the gradient (step 2) of a padded smoothed slab.

    ``(Σ_i<j 2 g_i g_j g_ij + Σ_i g_i² g_ii) / (Σ g_i² + 1e-4)`` in ITK's order of operations: ``g_ii`` and the
    mixed ``g_ij`` (quarter sums of the four diagonal neighbours) are summed in float64 and rounded to float32, each
    mixed term is added in float64 to the float32 running sum, the rest is float32.
    """
    gradient, squared = _gradient(g)
    wide = g.double()
    wide_gradient = [component.double() for component in gradient]
    out = None
    for a, b in ((0, 1), (0, 2), (1, 2)):
        def corner(sa, sb):
            return _shifted(wide, [u + v for u, v in zip(_unit(a, sa), _unit(b, sb))])
        mixed = corner(-1, -1) - corner(-1, 1)
        mixed -= corner(1, -1)
        mixed += corner(1, 1)
        mixed *= 0.25                                         # exact: the same as scaling each corner first
        term = wide_gradient[a] * wide_gradient[b]            # exact in float64, as is the factor 2
        term *= mixed.float().double()
        term *= 2.0
        if out is not None:
            term += out.double()
        out = term.float()
    for axis in range(3):                                     # ITK's operator (1, -2, 1), summed in float64
        curvature = _shifted(wide, _unit(axis, -1)) - _shifted(wide, (0, 0, 0)) * 2.0
        curvature += _shifted(wide, _unit(axis, 1))
        out += (gradient[axis] * gradient[axis]) * curvature.float()
    return out.div_(squared)


def _edge_strength(g: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
    """(n, J, I) float32 edge strength (step 3) from padded slabs of the smoothed image and of its second
    directional derivative: ``|g|`` where the derivative crosses zero and its own derivative along the gradient is
    ``≤ 0``, 0 elsewhere."""
    gradient, squared = _gradient(g)
    magnitude = torch.sqrt(squared.double()).float()
    along = torch.zeros_like(magnitude)
    for axis, component in enumerate(gradient):
        change = _central_difference(second, axis)
        change *= component / magnitude
        along += change
    keep = _zero_crossing(second)
    keep &= along <= 0
    return magnitude.mul_(keep)


def _zero_crossing(second: torch.Tensor) -> torch.Tensor:
    """(n, J, I) bool zero crossings of a padded slab (ITK's ``ZeroCrossingImageFilter``): the sign (-, 0, +)
    differs from a face neighbour's and the magnitude is smaller than the neighbour's (or equal, towards the
    neighbours at +x, +y, +z)."""
    sign, magnitude = torch.sign(second), second.abs()
    centre_sign, centre_magnitude = _shifted(sign, (0, 0, 0)), _shifted(magnitude, (0, 0, 0))
    crossing = torch.zeros(centre_sign.shape, dtype=torch.bool, device=second.device)
    for index, (dim, step) in enumerate(_FACE_NEIGHBOURS):
        offset = [0, 0, 0]
        offset[dim] = step
        compare = torch.le if index >= 3 else torch.lt
        found = compare(centre_magnitude, _shifted(magnitude, offset))
        found &= centre_sign != _shifted(sign, offset)
        crossing |= found
    return crossing


def hysteresis(candidates: torch.Tensor, seeds: torch.Tensor) -> torch.Tensor:
    """Voxels of ``candidates`` 26-connected (within ``candidates``) to a voxel of ``seeds``.

    Parameters
    ----------
    candidates, seeds : (K, J, I) bool tensors, same device; ``seeds`` ⊂ ``candidates``.

    Returns
    -------
    (K, J, I) bool tensor on the same device. CPU tensors go through ``scipy.ndimage.label``; others through
    :func:`hysteresis_sparse` (the same result, tested).
    """
    if candidates.device.type != "cpu":
        return hysteresis_sparse(candidates, seeds)
    labels, count = ndimage.label(candidates.numpy(), structure=np.ones((3, 3, 3), dtype=bool))
    keep = np.zeros(count + 1, dtype=bool)
    keep[labels[seeds.numpy()]] = True
    keep[0] = False
    return torch.from_numpy(keep[labels])


def hysteresis_sparse(candidates: torch.Tensor, seeds: torch.Tensor) -> torch.Tensor:
    """:func:`hysteresis` by connected components over the candidate voxels only, on any device.

    Candidates are listed (C-order flat indices); each finds its 13 "forward" 26-neighbours among them by binary
    search. Components are then found by repeated hooking (each root hooks onto the smallest root across its
    edges) and full pointer jumping, until no edge joins two roots; every candidate's root is then the smallest
    index of its component. The work is proportional to the candidates, not to the volume.
    """
    shape = candidates.shape
    flat = torch.nonzero(candidates.reshape(-1)).reshape(-1)
    count = flat.numel()
    out = torch.zeros(shape, dtype=torch.bool, device=candidates.device)
    if count == 0:
        return out
    plane = shape[1] * shape[2]
    k, j, i = flat // plane, (flat % plane) // shape[2], flat % shape[2]
    sources, targets = [], []
    for dk, dj, di in _FORWARD_NEIGHBOURS:
        nk, nj, ni = k + dk, j + dj, i + di
        inside = (nk < shape[0]) & (nj >= 0) & (nj < shape[1]) & (ni >= 0) & (ni < shape[2])
        neighbour = (nk * shape[1] + nj) * shape[2] + ni
        position = torch.searchsorted(flat, neighbour).clamp_(max=count - 1)
        found = inside & (flat[position] == neighbour)
        sources.append(torch.nonzero(found).reshape(-1))
        targets.append(position[found])
    sources, targets = torch.cat(sources), torch.cat(targets)
    parent = torch.arange(count, device=flat.device)
    while True:
        a, b = parent[sources], parent[targets]
        joined = a != b
        if not bool(joined.any()):
            break
        a, b = a[joined], b[joined]
        parent.scatter_reduce_(0, torch.maximum(a, b), torch.minimum(a, b), reduce="amin")
        while True:
            grand = parent[parent]
            if torch.equal(grand, parent):
                break
            parent = grand
    seeded = torch.zeros(count, dtype=torch.bool, device=flat.device)
    seeded[parent[seeds.reshape(-1)[flat]]] = True
    out.view(-1)[flat[seeded[parent]]] = True
    return out


#: The 13 neighbours (dk, dj, di) of the 26-neighbourhood that come after a voxel in C order.
_FORWARD_NEIGHBOURS = tuple((dk, dj, di) for dk in (-1, 0, 1) for dj in (-1, 0, 1) for di in (-1, 0, 1)
                            if (dk, dj, di) > (0, 0, 0))
