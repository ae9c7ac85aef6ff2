"""Synthetic abdominal CT volumes with known organ labels and geometry.

:func:`make_phantom` draws a plausible abdominal CT (int16 HU) and its AbdomenCT-1K style label map (uint8:
0 background, 1 liver, 2 kidneys, 3 spleen, 4 pancreas) from a seed. The anatomy is a set of analytic shapes in
the patient's physical frame (LPS mm: x toward the patient's Left, y Posterior, z Superior), evaluated at the LPS
position of every voxel centre, so the same seed gives the same anatomy whatever the voxel grid's spacing, flips
or obliquity. :func:`write_dataset` writes an AbdomenCT-1K style folder of phantoms; ``python -m
SCONetLib.phantom OUT --n N --seed S`` does so from the command line.

Anatomy (patient frame, mm, ``z = 0`` near the first lumbar vertebra): elliptic body with skin, subcutaneous fat
and a muscle wall; ribs in the wall; lung bases, heart and mediastinal fat above a two-domed diaphragm; lumbar
spine (vertebral bodies with cortical shell, discs, canal, posterior elements), psoas and paraspinal muscles;
aorta with iliac bifurcation and inferior vena cava; liver (two lobes, gallbladder, hepatic and portal veins) on
the patient's right (LPS ``x < 0``); spleen posterolateral on the left; both kidneys beside the spine with cortex,
medulla and hilum; pancreas (head by the duodenum, body in front of the aorta, tail toward the splenic hilum);
stomach, duodenum, colon and small-bowel loops holding gas above a fluid or stool level. Shapes are ellipsoids
with random low-order surface modulation (organs) or chains of capsules with varying radius (tubes). The label
map is sampled at voxel centres; the CT gets a small partial-volume blur and white Gaussian noise.

Random streams: one seed feeds independent streams for the anatomy (including the patient's position in scanner
coordinates), the scan (spacing, coverage, slice position, noise level), the storage orientation and the noise
field, so switching ``random_orientation`` or fixing the spacing leaves the anatomy unchanged.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from SCONetLib import __version__
from SCONetLib import io as sconet_io
from SCONetLib import labels as organ_table
from SCONetLib.geometry import Grid, spacing_mm
from SCONetLib.io import write_json
from SCONetLib.progress import ProgressCallback, report, sub_progress
from SCONetLib.validate import check_int

logger = logging.getLogger(__name__)

NUM_CLASSES = organ_table.NUM_CLASSES
LIVER, KIDNEYS, SPLEEN, PANCREAS = (organ_table.organ_by_name(n).label
                                    for n in ("liver", "kidneys", "spleen", "pancreas"))

# Tissue classes of the body pass (``region`` array); their HU comes from the per-seed tissue table.
AIR, SKIN, FAT, MUSCLE, CAVITY, LUNG, MEDIASTINUM, DIAPHRAGM, RIB, RIB_MARROW, TABLE_SHELL, TABLE_CORE = range(12)
_N_REGIONS = 12

#: Default generator version of :func:`make_phantom` (1 keeps the seeds of earlier datasets; see VERSIONS).
DEFAULT_VERSION = 1
#: Default in-plane size, voxels.
DEFAULT_SIZE = 512
#: Field of view drawn per seed when no spacing is given: this fraction range × 512 mm, i.e. 0.6–0.9 mm pixels
#: at 512 × 512.
FOV_FRACTION = (0.6, 0.9)
#: Slice spacings drawn per seed when no spacing is given, mm.
SLICE_SPACINGS_MM = (1.0, 1.25, 1.5, 2.0, 2.5, 3.0, 4.0, 5.0)
#: Craniocaudal coverage drawn per seed when no slice count is given, mm.
COVERAGE_MM = (150.0, 300.0)
#: Noise standard deviation range, HU.
NOISE_HU = (10.0, 20.0)
#: Largest partial-volume blur the 3-tap kernel can represent, voxels.
MAX_BLUR_VOXELS = 0.8
#: Largest oblique rotation of a randomly oriented grid, degrees.
MAX_OBLIQUE_DEG = 10.0
#: Ranges that :func:`make_phantom` keeps organ volumes in when the whole organ is scanned, mL (checked in tests).
ORGAN_VOLUME_ML = {"liver": (1000.0, 2200.0), "kidneys": (200.0, 420.0), "spleen": (100.0, 320.0),
                   "pancreas": (50.0, 140.0)}


def make_phantom(seed: int, size=(DEFAULT_SIZE, DEFAULT_SIZE, None), spacing=None, random_orientation: bool = True,
                 noise_hu: float | None = None, blur_voxels: float = 0.7,
                 progress: ProgressCallback | None = None, version: int = DEFAULT_VERSION,
                 max_slices: int | None = None) -> tuple[sitk.Image, sitk.Image]:
    """A synthetic abdominal CT and its organ label map.

    Parameters
    ----------
    seed : int >= 0; the same seed and arguments give the same images.
    size : (3,) voxels along i, j, k; the slice count may be ``None`` (chosen to cover 150–300 mm).
    spacing : None, or one or three positive numbers (mm, i/j/k). ``None``: square pixels spanning a field of view
        of 0.6–0.9 × 512 mm (0.6–0.9 mm pixels at 512 × 512, proportionally coarser for smaller sizes) and a
        slice spacing drawn from :data:`SLICE_SPACINGS_MM`.
    random_orientation : if True, axes are flipped at random (LPS- or RAS-like storage, head-first or feet-first
        slice order) and about a third of the grids are tilted by up to 10°; if False the direction is identity.
        The anatomy, spacing and slice position do not depend on this flag.
    noise_hu : noise standard deviation (HU); ``None`` draws it from :data:`NOISE_HU`.
    blur_voxels : partial-volume blur of the CT, standard deviation in voxels along each axis, 0 (none) to 0.8;
        a separable 3-tap kernel ``[w, 1 - 2w, w]`` with ``w = blur_voxels² / 2`` (same variance as the Gaussian).
    progress : optional ``callback(fraction, message)``; may raise :class:`~SCONetLib.progress.Cancelled`.
    version : generator version, 1 (default: one narrow layout, the seeds of earlier datasets) or 2 (domain
        randomisation: every quantity of :data:`RANGES_V2` drawn per seed; contrast phase, kernel, slice thickness
        and noise replace ``noise_hu``'s default draw).
    max_slices : optional cap on the slice count when it is drawn (``size[2]`` None), to bound the work.

    Returns
    -------
    ct : sitk.Image, int16 HU (air −1000). Its metadata ``sconet_phantom_version`` holds the version and
        ``sconet_phantom_parameters`` the drawn values of :func:`phantom_parameters` (JSON).
    labels : sitk.Image, uint8 AbdomenCT-1K labels (0 background, 1 liver, 2 kidneys, 3 spleen, 4 pancreas),
        same geometry as ``ct`` (LPS).

    Notes
    -----
    The scan's z range covers every organ's centre whenever the coverage is at least 100 mm (below that it is
    centred on the organs) and the whole of every organ when it is at least 280 mm; between, it reaches as far
    beyond the organ centres as the coverage allows. A 512 × 512 × 100 phantom takes about 1.5 s on one core.
    """
    if not 0 <= blur_voxels <= MAX_BLUR_VOXELS:
        raise ValueError(f"blur_voxels must be a number in [0, {MAX_BLUR_VOXELS}] (voxels), got {blur_voxels!r}")
    if noise_hu is not None and (not np.isfinite(noise_hu) or noise_hu < 0):
        raise ValueError(f"noise_hu must be None or a number >= 0 (HU), got {noise_hu!r}")
    draw = _draw(seed, size, spacing, random_orientation, version, max_slices)
    sigma = draw.noise_hu if noise_hu is None else float(noise_hu)
    report(progress, 0.0, "building phantom anatomy")
    scene = _Scene(draw.grid, draw.anatomy)
    scene.render(sub_progress(progress, 0.0, 0.8))
    report(progress, 0.8, "adding blur and noise")
    hu = scene.hu
    if draw.look is not None:
        _texture_and_metal(hu, scene, draw)
        _slice_profile(hu, draw.look.thickness_mm(draw.grid.spacing[2]) / draw.grid.spacing[2])
    if blur_voxels > 0:
        _blur3(hu, blur_voxels)
    noise = draw.noise_rng.standard_normal(hu.shape, dtype=np.float32)
    if draw.look is not None and draw.look.noise_grain_voxels > 0.2:  # correlated noise, same σ
        g = draw.look.noise_grain_voxels
        noise = ndimage.gaussian_filter(noise, (0.0, g, g))
        noise /= max(float(noise.std()), 1e-6)
    noise *= np.float32(sigma)
    hu += noise
    del noise
    if draw.look is not None:
        _kernel(hu, draw.look)
    np.rint(hu, out=hu)
    np.clip(hu, -1024, 3071, out=hu)
    ct = draw.grid.image_from_array(hu.astype(np.int16))
    labels = draw.grid.image_from_array(scene.labels)
    for image in (ct, labels):
        image.SetMetaData("sconet_phantom_version", str(draw.version))
        image.SetMetaData("sconet_phantom_parameters", json.dumps(draw.parameters, sort_keys=True))
    report(progress, 1.0, "phantom done")
    return ct, labels


@dataclass
class _Draw:
    """Everything drawn for one phantom before rendering."""

    version: int
    anatomy: _Anatomy
    grid: Grid
    look: object           # _Look (version 2) or None
    noise_hu: float
    noise_rng: np.random.Generator
    look_rng: np.random.Generator
    parameters: dict


def _draw(seed, size, spacing, random_orientation, version, max_slices) -> _Draw:
    """Check the arguments and draw anatomy, appearance and scan grid (independent random streams)."""
    seed = check_int("seed", seed, 0)
    size = _check_size(size)
    spacing = _check_spacing(spacing)
    if isinstance(version, bool) or version not in VERSIONS:
        raise ValueError(f"version must be one of {VERSIONS}, got {version!r}")
    check_int("max_slices", max_slices, 2, allow_none=True)
    streams = [np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(4 if version == 1 else 6)]
    anatomy_rng, scan_rng, orientation_rng, noise_rng = streams[:4]
    look, parameters, look_rng = None, {}, None
    if version == 1:
        anatomy = _Anatomy.random(anatomy_rng)
    else:
        look_rng, variant_rng = streams[4:]
        anatomy = _Anatomy.random(anatomy_rng, _SPREADS[2])
        look = _Look.random(look_rng)
        look.set_tissue_hu(anatomy, look_rng)
        parameters = _randomise_anatomy(anatomy, variant_rng)
        look.add_contrast(anatomy, look_rng)
    grid = _scan_grid(anatomy, size, spacing, scan_rng, orientation_rng if random_orientation else None, version,
                      max_slices)
    sigma = float(scan_rng.uniform(*NOISE_HU)) if version == 1 else look.noise_at(grid.spacing)
    if look is not None:
        parameters.update(
            phase=look.phase, body_half_width_mm=float(anatomy.body["a"]), fat_front_mm=float(anatomy.body["fat_ant"]),
            fatty_liver=look.fatty_liver, excreted_contrast=look.excreted_contrast, oral_contrast=look.oral_contrast,
            texture_hu=float(look.texture_hu), noise_hu=float(look.noise_hu), kernel=look.kernel,
            slice_spacing_mm=float(grid.spacing[2]), slice_thickness_mm=look.thickness_mm(grid.spacing[2]),
            coverage_mm=float(grid.size[2] * grid.spacing[2]),
            field_of_view_mm=float(min(grid.size[0] * grid.spacing[0], grid.size[1] * grid.spacing[1])),
            table=anatomy.table is not None, metal=look.metal)
    return _Draw(version, anatomy, grid, look, sigma, noise_rng, look_rng, parameters)


def phantom_parameters(seed: int, size=(DEFAULT_SIZE, DEFAULT_SIZE, None), spacing=None,
                       random_orientation: bool = True, version: int = 2, max_slices: int | None = None) -> dict:
    """The randomised quantities :func:`make_phantom` draws for these arguments (keys of :data:`RANGES_V2`),
    without rendering; empty for version 1."""
    return _draw(seed, size, spacing, random_orientation, version, max_slices).parameters


def _texture_and_metal(hu: np.ndarray, scene: "_Scene", draw: _Draw) -> None:
    """Version 2: smooth organ texture (stronger in the arterial spleen) and, if drawn, metal with streaks."""
    look, rng, labels = draw.look, draw.look_rng, scene.labels
    if look.texture_hu > 0:
        coarse = rng.standard_normal(tuple(max(2, n // f) for n, f in zip(hu.shape, (2, 6, 6)))).astype(np.float32)
        field = ndimage.zoom(ndimage.gaussian_filter(coarse, 1.0), [n / c for n, c in zip(hu.shape, coarse.shape)],
                             order=1, grid_mode=True, mode="nearest")[:hu.shape[0], :hu.shape[1], :hu.shape[2]]
        field /= max(float(field.std()), 1e-6)
        gain = np.zeros(NUM_CLASSES, np.float32)
        gain[1:] = look.texture_hu
        if look.phase == "arterial":
            gain[SPLEEN] = 2.5 * look.texture_hu + 10.0
        hu += gain[labels] * field
    if not look.metal:
        return
    a, grid = draw.anatomy, draw.grid
    box_centre = grid.index_to_lps((np.asarray(grid.size, float) - 1.0)[None] / 2.0)[0]
    z = box_centre[2] - a.offset[2] + rng.uniform(-0.4, 0.4) * grid.size[2] * grid.spacing[2]
    spot = a.offset + np.array([rng.choice([-1, 1]) * rng.uniform(0, 12), a.spine["y"] + rng.uniform(-5, 10), z])
    i, j, k = grid.lps_to_index(spot[None])[0]
    sx, sy, sz = grid.spacing
    radius, reach = rng.uniform(3, 6), rng.uniform(80, 250)
    n = int(rng.integers(4, 10))
    angles, signs = rng.uniform(0, np.pi, n), rng.choice([-1.0, 1.0], n) * rng.uniform(150, 600, n)
    width = rng.uniform(1.5, 4.0)
    jj, ii = np.mgrid[0:hu.shape[1], 0:hu.shape[2]].astype(np.float32)
    dx, dy = (ii - np.float32(i)) * np.float32(sx), (jj - np.float32(j)) * np.float32(sy)
    r = np.sqrt(dx * dx + dy * dy)
    streaks = sum(np.float32(sign) * np.exp(-((np.cos(t) * dy - np.sin(t) * dx) / np.float32(width)) ** 2)
                  for t, sign in zip(angles, signs)) * np.exp(-r / np.float32(reach))
    reach_k = (radius + 15.0) / sz  # slices within 15 mm of the metal's surface
    for kk in range(max(0, int(np.floor(k - reach_k))), min(hu.shape[0], int(np.ceil(k + reach_k)) + 1)):
        dz = (kk - k) * sz
        hu[kk] += streaks * np.float32(np.exp(-(dz / (radius + 5.0)) ** 2))
        hu[kk][r * r + dz * dz < radius * radius] = 3000.0


def _slice_profile(hu: np.ndarray, thickness_voxels: float) -> None:
    """Blur along the slice axis (array axis 0) by a Gaussian of FWHM ``thickness_voxels``, in place."""
    sigma = thickness_voxels / 2.355
    if sigma > 0.3 and hu.shape[0] > 1:
        ndimage.gaussian_filter1d(hu, sigma, axis=0, output=hu, mode="nearest")


def _kernel(hu: np.ndarray, look) -> None:
    """Reconstruction kernel in plane, in place: soft (Gaussian blur) or sharp (unsharp mask)."""
    if look.kernel == "soft":
        ndimage.gaussian_filter(hu, (0.0, look.kernel_amount, look.kernel_amount), output=hu)
    elif look.kernel == "sharp":
        hu += np.float32(look.kernel_amount) * (hu - ndimage.gaussian_filter(hu, (0.0, 1.0, 1.0)))


def _blur3(volume: np.ndarray, sigma: float) -> None:
    """Blur a 3D float32 array in place with the kernel ``[w, 1 - 2w, w]``, ``w = sigma² / 2``, on every axis.

    Edges repeat the border voxel. Variance per axis is ``2w = sigma²``.
    """
    w = np.float32(sigma * sigma / 2.0)
    neighbours = np.empty_like(volume)
    for axis in range(volume.ndim):
        v, nb = np.moveaxis(volume, axis, 0), np.moveaxis(neighbours, axis, 0)
        if v.shape[0] < 2:
            continue
        np.add(v[:-2], v[2:], out=nb[1:-1])
        np.add(v[0], v[1], out=nb[0])
        np.add(v[-1], v[-2], out=nb[-1])
        nb *= w
        v *= np.float32(1.0) - 2 * w
        v += nb


def _check_size(size) -> tuple:
    try:
        values = tuple(size)
    except TypeError:
        values = ()
    ok = len(values) == 3 and all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) and v >= 8
                                  for v in values[:2])
    ok = ok and (values[2] is None or (isinstance(values[2], (int, np.integer)) and values[2] >= 2))
    if not ok:
        raise ValueError(f"size must be (nx, ny, nz) with nx, ny integers >= 8 and nz an integer >= 2 or None, "
                         f"got {size!r}")
    return tuple(None if v is None else int(v) for v in values)


def _check_spacing(spacing):
    return None if spacing is None else tuple(float(v) for v in spacing_mm(spacing))


# --------------------------------------------------------------------------------------------------------------
# Shapes: signed distance (mm, negative inside) evaluated on blocks of patient-frame coordinates.


@dataclass(frozen=True)
class _Blob:
    """Ellipsoid with a smooth random surface modulation.

    ``centre`` (3,) mm, ``axes`` (3,) semi-axes mm, ``rotation`` (3, 3) whose columns are the local axes in the
    patient frame. With ``q`` the local point divided by the semi-axes and ``n = |q|``, the surface is
    ``n = 1 + P(q) / n³``, where ``P`` is a cubic with ``coefficients`` (6,) on the monomials ``q0 q1 q2``,
    ``q0² q1``, ``q0 q1²``, ``q1² q2``, ``q1 q2²`` and ``q2² q0``: odd terms, so the blob becomes egg- or
    bean-like rather than symmetric.
    """

    centre: np.ndarray
    axes: np.ndarray
    rotation: np.ndarray
    coefficients: np.ndarray

    @classmethod
    def random(cls, rng, centre, axes, angles_deg=(0.0, 0.0, 0.0), wobble=0.3):
        """Blob with monomial coefficients drawn uniformly in ±``wobble``."""
        return cls(np.asarray(centre, float), np.asarray(axes, float), _rotation(*angles_deg),
                   rng.uniform(-wobble, wobble, 6))

    def surface_points(self, n: int = 1500) -> np.ndarray:
        """(n, 3) points of the surface (patient frame, mm) along a Fibonacci sphere of local directions.

        Along a unit local direction ``û`` the surface lies at ``q = (1 + P(û)) û``.
        """
        k = np.arange(n) + 0.5
        polar, azimuth = np.arccos(1.0 - 2.0 * k / n), np.pi * (1.0 + 5.0 ** 0.5) * k
        u = np.stack([np.sin(polar) * np.cos(azimuth), np.sin(polar) * np.sin(azimuth), np.cos(polar)], axis=1)
        c = self.coefficients
        poly = (u[:, 0] * u[:, 1] * (c[0] * u[:, 2] + c[1] * u[:, 0] + c[2] * u[:, 1])
                + u[:, 1] * u[:, 2] * (c[3] * u[:, 1] + c[4] * u[:, 2]) + c[5] * u[:, 2] ** 2 * u[:, 0])
        return self.centre + ((1.0 + poly)[:, None] * u * self.axes) @ self.rotation.T

    def bounds(self):
        points = self.surface_points()
        return points.min(axis=0) - 2.0, points.max(axis=0) + 2.0

    def sdf(self, x, y, z):
        """Radial signed distance to the surface (mm, along the ray from the centre; negative inside)."""
        f32 = np.float32
        d = (x - f32(self.centre[0]), y - f32(self.centre[1]), z - f32(self.centre[2]))
        q = []
        for c in range(3):
            w = self.rotation[:, c] / self.axes[c]
            qc = d[0] * f32(w[0])
            qc += d[1] * f32(w[1])
            qc += d[2] * f32(w[2])
            q.append(qc)
        n2 = q[0] * q[0]
        n2 += q[1] * q[1]
        n2 += q[2] * q[2]
        np.maximum(n2, f32(1e-8), out=n2)
        c = [f32(v) for v in self.coefficients]
        q01, q12 = q[0] * q[1], q[1] * q[2]
        poly = q01 * (c[0] * q[2] + c[1] * q[0] + c[2] * q[1])
        poly += q12 * (c[3] * q[1] + c[4] * q[2])
        poly += (c[5] * q[2]) * q[2] * q[0]
        n = np.sqrt(n2)
        poly /= n2 * n  # the surface radius minus one, along this direction
        poly += f32(1.0)
        poly /= n  # (surface radius) / n
        dist2 = d[0] * d[0]
        dist2 += d[1] * d[1]
        dist2 += d[2] * d[2]
        out = np.sqrt(dist2)
        out *= f32(1.0) - poly
        return out


@dataclass(frozen=True)
class _Tube:
    """Chain of capsules through ``points`` (n, 3) mm with radii ``radii`` (n,) mm, interpolated along each one."""

    points: np.ndarray
    radii: np.ndarray

    def bounds(self):
        r = self.radii[:, None]
        return (self.points - r).min(axis=0), (self.points + r).max(axis=0)

    def segments(self):
        """Per capsule: (start, end, start radius, end radius, bounds low, bounds high)."""
        for a, b, ra, rb in zip(self.points[:-1], self.points[1:], self.radii[:-1], self.radii[1:]):
            r = max(ra, rb)
            yield a, b, ra, rb, np.minimum(a, b) - r, np.maximum(a, b) + r


def _capsule_sdf(x, y, z, a, b, ra, rb):
    """Signed distance (mm) to the capsule from ``a`` to ``b`` with radius ``ra`` → ``rb``, and the axis point's y."""
    ab = b - a
    length2 = max(float(ab @ ab), 1e-9)
    px, py, pz = x - np.float32(a[0]), y - np.float32(a[1]), z - np.float32(a[2])
    t = (px * np.float32(ab[0]) + py * np.float32(ab[1]) + pz * np.float32(ab[2])) * np.float32(1.0 / length2)
    np.clip(t, 0.0, 1.0, out=t)
    ex, ey, ez = px - t * np.float32(ab[0]), py - t * np.float32(ab[1]), pz - t * np.float32(ab[2])
    dist = np.sqrt(ex * ex + ey * ey + ez * ez) - (np.float32(ra) + t * np.float32(rb - ra))
    return dist, y - ey


def _rotation(ax_deg: float, ay_deg: float, az_deg: float) -> np.ndarray:
    """(3, 3) rotation ``Rz @ Ry @ Rx`` (degrees about the patient-frame x, y, z axes)."""
    cx, cy, cz = np.cos(np.radians([ax_deg, ay_deg, az_deg]))
    sx, sy, sz = np.sin(np.radians([ax_deg, ay_deg, az_deg]))
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return rz @ ry @ rx


# --------------------------------------------------------------------------------------------------------------
# Anatomy: every random choice about the patient, in the patient frame (LPS axes, mm, origin near L1).


@dataclass
class _Bowel:
    """A gas/fluid filled tube or blob: ``shape``, wall thickness (mm), gas level and contents."""

    shape: object
    wall_mm: float
    gas_level_mm: float  # gas where (y - axis y) < level: -radius → none, +radius → all gas
    content_hu: float
    mottle: np.ndarray = None  # (3, 3) wave vectors (rad/mm) of gas bubbles in stool, or None


@dataclass
class _Anatomy:
    """Random patient: body outline, tissue HU, organs, vessels, bowel, skeleton (patient frame, mm)."""

    offset: np.ndarray                     # (3,) LPS mm of the patient-frame origin in scanner coordinates
    hu: dict                               # tissue name -> HU
    body: dict                             # outline and wall parameters
    spine: dict
    ribs: dict
    domes: list                            # diaphragm domes: (x, y, top z, width x, width y)
    organs: list = field(default_factory=list)       # (label, shape, HU or (cortex, medulla))
    carve: list = field(default_factory=list)        # (shape, HU, label the carving applies to)
    vessels: list = field(default_factory=list)      # (shape, HU, only inside this label or None)
    muscles: list = field(default_factory=list)      # psoas tubes
    bowel: list = field(default_factory=list)
    heart: object = None
    organ_z_range: dict = field(default_factory=dict)  # organ name -> (z low, z centre, z high)
    aorta_front: float = 0.0                           # y of the aorta's anterior wall
    ivc: np.ndarray = None                             # (2,) x, y of the inferior vena cava axis

    warp: tuple = ()                                   # deformation: amplitudes (n, 3) mm, waves (n, 3), phases (n,)
    arms: list = field(default_factory=list)           # (x, y, half-width x, half-width y, humerus radius) mm
    table: dict = None                                 # patient table below the back, or None
    overlays: list = field(default_factory=list)       # (shape, HU, label required, label set): lesions, excretion

    @classmethod
    def random(cls, rng, spread: "_Spread" = None) -> "_Anatomy":
        """Draw a patient: tissue HU, body size, then skeleton, vessels, organs and bowel placed around it.

        ``spread`` holds the ranges that differ between generator versions (default: version 1's)."""
        spread = spread or _SPREADS[1]
        u = rng.uniform
        hu = {"fat": u(-110, -90), "cavity_fat": u(-95, -75), "muscle": u(45, 58), "skin": u(20, 40),
              "liver": u(55, 65), "spleen": u(42, 50), "pancreas": u(35, 45), "kidney_cortex": u(30, 40),
              "lung": u(-870, -820), "mediastinum": u(-90, -60), "blood": u(40, 200), "bile": u(0, 20),
              "cancellous": u(280, 360), "cortical": u(650, 750), "disc": u(80, 110), "csf": u(5, 20),
              "rib": u(550, 700), "rib_marrow": u(200, 300), "sinus_fat": u(-90, -50)}
        hu["kidney_medulla"] = hu["kidney_cortex"] - u(4, 10)
        hu["vein"] = 40.0 + u(0.5, 0.9) * (hu["blood"] - 40.0)
        a, b_ant, b_post = u(*spread.body_a), u(*spread.body_b_ant), u(*spread.body_b_post)
        fat_ant, fat_post, wall = u(*spread.fat_ant), u(*spread.fat_post), u(10, 15)
        body = {"a": a, "b_ant": b_ant, "b_post": b_post, "taper": u(-0.02, 0.05), "skin": 2.0,
                "fat_ant": fat_ant, "fat_post": fat_post, "wall": wall}
        cav_a = a - 0.5 * (fat_ant + fat_post) - wall - 2.0
        cav_b = 0.5 * (b_ant - fat_ant + b_post - fat_post) - wall - 2.0
        sx, sy = (np.clip(c / n, *spread.cavity_scale) for c, n in ((cav_a, 120.0), (cav_b, 80.0)))

        def jitter(x, y, z, mm=6.0):
            mm *= spread.jitter
            return np.array([x * sx, y * sy, z]) + rng.uniform(-mm, mm, 3)

        def scaled(*axes, lo=0.9, hi=1.1):
            if spread.size != 1.0:
                lo, hi = 1.0 - spread.size * (1.0 - lo), 1.0 + spread.size * (hi - 1.0)
            return np.asarray(axes, float) * rng.uniform(lo, hi, 3)

        # Spine: vertebral body centre ~65 mm in front of the posterior skin.
        rx, ry = u(20, 25), u(15, 19)
        y_v = b_post - u(60, 72) if spread.version == 1 else b_post - fat_post - u(46, 60)
        canal_y = ry + 9.0
        spine = {"y": y_v, "lordosis": u(0, 8), "z0": u(-60, 0), "rx": rx, "ry": ry, "pitch": u(30, 36),
                 "disc": u(7, 10), "phase": u(0, 36), "canal_y": canal_y, "canal_r": (u(8, 10), u(7, 9)),
                 "spinous_end": b_post - fat_post - 8.0 - y_v, "transverse": u(38, 48),
                 "erector": (u(30, 38), canal_y + u(16, 24), u(18, 24), u(15, 20))}
        ribs = {"z_base": u(-5, 15), "pitch": u(24, 30), "count": 8, "drop": u(55, 80), "half_width": 5.0}
        anatomy = cls(offset=np.array([u(-40, 40), u(-60, 60), u(-800, 200)]), hu=hu, body=body, spine=spine,
                      ribs=ribs, domes=[])
        anatomy._add_vessels(rng, rx, ry, y_v)
        anatomy._add_organs(rng, jitter, scaled, rx, y_v, spread)
        anatomy._add_bowel(rng, jitter, sx, sy)
        return anatomy

    def _add_vessels(self, rng, rx, ry, y_v):
        u = rng.uniform
        r_ao, r_ivc = u(9, 13), u(9, 12)
        x_ao, y_ao = u(5, 15), y_v - ry - r_ao - 1.0
        z_bif = u(-120, -80)
        self.aorta_front = y_ao - r_ao
        aorta = _Tube(np.array([[x_ao, y_ao, 320.0], [x_ao, y_ao, 100.0], [x_ao - 2, y_ao + 2, z_bif]]),
                      np.array([r_ao, r_ao, r_ao * 0.9]))
        self.vessels.append((aorta, self.hu["blood"], None))
        for side in (-1, 1):
            self.vessels.append((_Tube(np.array([[x_ao - 2, y_ao + 2, z_bif], [side * 45.0, y_ao + 15, z_bif - 120]]),
                                       np.array([r_ao * 0.65, r_ao * 0.55])), self.hu["blood"], None))
        self.ivc = np.array([u(-28, -20), y_v - ry - r_ivc + 4.0])
        ivc = _Tube(np.array([[self.ivc[0], self.ivc[1], -250.0], [self.ivc[0], self.ivc[1], 320.0]]),
                    np.array([r_ivc, r_ivc]))
        self.vessels.append((ivc, self.hu["vein"], None))
        # Psoas muscles beside the vertebral bodies, thickening downward.
        for side in (-1, 1):
            zs = np.array([20.0, -20.0, -60.0, -110.0, -160.0, -260.0])
            radii = np.interp(zs, [-160.0, 20.0], [u(18, 24), 6.0])
            points = np.stack([side * (rx + radii - 3.0), np.full_like(zs, y_v + 3.0), zs], axis=1)
            self.muscles.append(_Tube(points, radii))

    def _add_organs(self, rng, jitter, scaled, rx, y_v, spread):
        u = rng.uniform
        hu = self.hu
        # Liver: right lobe (patient right = LPS -x) and left lobe crossing the midline anteriorly.
        z_l = u(*spread.liver_z)
        right = _Blob.random(rng, jitter(-68, -8, z_l), scaled(62, 80, 78), (u(-20, -10), u(10, 22), u(-10, 5)))
        left = _Blob.random(rng, jitter(18, -42, z_l + 12), scaled(55, 28, 36), (0, u(-5, 10), u(-20, -5)))
        self.organs += [(LIVER, right, hu["liver"]), (LIVER, left, hu["liver"])]
        ivc_top = np.array([self.ivc[0], self.ivc[1], z_l + 40.0])
        for target in ((-95, 5, z_l + 15), (-45, -40, z_l + 25), (10, -45, z_l + 25)):
            self.vessels.append((_Tube(np.array([ivc_top, jitter(*target, mm=8)]), np.array([6.0, 3.0])),
                                 hu["vein"], LIVER))
        porta = jitter(-15, -10, z_l - 35, mm=5)
        for target in ((-80, 10, z_l - 10), (5, -40, z_l)):
            self.vessels.append((_Tube(np.array([porta, jitter(*target, mm=8)]), np.array([7.0, 3.5])),
                                 hu["vein"], LIVER))
        if rng.random() < 0.85:  # gallbladder (absent after cholecystectomy)
            gb = _Blob.random(rng, jitter(-42, -42, z_l - 42), scaled(15, 17, 34), (u(-30, -15), 0, u(-20, 20)))
            self.carve.append((gb, hu["bile"], LIVER))
        # Spleen: posterolateral on the left, thin axis pointing to the body wall.
        centre = jitter(80, 32, u(*spread.spleen_z))
        angle = np.degrees(np.arctan2(centre[1], centre[0]))
        spleen = _Blob.random(rng, centre, scaled(19, 62, 50, lo=0.88, hi=1.12), (u(-25, -10), 0, angle))
        self.organs.append((SPLEEN, spleen, hu["spleen"]))
        # Stomach (gas over fluid) in the left upper quadrant, in front of spleen and pancreas.
        stomach = _Blob.random(rng, jitter(45, -38, u(45, 65)), scaled(42, 32, 50), (0, u(10, 25), u(-30, -10)))
        self.bowel.append(_Bowel(stomach, 4.0, u(-15, 20), u(0, 30)))
        # Kidneys beside the spine, hilum facing anteromedially, upper poles medial and posterior.
        for side, z_range in zip((-1, 1), spread.kidney_z):
            centre = np.array([side * (rx + u(*spread.kidney_x)), y_v + u(*spread.kidney_y), u(*z_range)])
            kidney = _Blob.random(rng, centre, scaled(27, 24, 60, lo=0.92, hi=1.08),
                                  (u(-20, -10), -side * u(8, 15), side * u(20, 35)), wobble=0.15)
            medial = kidney.rotation @ np.array([-side * 1.0, 0.0, 0.0])
            hilum = _Blob.random(rng, centre + medial * (kidney.axes[0] + 2.0), (14, 12, 16), wobble=0.0)
            self.organs.append((KIDNEYS, kidney, (hu["kidney_cortex"], hu["kidney_medulla"])))
            self.carve.append((hilum, hu["sinus_fat"], KIDNEYS))
        # Pancreas: head by the duodenum, neck/body in front of the aorta, tail toward the splenic hilum.
        z_p = u(*spread.pancreas_z)
        y0 = self.aorta_front - 8.0
        path = np.array([[-26, y0 - 4, z_p - 32], [-30, y0 - 10, z_p - 6], [-8, y0 - 14, z_p],
                         [20, y0 - 12, z_p + 5], [46, y0 - 2, z_p + 10], [66, y0 + 14, z_p + 16]])
        path += rng.uniform(-4, 4, path.shape) * spread.jitter
        radii = np.array([13.0, 18.0, 12.5, 12.5, 11.5, 9.5]) * u(0.9, 1.1)
        pancreas = _Tube(path, radii)
        self.organs.append((PANCREAS, pancreas, hu["pancreas"]))
        duodenum = path[1] + np.array([[8, -20, 26], [-28, -16, 22], [-40, 4, 0], [-30, 8, -34], [-4, 6, -48],
                                       [25, 2, -44]])
        self.bowel.append(_Bowel(_Tube(duodenum, np.full(len(duodenum), u(9, 13))), 2.5, u(-10, 8), u(0, 30)))
        # Diaphragm domes just above the liver (right) and spleen / stomach (left).
        self.domes = [_dome_over((right, left), 95.0, 120.0), _dome_over((spleen, stomach), 80.0, 120.0)]
        top = min(d[2] for d in self.domes)
        self.heart = _Blob.random(rng, (15, -30, top + 55), scaled(65, 55, 50), (0, 0, u(20, 40)))
        self.update_organ_ranges()

    def update_organ_ranges(self) -> None:
        """Fill :attr:`organ_z_range` from the organ shapes (z low, mean centre, z high clipped at the domes)."""
        top = min(d[2] for d in self.domes)
        self.organ_z_range = {}
        for name, label in (("liver", LIVER), ("kidneys", KIDNEYS), ("spleen", SPLEEN), ("pancreas", PANCREAS)):
            shapes = [shape for lab, shape, _ in self.organs if lab == label]
            if not shapes:  # removed (nephrectomy, splenectomy)
                continue
            lows = [shape.bounds()[0][2] for shape in shapes]
            highs = [shape.bounds()[1][2] for shape in shapes]
            centres = [0.5 * (lo + hi) for lo, hi in zip(lows, highs)]
            self.organ_z_range[name] = (min(lows), float(np.mean(centres)), min(max(highs), top))

    def _add_bowel(self, rng, jitter, sx, sy):
        u = rng.uniform
        colon = np.array([[-90, -5, -170], [-95, 0, -60], [-85, -20, -15], [-50, -65, -25], [0, -75, -35],
                          [50, -65, -20], [88, -20, 5], [95, 0, -60], [85, -10, -150]])
        colon = colon * [sx, sy, 1.0] + rng.uniform(-8, 8, colon.shape)
        waves = rng.normal(size=(3, 3))
        waves *= (rng.uniform(0.35, 0.7, 3) / np.linalg.norm(waves, axis=1))[:, None]
        self.bowel.append(_Bowel(_Tube(colon, np.full(len(colon), u(18, 26))), 2.5, u(-15, 15), u(-40, 40),
                                 mottle=waves))
        for _ in range(int(rng.integers(3, 6))):
            start = jitter(u(-55, 55), u(-60, -15), u(-160, -50), mm=0)
            steps = rng.normal(0.0, 1.0, (int(rng.integers(5, 9)), 3)) * [28.0, 14.0, 20.0]
            points = start + np.cumsum(np.vstack([np.zeros(3), steps]), axis=0)
            points[:, 1] = np.clip(points[:, 1], -75 * sy, 10)
            self.bowel.append(_Bowel(_Tube(points, np.full(len(points), u(9, 14))), 2.0, u(-14, 4), u(0, 35)))

    def diaphragm_z(self, x, y):
        """z (mm) of the diaphragm at the patient-frame point (x, y): the higher of the two domes, and at least
        :attr:`diaphragm_floor` (the depth of the lungs' posterior and lateral recesses)."""
        out = np.full(np.shape(x), np.float32(self.diaphragm_floor), dtype=np.float32)
        for dome in self.domes:
            np.maximum(out, _dome_z(dome, x, y), out=out)
        return out

    @property
    def diaphragm_floor(self) -> float:
        """Lowest z of the diaphragm, 60 mm below the lower dome top; no lung below it."""
        return min(d[2] for d in self.domes) - 60.0


# --------------------------------------------------------------------------------------------------------------
# Generator version 2: domain randomisation (Billot et al., "SynthSeg", Medical Image Analysis 2023). Version 1
# draws one narrow layout; version 2 widens every anatomical range, adds variants (lobes, contacts, resections,
# lesions, deformation, arms, table, metal) and draws the appearance (contrast phase, kernel, thickness, noise)
# so that a real patient looks like one more sample. Each randomised quantity and its range is listed in
# :data:`RANGES_V2`; :func:`phantom_parameters` returns the values drawn for a seed.


@dataclass(frozen=True)
class _Spread:
    """Ranges of the anatomy draws that differ between generator versions (patient frame, mm)."""

    version: int
    body_a: tuple = (135, 175)           # half width of the body
    body_b_ant: tuple = (95, 135)        # half depth in front of the body axis
    body_b_post: tuple = (90, 112)       # half depth behind it
    fat_ant: tuple = (10, 40)            # subcutaneous fat, front
    fat_post: tuple = (6, 18)            # subcutaneous fat, back
    cavity_scale: tuple = (0.85, 1.25)   # organ layout scale with the abdominal cavity
    jitter: float = 1.0                  # factor on every organ position jitter (6 mm in version 1)
    size: float = 1.0                    # factor on every organ size spread (±10 % in version 1)
    liver_z: tuple = (35, 50)
    spleen_z: tuple = (45, 60)
    kidney_z: tuple = ((-40, -28), (-28, -15))  # right, left
    kidney_x: tuple = (35, 42)           # lateral distance beyond the vertebral body
    kidney_y: tuple = (0, 10)            # depth relative to the vertebral body centre
    pancreas_z: tuple = (-10, 10)


_SPREADS = {1: _Spread(1),
            2: _Spread(2, body_a=(115, 205), body_b_ant=(80, 165), body_b_post=(80, 135), fat_ant=(3, 85),
                       fat_post=(3, 50), cavity_scale=(0.7, 1.4), jitter=2.5, size=3.0, liver_z=(15, 75),
                       spleen_z=(20, 85), kidney_z=((-75, -5), (-65, 10)), kidney_x=(24, 58), kidney_y=(-14, 22),
                       pancreas_z=(-35, 30))}

#: Generator versions (``make_phantom(version=...)``).
VERSIONS = (1, 2)

#: Contrast phases of version 2 and their probabilities.
PHASES = {"non-contrast": 0.2, "arterial": 0.2, "portal-venous": 0.45, "delayed": 0.15}

#: Organ and blood HU per contrast phase (ranges drawn uniformly), from typical enhancement curves of abdominal
#: CT (Bae, "Intravenous contrast medium administration and scan timing at CT", Radiology 2010; Kalra et al.,
#: "Quantitative assessment of the renal parenchyma by phase", AJR 2003): the pancreas and renal cortex peak in
#: the arterial phase, the liver and portal vein in the portal-venous phase, the medulla catches up later.
PHASE_HU = {
    "non-contrast": {"liver": (45, 72), "spleen": (38, 55), "pancreas": (28, 50), "kidney_cortex": (25, 42),
                     "kidney_medulla": (20, 40), "blood": (30, 55), "vein": (30, 55)},
    "arterial": {"liver": (55, 90), "spleen": (70, 165), "pancreas": (80, 155), "kidney_cortex": (140, 260),
                 "kidney_medulla": (45, 110), "blood": (200, 480), "vein": (70, 150)},
    "portal-venous": {"liver": (85, 140), "spleen": (95, 145), "pancreas": (70, 130), "kidney_cortex": (140, 235),
                      "kidney_medulla": (115, 215), "blood": (125, 230), "vein": (135, 240)},
    "delayed": {"liver": (60, 105), "spleen": (60, 105), "pancreas": (50, 95), "kidney_cortex": (85, 160),
                "kidney_medulla": (90, 175), "blood": (75, 145), "vein": (75, 145)},
}

#: Version 2's randomised quantities: name -> (low, high) for numbers, or the tuple of possible values.
#: :func:`phantom_parameters` reports each of them; the tests check that many seeds cover these ranges.
RANGES_V2 = {
    "phase": tuple(PHASES),
    "body_half_width_mm": _SPREADS[2].body_a,
    "fat_front_mm": _SPREADS[2].fat_ant,
    "liver_z_mm": (_SPREADS[2].liver_z[0] - 15, _SPREADS[2].liver_z[1] + 15),  # right lobe centre (± jitter)
    "kidney_right_z_mm": _SPREADS[2].kidney_z[0],
    "kidney_left_z_mm": _SPREADS[2].kidney_z[1],
    "kidney_asymmetry_mm": (_SPREADS[2].kidney_z[1][0] - _SPREADS[2].kidney_z[0][1],  # left minus right kidney
                            _SPREADS[2].kidney_z[1][1] - _SPREADS[2].kidney_z[0][0]),  # height, before contacts
    "organ_scale": (0.7, 1.3),              # per-axis size factor of the liver's right lobe
    "warp_mm": (0.0, 12.0),                 # amplitude of the smooth deformation field
    "missing": ("none", "right kidney", "left kidney", "spleen"),
    "riedel_lobe": (False, True),
    "liver_kidney_contact": (False, True),
    "spleen_kidney_contact": (False, True),
    "lesions": (0, 4),                      # cysts and tumours over all organs
    "fatty_liver": (False, True),
    "excreted_contrast": (False, True),
    "oral_contrast": (False, True),
    "texture_hu": (0.0, 15.0),
    "noise_hu": (4.0, 60.0),
    "kernel": ("soft", "standard", "sharp"),
    "slice_spacing_mm": (0.5, 5.0),
    "slice_thickness_mm": (0.5, 5.0),
    "coverage_mm": (40.0, 450.0),
    "field_of_view_mm": (250.0, 500.0),
    "arms": ("out", "in"),
    "table": (False, True),
    "metal": (False, True),
}

#: Voxel volume (mm³) at which version 2's ``noise_hu`` applies (0.8 × 0.8 × 2.5 mm).
NOISE_REFERENCE_VOXEL_MM3 = 1.6
#: Version 2 slice spacings, mm.
SLICE_SPACINGS_V2_MM = (0.5, 0.625, 0.8, 1.0, 1.25, 1.5, 2.0, 2.5, 3.0, 4.0, 5.0)


def _randomise_anatomy(anatomy: _Anatomy, rng) -> dict:
    """Version 2's anatomical variants on a drawn patient, in place; return the values drawn (see RANGES_V2)."""
    u = rng.uniform
    drawn = {}
    organs = anatomy.organs
    liver = [shape for label, shape, _ in organs if label == LIVER]
    spleen = next(shape for label, shape, _ in organs if label == SPLEEN)
    kidneys = [(i, shape) for i, (label, shape, _) in enumerate(organs) if label == KIDNEYS]  # right, left
    right_lobe = liver[0]
    drawn["organ_scale"] = [float(v) for v in right_lobe.axes / np.array([62.0, 80.0, 78.0])]
    drawn["liver_z_mm"] = float(right_lobe.centre[2])
    drawn["kidney_right_z_mm"], drawn["kidney_left_z_mm"] = (float(k.centre[2]) for _, k in kidneys)
    drawn["kidney_asymmetry_mm"] = drawn["kidney_left_z_mm"] - drawn["kidney_right_z_mm"]
    # Lobes: a Riedel lobe hanging from the right lobe; sometimes a splenic lobule.
    drawn["riedel_lobe"] = bool(rng.random() < 0.25)
    if drawn["riedel_lobe"]:
        c = right_lobe.centre + np.array([-u(0, 20), u(-10, 15), -right_lobe.axes[2] * u(0.55, 0.8)])
        organs.append((LIVER, _Blob.random(rng, c, (u(22, 35), u(25, 40), u(35, 65)), (0, u(-10, 10), 0)),
                       anatomy.hu["liver"]))
    if rng.random() < 0.2:
        c = spleen.centre + spleen.rotation @ np.array([0.0, u(-1, 1), -1.0]) * spleen.axes * 0.9
        organs.append((SPLEEN, _Blob.random(rng, c, (u(8, 14), u(10, 20), u(10, 18))), anatomy.hu["spleen"]))
    # Contacts, as in patients: the right kidney's upper pole under the liver, the left one against the spleen.
    drawn["liver_kidney_contact"] = bool(rng.random() < 0.6)
    drawn["spleen_kidney_contact"] = bool(rng.random() < 0.5)
    for (index, kidney), touch, partner in ((kidneys[0], drawn["liver_kidney_contact"], right_lobe),
                                            (kidneys[1], drawn["spleen_kidney_contact"], spleen)):
        if touch:
            moved = _move_into_contact(kidney, partner, gap_mm=u(-3, 2))
            organs[index] = (KIDNEYS, moved, organs[index][2])
            anatomy.carve = [(_shifted(shape, moved.centre - kidney.centre)
                              if label == KIDNEYS and np.linalg.norm(shape.centre - kidney.centre) < 45 else shape,
                              value, label) for shape, value, label in anatomy.carve]
    # The pancreatic tail reaches the splenic hilum; the splenic vein runs behind the pancreas to the portal vein.
    pancreas_index = next(i for i, (label, _, _) in enumerate(organs) if label == PANCREAS)
    tube = organs[pancreas_index][1]
    path = tube.points.copy()
    hilum = spleen.surface_points(400)
    tip = hilum[np.argmin(np.linalg.norm(hilum - path[-1], axis=1))]
    if rng.random() < 0.8:
        path[-1] = tip + (path[-2] - tip) * u(0.05, 0.2)
    organs[pancreas_index] = (PANCREAS, _Tube(path, tube.radii), organs[pancreas_index][2])
    back = np.array([0.0, 1.0, 0.0])
    vein = path[2:] + back * (tube.radii[2:, None] + 3.0)
    vein = np.vstack([vein, tip + back * 3.0])
    anatomy.vessels.append((_Tube(vein, np.full(len(vein), u(3.5, 6.0))), anatomy.hu["vein"], None))
    # Resections.
    drawn["missing"] = str(rng.choice(RANGES_V2["missing"], p=[0.86, 0.05, 0.05, 0.04]))
    if drawn["missing"] != "none":
        gone = {"right kidney": kidneys[0][1], "left kidney": kidneys[1][1], "spleen": spleen}[drawn["missing"]]
        label = SPLEEN if drawn["missing"] == "spleen" else KIDNEYS
        anatomy.organs = organs = [o for o in organs if not (o[1] is gone or (label == SPLEEN and o[0] == SPLEEN))]
    # Lesions: cysts (water), hypo- or hyperdense tumours, inside an organ; they keep the organ's label.
    drawn["lesions"] = int(rng.integers(0, RANGES_V2["lesions"][1] + 1) * (rng.random() < 0.5))
    for _ in range(drawn["lesions"]):
        label, shape, value = organs[int(rng.integers(len(organs)))]
        base = value[0] if isinstance(value, tuple) else value
        if isinstance(shape, _Tube):
            k = int(rng.integers(len(shape.points)))
            centre, radius = shape.points[k], 0.6 * shape.radii[k]
        else:
            centre = shape.centre + shape.rotation @ (rng.uniform(-0.5, 0.5, 3) * shape.axes)
            radius = 0.45 * float(shape.axes.min())
        kind = rng.random()
        hu = u(0, 20) if kind < 0.5 else base + (u(-70, -20) if kind < 0.85 else u(20, 60))
        anatomy.overlays.append((_Blob.random(rng, centre, np.full(3, u(4, max(5.0, radius))) * u(0.8, 1.2, 3)),
                                 float(hu), label, label))
    # Smooth deformation of the whole patient: a few long sine waves per axis.
    amplitude = u(*RANGES_V2["warp_mm"])
    drawn["warp_mm"] = float(amplitude)
    n = 3
    waves = rng.normal(size=(n, 3))
    waves *= (2 * np.pi / u(120, 320, n) / np.linalg.norm(waves, axis=1))[:, None]
    anatomy.warp = (rng.normal(size=(n, 3)) * amplitude / np.sqrt(3 * n), waves, rng.uniform(0, 2 * np.pi, n))
    # Arms beside the body (arms-down scans), and the patient table under the back.
    body = anatomy.body
    drawn["arms"] = "in" if rng.random() < 0.3 else "out"
    if drawn["arms"] == "in":
        for side in (-1, 1):
            wx, wy = u(35, 55), u(38, 55)
            anatomy.arms.append((side * (body["a"] + u(5, 40) + wx), u(-30, 30), wx, wy, u(9, 13)))
    drawn["table"] = bool(rng.random() < 0.6)
    if drawn["table"]:
        anatomy.table = {"y": body["b_post"] + u(0, 8), "thickness": u(25, 60), "half_width": u(180, 250),
                         "sag": u(0, 30), "shell_hu": u(150, 600), "core_hu": u(-950, -600)}
    anatomy.update_organ_ranges()
    return drawn


def _move_into_contact(blob: "_Blob", partner: "_Blob", gap_mm: float) -> "_Blob":
    """``blob`` translated along the line to ``partner``'s centre until their surfaces are ``gap_mm`` apart
    (negative: overlapping, the later-painted organ wins), by at most 40 mm."""
    direction = partner.centre - blob.centre
    direction /= np.linalg.norm(direction)
    points = blob.surface_points(600)
    f32 = np.float32
    distance = float(partner.sdf(*(points[:, r].astype(f32) for r in range(3))).min())
    step = float(np.clip(distance - gap_mm, -10.0, 40.0))
    return _shifted(blob, direction * step)


def _shifted(shape, offset):
    """``shape`` (a blob) translated by ``offset`` (3,) mm."""
    return _Blob(shape.centre + offset, shape.axes, shape.rotation, shape.coefficients)


@dataclass(frozen=True)
class _Look:
    """Version 2's appearance draws: contrast phase and agents, organ texture, scanner and reconstruction."""

    phase: str
    fatty_liver: bool
    excreted_contrast: bool
    oral_contrast: bool
    texture_hu: float
    noise_hu: float
    noise_grain_voxels: float      # in-plane σ of the filter that correlates the noise
    kernel: str
    kernel_amount: float           # soft: in-plane blur σ (voxels); sharp: unsharp-mask gain; standard: 0
    thickness_factor: float        # slice thickness / slice spacing (thickness kept in 0.5–5 mm)
    metal: bool

    @classmethod
    def random(cls, rng) -> "_Look":
        u = rng.uniform
        phase = str(rng.choice(list(PHASES), p=list(PHASES.values())))
        kernel = str(rng.choice(RANGES_V2["kernel"], p=[0.3, 0.4, 0.3]))
        amount = {"soft": u(0.4, 1.0), "standard": 0.0, "sharp": u(0.3, 1.2)}[kernel]
        return cls(phase=phase, fatty_liver=bool(rng.random() < 0.15),
                   excreted_contrast=phase == "delayed" and bool(rng.random() < 0.8),
                   oral_contrast=bool(rng.random() < 0.3), texture_hu=u(*RANGES_V2["texture_hu"]),
                   noise_hu=float(np.exp(u(*np.log(RANGES_V2["noise_hu"])))), noise_grain_voxels=u(0.0, 1.2),
                   kernel=kernel, kernel_amount=amount, thickness_factor=u(1.0, 2.0), metal=bool(rng.random() < 0.1))

    def noise_at(self, spacing) -> float:
        """Noise σ (HU) on voxels of ``spacing`` (mm): :attr:`noise_hu` is for 0.8 × 0.8 × 2.5 mm voxels, and
        σ falls as one over the square root of the voxel volume (quantum noise averaged over the voxel)."""
        return float(self.noise_hu * min(1.0, np.sqrt(NOISE_REFERENCE_VOXEL_MM3 / float(np.prod(spacing)))))

    def thickness_mm(self, slice_spacing: float) -> float:
        low, high = RANGES_V2["slice_thickness_mm"]
        return float(np.clip(slice_spacing * self.thickness_factor, max(low, slice_spacing), high))

    def set_tissue_hu(self, anatomy: _Anatomy, rng) -> None:
        """Organ and blood HU of the phase (and fatty liver) into ``anatomy``."""
        u = rng.uniform
        arterial = anatomy.hu["blood"]
        for name, (low, high) in PHASE_HU[self.phase].items():
            anatomy.hu[name] = u(low, high)
        if self.phase == "arterial":  # corticomedullary phase: medulla well below cortex
            anatomy.hu["kidney_medulla"] = min(anatomy.hu["kidney_medulla"], anatomy.hu["kidney_cortex"] - 40.0)
        if self.fatty_liver:
            anatomy.hu["liver"] -= u(20, 75)
        anatomy.organs[:] = [(label, shape, _phase_value(label, anatomy.hu)) for label, shape, _ in anatomy.organs]
        anatomy.vessels[:] = [(shape, anatomy.hu["blood"] if value == arterial else anatomy.hu["vein"], organ)
                              for shape, value, organ in anatomy.vessels]

    def add_contrast(self, anatomy: _Anatomy, rng) -> None:
        """Excreted contrast in the renal pelves (sinus, not kidney label) and oral contrast in the bowel."""
        u = rng.uniform
        if self.excreted_contrast:
            for shape, _, label in anatomy.carve:
                if label == KIDNEYS:
                    pelvis = _Blob.random(rng, shape.centre, shape.axes * u(0.4, 0.7, 3), wobble=0.1)
                    anatomy.overlays.append((pelvis, u(300, 1500), 0, 0))
        if self.oral_contrast:
            for bowel in anatomy.bowel:
                if rng.random() < 0.7:
                    bowel.content_hu = u(150, 600)


def _phase_value(label: int, hu: dict):
    """The HU (or (cortex, medulla) pair for kidneys) an organ is painted with."""
    if label == KIDNEYS:
        return (hu["kidney_cortex"], hu["kidney_medulla"])
    return hu[{LIVER: "liver", SPLEEN: "spleen", PANCREAS: "pancreas"}[label]]


def _dome_z(dome, x, y):
    """z (mm) of a paraboloid ``dome = (x0, y0, top, width x, width y)``: 45 mm below the top one width away."""
    x0, y0, top, wx, wy = dome
    dx, dy = (x - np.float32(x0)) / np.float32(wx), (y - np.float32(y0)) / np.float32(wy)
    return np.float32(top) - np.float32(_DOME_DROP_MM) * (dx * dx + dy * dy)


_DOME_DROP_MM = 45.0


def _dome_over(blobs, wx: float, wy: float) -> tuple:
    """A diaphragm dome centred over the highest point of ``blobs`` and 3 mm above every point of them."""
    points = np.concatenate([blob.surface_points() for blob in blobs])
    x0, y0, _ = points[np.argmax(points[:, 2])]
    clearance = points[:, 2] - _dome_z((x0, y0, 0.0, wx, wy), points[:, 0], points[:, 1])
    return (float(x0), float(y0), float(clearance.max()) + 3.0, wx, wy)


# --------------------------------------------------------------------------------------------------------------
# Scan geometry.


def _scan_grid(anatomy: _Anatomy, size, spacing, scan_rng, orientation_rng, version: int = 1,
               max_slices: int | None = None) -> Grid:
    """Voxel grid (LPS) of one scan of ``anatomy``: spacing, slice count and position, direction, origin."""
    if version == 2:
        return _scan_grid_v2(anatomy, size, spacing, scan_rng, orientation_rng, max_slices)
    nx, ny, nz = size
    fov_draw, slice_draw = scan_rng.uniform(*FOV_FRACTION) * 512.0, float(scan_rng.choice(SLICE_SPACINGS_MM))
    if spacing is None:  # a field of view that holds the body, within the 0.6-0.9 mm pixel range at 512
        body_width = 2.0 * anatomy.body["a"] + 20.0
        fov = float(np.clip(max(fov_draw, body_width), FOV_FRACTION[0] * 512.0, FOV_FRACTION[1] * 512.0))
        spacing = (fov / min(nx, ny), fov / min(nx, ny), slice_draw)
    coverage_draw = scan_rng.uniform(*COVERAGE_MM)
    if nz is None:
        nz = max(2, int(round(coverage_draw / spacing[2])))
    coverage = nz * spacing[2]
    z_centre = _slice_centre(anatomy, coverage, scan_rng.uniform())
    fov_xy = np.array([nx * spacing[0], ny * spacing[1]])
    room = np.maximum(0.0, 0.5 * fov_xy - np.array([anatomy.body["a"], anatomy.body["b_ant"]]) - 5.0)
    shift = scan_rng.uniform(-1.0, 1.0, 2) * np.minimum(room, 15.0)
    centre = anatomy.offset + np.array([shift[0], shift[1], z_centre])
    direction = _random_direction(orientation_rng) if orientation_rng is not None else np.eye(3)
    size3 = np.array([nx, ny, nz], dtype=float)
    origin = centre - direction @ (np.asarray(spacing) * (size3 - 1.0) / 2.0)
    return Grid((nx, ny, nz), tuple(float(s) for s in spacing), tuple(float(o) for o in origin),
                tuple(float(d) for d in direction.ravel()))


def _scan_grid_v2(anatomy: _Anatomy, size, spacing, scan_rng, orientation_rng, max_slices) -> Grid:
    """Version 2's scan: field of view 250–500 mm that may cut the body, slice spacing 0.5–5 mm, coverage
    40–450 mm anywhere that overlaps the organs (organs cut at any slice), in-plane shift up to ±40 mm."""
    nx, ny, nz = size
    fov_draw = scan_rng.uniform(*RANGES_V2["field_of_view_mm"])
    slice_draw = float(scan_rng.choice(SLICE_SPACINGS_V2_MM))
    holds_body = scan_rng.random() < 0.7
    if spacing is None:
        fov = max(fov_draw, 2.0 * anatomy.body["a"] + 20.0) if holds_body else fov_draw
        fov = float(np.clip(fov, *RANGES_V2["field_of_view_mm"]))
        spacing = (fov / min(nx, ny), fov / min(nx, ny), slice_draw)
    coverage_draw = scan_rng.uniform(*RANGES_V2["coverage_mm"])
    if nz is None:
        nz = max(2, int(round(coverage_draw / spacing[2])))
        if max_slices is not None:
            nz = min(nz, int(max_slices))
    coverage = nz * spacing[2]
    ranges = anatomy.organ_z_range.values()
    low, high = min(lo for lo, _, _ in ranges), max(hi for _, _, hi in ranges)
    overlap = min(30.0, 0.5 * coverage)
    z_centre = scan_rng.uniform(low - 0.5 * coverage + overlap, high + 0.5 * coverage - overlap)
    centre = anatomy.offset + np.array([*scan_rng.uniform(-40.0, 40.0, 2), z_centre])
    direction = _random_direction(orientation_rng) if orientation_rng is not None else np.eye(3)
    origin = centre - direction @ (np.asarray(spacing) * (np.array([nx, ny, nz], float) - 1.0) / 2.0)
    return Grid((nx, ny, nz), tuple(float(s) for s in spacing), tuple(float(o) for o in origin),
                tuple(float(d) for d in direction.ravel()))


def _slice_centre(anatomy: _Anatomy, coverage: float, draw: float) -> float:
    """Patient-frame z of the scan centre: covers every organ's centre, and whole organs as coverage allows."""
    ranges = anatomy.organ_z_range.values()
    core = (min(c for _, c, _ in ranges), max(c for _, c, _ in ranges))
    span = (min(lo for lo, _, _ in ranges), max(hi for _, _, hi in ranges))
    margin = max(0.0, 0.5 * (coverage - (core[1] - core[0])) - 10.0)
    need = (max(span[0], core[0] - margin), min(span[1], core[1] + margin))
    low, high = need[1] - coverage / 2.0, need[0] + coverage / 2.0
    if low > high:
        return 0.5 * (need[0] + need[1])
    return low + draw * (high - low)


def _random_direction(rng) -> np.ndarray:
    """(3, 3) direction: random axis flips, and with probability 1/3 an oblique tilt of up to 10°."""
    flips = np.diag(rng.choice([-1.0, 1.0], 3))
    if rng.random() < 1.0 / 3.0:
        axis = rng.normal(size=3)
        axis /= np.linalg.norm(axis)
        angle = np.radians(rng.uniform(2.0, MAX_OBLIQUE_DEG))
        k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
        tilt = np.eye(3) + np.sin(angle) * k + (1 - np.cos(angle)) * (k @ k)
        return tilt @ flips
    return flips


# --------------------------------------------------------------------------------------------------------------
# Rendering: the HU and label arrays (K, J, I) filled shape by shape, each within its index bounding box.


class _Scene:
    """HU (float32), label (uint8) and tissue-class (uint8) arrays of one grid, (K, J, I) order."""

    def __init__(self, grid: Grid, anatomy: _Anatomy):
        self.grid = grid
        self.anatomy = anatomy
        m = grid.ijk_to_lps
        self.matrix = m[:3, :3]
        self.start = m[:3, 3] - anatomy.offset  # patient-frame position of voxel (0, 0, 0)
        self.margin = float(np.abs(anatomy.warp[0]).sum(axis=0).max()) if anatomy.warp else 0.0
        shape = tuple(reversed(grid.size))
        self.hu = np.empty(shape, dtype=np.float32)
        self.labels = np.zeros(shape, dtype=np.uint8)
        self.region = np.empty(shape, dtype=np.uint8)

    def render(self, progress: ProgressCallback | None = None) -> None:
        """Paint every structure, from the body outline inward; bone last."""
        steps = [("body", self._paint_body), ("heart", self._paint_heart), ("muscles", self._paint_muscles),
                 ("bowel", self._paint_bowel), ("vessels", lambda: self._paint_vessels(inside_organs=False)),
                 ("organs", self._paint_organs), ("organ vessels", lambda: self._paint_vessels(inside_organs=True)),
                 ("spine", self._paint_spine)]
        for index, (name, step) in enumerate(steps):
            report(progress, index / len(steps), f"phantom: {name}")
            step()

    # --- blocks ---------------------------------------------------------------------------------------------

    def box(self, low, high):
        """Index box (k0, k1, j0, j1, i0, i1), half-open, covering the patient-frame box [low, high]; or None."""
        low, high = np.asarray(low, float) - self.margin, np.asarray(high, float) + self.margin
        corners = np.array([[low[0] if c & 1 == 0 else high[0], low[1] if c & 2 == 0 else high[1],
                             low[2] if c & 4 == 0 else high[2]] for c in range(8)])
        ijk = np.linalg.solve(self.matrix, (corners - self.start).T).T
        lo = np.maximum(np.floor(ijk.min(axis=0)).astype(int), 0)
        hi = np.minimum(np.ceil(ijk.max(axis=0)).astype(int) + 1, self.grid.size)
        if np.any(hi <= lo):
            return None
        return lo[2], hi[2], lo[1], hi[1], lo[0], hi[0]

    def coords(self, box):
        """Patient-frame (x, y, z) float32 arrays (mm) of the voxel centres in ``box``, each broadcastable to the
        box; with a deformation field (version 2) the points where the anatomy is evaluated, full-size."""
        k0, k1, j0, j1, i0, i1 = box
        axes = (np.arange(i0, i1, dtype=np.float32)[None, None, :], np.arange(j0, j1, dtype=np.float32)[None, :, None],
                np.arange(k0, k1, dtype=np.float32)[:, None, None])
        xyz = tuple(np.float32(self.start[r]) + np.float32(self.matrix[r, 0]) * axes[0]
                    + np.float32(self.matrix[r, 1]) * axes[1] + np.float32(self.matrix[r, 2]) * axes[2]
                    for r in range(3))
        if not self.anatomy.warp:
            return xyz
        amplitudes, waves, phases = self.anatomy.warp
        out = [np.array(np.broadcast_to(c, (k1 - k0, j1 - j0, i1 - i0))) for c in xyz]
        for amplitude, wave, phase in zip(amplitudes, waves, phases):
            wave_value = np.sin(sum(np.float32(wave[r]) * xyz[r] for r in range(3)) + np.float32(phase))
            for r in range(3):
                out[r] += np.float32(amplitude[r]) * wave_value
        return tuple(out)

    @staticmethod
    def slices(box):
        return slice(box[0], box[1]), slice(box[2], box[3]), slice(box[4], box[5])

    def shape_sdf(self, shape, box, coords):
        """Signed distance of ``shape`` on ``box`` (and, for tubes, the y of the nearest axis point)."""
        if isinstance(shape, _Blob):
            return shape.sdf(*coords), None
        out = np.full(coords[0].shape, np.inf, dtype=np.float32)
        axis_y = np.zeros_like(out)
        for a, b, ra, rb, low, high in shape.segments():
            sub = self.box(low, high)
            if sub is None:
                continue
            lo = np.maximum(np.array(sub[::2]), box[::2]) - np.array(box[::2])
            hi = np.minimum(np.array(sub[1::2]), box[1::2]) - np.array(box[::2])
            if np.any(hi <= lo):
                continue
            sl = tuple(slice(l, h) for l, h in zip(lo, hi))
            d, ay = _capsule_sdf(coords[0][sl], coords[1][sl], coords[2][sl], a, b, ra, rb)
            closer = d < out[sl]
            out[sl] = np.where(closer, d, out[sl])
            axis_y[sl] = np.where(closer, ay, axis_y[sl])
        return out, axis_y

    def shape_block(self, shape):
        """(box, slices, coords, sdf, axis_y) for ``shape``, or None when it misses the grid."""
        box = self.box(*shape.bounds())
        if box is None:
            return None
        coords = tuple(np.broadcast_to(c, (box[1] - box[0], box[3] - box[2], box[5] - box[4]))
                       for c in self.coords(box))
        sdf, axis_y = self.shape_sdf(shape, box, coords)
        return box, self.slices(box), coords, sdf, axis_y

    # --- painters -------------------------------------------------------------------------------------------

    def _paint_body(self) -> None:
        """Skin, fat, muscle wall, cavity, ribs, diaphragm, lungs and mediastinum, slab by slab."""
        a = self.anatomy
        table = np.zeros(_N_REGIONS, dtype=np.float32)
        table[[AIR, SKIN, FAT, MUSCLE, CAVITY, LUNG, MEDIASTINUM, DIAPHRAGM, RIB, RIB_MARROW]] = [
            -1000.0, a.hu["skin"], a.hu["fat"], a.hu["muscle"], a.hu["cavity_fat"], a.hu["lung"],
            a.hu["mediastinum"], a.hu["muscle"], a.hu["rib"], a.hu["rib_marrow"]]
        if a.table:
            table[[TABLE_SHELL, TABLE_CORE]] = a.table["shell_hu"], a.table["core_hu"]
        nk, nj, ni = self.hu.shape
        slab = max(1, int(300_000 // (nj * ni)))
        for k0 in range(0, nk, slab):
            box = (k0, min(nk, k0 + slab), 0, nj, 0, ni)
            region = self._body_regions(*self.coords(box))
            sl = self.slices(box)
            self.region[sl] = region
            np.take(table, region, out=self.hu[sl], mode="clip")

    def _body_regions(self, x, y, z):
        """Tissue class (uint8) of every point of a block, from the body outline, ribs and diaphragm."""
        a, body = self.anatomy, self.anatomy.body
        f32 = np.float32
        x, y, z = np.broadcast_arrays(x, y, z)
        scale = f32(1.0) - f32(body["taper"] / 100.0) * z  # body outline shrinks or grows along z
        half_ap = np.where(y < 0, f32(body["b_ant"]), f32(body["b_post"]))
        half_ap *= scale
        half_lr = scale * f32(body["a"])
        rho = (x / half_lr) ** 2
        rho += (y / half_ap) ** 2
        np.sqrt(rho, out=rho)
        np.maximum(rho, f32(1e-3), out=rho)  # 1 on the skin
        r = x * x
        r += y * y
        np.sqrt(r, out=r)
        np.maximum(r, f32(1e-3), out=r)
        depth = r / rho  # mm under the skin along the ray from the body axis
        depth -= r
        fat_end = y / r  # -1 anterior, +1 posterior: thicker fat in front
        fat_end *= f32(-0.5 * (body["fat_ant"] - body["fat_post"]))
        fat_end += f32(0.5 * (body["fat_ant"] + body["fat_post"]) + body["skin"])
        region = (depth >= 0).view(np.uint8)  # AIR 0, SKIN 1, FAT 2, MUSCLE 3, CAVITY 4
        region += depth >= f32(body["skin"])
        region += depth >= fat_end
        region += depth >= fat_end + f32(body["wall"])
        self._add_ribs(region, x, y, z, depth, fat_end)
        if a.arms or a.table:
            self._add_arms_and_table(region, x, y)
        if float(z.max()) > a.diaphragm_floor:
            cavity = region == CAVITY
            zd = a.diaphragm_z(x[cavity], y[cavity])
            zc = z[cavity]
            sub = np.full(zc.shape, CAVITY, dtype=np.uint8)
            sub[zc > zd] = DIAPHRAGM
            thorax = zc > zd + f32(4.0)
            sub[thorax] = LUNG
            middle = ((x[cavity] - f32(5.0)) / f32(45.0)) ** 2 + ((y[cavity] + f32(5.0)) / f32(95.0)) ** 2 < 1
            sub[thorax & middle] = MEDIASTINUM
            region[cavity] = sub
        return region

    def _add_arms_and_table(self, region, x, y) -> None:
        """Arms beside the body (skin, fat, muscle, humerus) and the table under the back, in the air."""
        a, f32 = self.anatomy, np.float32
        for xc, yc, wx, wy, bone in a.arms:
            dx, dy = x - f32(xc), y - f32(yc)
            e = np.sqrt((dx / f32(wx)) ** 2 + (dy / f32(wy)) ** 2)
            inside = (e < 1) & (region == AIR)
            depth = (f32(1.0) - e) * f32(min(wx, wy))
            r = np.sqrt(dx * dx + dy * dy)
            arm = np.full(region.shape, SKIN, dtype=np.uint8)
            arm[depth > 2] = FAT
            arm[depth > 2 + 0.3 * a.body["fat_ant"]] = MUSCLE
            arm[r < f32(bone)] = RIB
            arm[r < f32(bone - 3.0)] = RIB_MARROW
            region[inside] = arm[inside]
        t = a.table
        if t:
            top = f32(t["y"]) - f32(t["sag"]) * (x / f32(t["half_width"])) ** 2
            below = y - top
            inside = (below > 0) & (below < f32(t["thickness"])) & (np.abs(x) < f32(t["half_width"])) & (region == AIR)
            shell = (below < 3) | (below > f32(t["thickness"] - 3.0))
            region[inside & shell] = TABLE_SHELL
            region[inside & ~shell] = TABLE_CORE

    def _add_ribs(self, region, x, y, z, depth, fat_end):
        """Mark rib cortex and marrow in the muscle wall (ribs descend from the spine toward the front)."""
        ribs, wall = self.anatomy.ribs, self.anatomy.body["wall"]
        top = ribs["z_base"] + ribs["pitch"] * ribs["count"]
        band = (region == MUSCLE) & (z > np.float32(ribs["z_base"] - ribs["drop"] - 10.0)) & (z < np.float32(top))
        if not band.any():
            return
        xb, yb, zb = x[band], y[band], z[band]
        theta = np.abs(np.arctan2(xb, yb)) / np.float32(np.pi)  # 0 posterior midline, 1 anterior midline
        unrolled = zb + np.float32(ribs["drop"]) * theta - np.float32(ribs["z_base"])
        index = np.floor(unrolled / np.float32(ribs["pitch"]) + 0.5)
        dz = unrolled - index * np.float32(ribs["pitch"])
        dr = depth[band] - fat_end[band] - np.float32(wall / 2.0)
        extent = np.float32(0.45) + np.float32(0.4) * index / np.float32(ribs["count"])  # upper ribs reach further
        half_r = np.float32(min(4.0, wall / 2.0 - 0.5))
        e = (dz / np.float32(ribs["half_width"])) ** 2 + (dr / half_r) ** 2
        on = (index >= 0) & (index < ribs["count"]) & (theta > np.float32(0.12)) & (theta < extent) & (e < 1.0)
        sub = region[band]
        sub[on] = RIB
        sub[on & (e < np.float32(0.35))] = RIB_MARROW
        region[band] = sub

    def _paint_heart(self) -> None:
        block = self.shape_block(self.anatomy.heart)
        if block is None:
            return
        _, sl, _, sdf, _ = block
        inside = (sdf < 0) & np.isin(self.region[sl], (LUNG, MEDIASTINUM))
        self.hu[sl][inside] = np.float32(self.anatomy.hu["blood"] * 0.6 + 20.0)
        self.region[sl][inside] = MEDIASTINUM

    def _paint_muscles(self) -> None:
        for tube in self.anatomy.muscles:
            block = self.shape_block(tube)
            if block is None:
                continue
            _, sl, _, sdf, _ = block
            inside = (sdf < 0) & (self.region[sl] == CAVITY)
            self.hu[sl][inside] = np.float32(self.anatomy.hu["muscle"])

    def _paint_bowel(self) -> None:
        for bowel in self.anatomy.bowel:
            block = self.shape_block(bowel.shape)
            if block is None:
                continue
            _, sl, (x, y, z), sdf, axis_y = block
            inside = (sdf < 0) & (self.region[sl] == CAVITY)
            if not inside.any():
                continue
            if axis_y is None:  # a blob: gas level relative to its centre
                axis_y = np.float32(bowel.shape.centre[1])
            rel = (y - axis_y)[inside]
            lumen = sdf[inside] < -np.float32(bowel.wall_mm)
            values = np.full(rel.shape, np.float32(self.anatomy.hu["muscle"] - 5.0))
            content = np.full(rel.shape, np.float32(bowel.content_hu))
            if bowel.mottle is not None:  # stool: gas bubbles where three random plane waves add up
                p = (x[inside], y[inside], z[inside])
                bubbles = sum(np.sin(sum(np.float32(w[r]) * p[r] for r in range(3))) for w in bowel.mottle)
                content[bubbles > np.float32(1.3)] = np.float32(-650.0)
            content[rel < np.float32(bowel.gas_level_mm)] = np.float32(-990.0)
            values[lumen] = content[lumen]
            self.hu[sl][inside] = values

    def _paint_vessels(self, inside_organs: bool) -> None:
        """The free vessels, or those drawn only inside their organ (which keeps its label there)."""
        for tube, value, organ in self.anatomy.vessels:
            if (organ is not None) != inside_organs:
                continue
            block = self.shape_block(tube)
            if block is None:
                continue
            _, sl, _, sdf, _ = block
            inside = sdf < 0
            inside &= (self.labels[sl] == organ) if organ is not None else (self.region[sl] != AIR)
            self.hu[sl][inside] = np.float32(value)

    def _paint_organs(self) -> None:
        a = self.anatomy
        for label, shape, value in a.organs:
            block = self.shape_block(shape)
            if block is None:
                continue
            _, sl, _, sdf, _ = block
            inside = (sdf < 0) & (self.region[sl] == CAVITY)
            if isinstance(value, tuple):  # kidney: cortex and medulla
                values = np.where(sdf < -6.0, np.float32(value[1]), np.float32(value[0]))[inside]
            else:
                values = np.float32(value)
            self.hu[sl][inside] = values
            self.labels[sl][inside] = label
        for shape, value, label in a.carve:
            block = self.shape_block(shape)
            if block is None:
                continue
            _, sl, _, sdf, _ = block
            inside = (sdf < 0) & (self.labels[sl] == label)
            self.hu[sl][inside] = np.float32(value)
            self.labels[sl][inside] = 0
        for shape, value, required, label in a.overlays:  # lesions (keep the organ label), excreted contrast
            block = self.shape_block(shape)
            if block is None:
                continue
            _, sl, _, sdf, _ = block
            inside = (sdf < 0) & (self.labels[sl] == required) & (self.region[sl] == CAVITY)
            self.hu[sl][inside] = np.float32(value)
            self.labels[sl][inside] = label

    def _paint_spine(self) -> None:
        """Paraspinal muscles, vertebral bodies, discs, canal and posterior elements (bone overrides labels)."""
        a, s = self.anatomy, self.anatomy.spine
        low = np.array([-80.0, s["y"] - s["ry"] - 15.0 - s["lordosis"], -1e4])
        high = np.array([80.0, a.body["b_post"] + 1.0, 1e4])
        box = self.box(low, high)
        if box is None:
            return
        nk = box[1] - box[0]
        slab = max(1, int(1_500_000 // ((box[3] - box[2]) * (box[5] - box[4]))))
        for k0 in range(box[0], box[0] + nk, slab):
            sub = (k0, min(box[1], k0 + slab)) + box[2:]
            self._paint_spine_block(sub, *np.broadcast_arrays(*self.coords(sub)))

    def _paint_spine_block(self, box, x, y, z):
        s, hu = self.anatomy.spine, self.anatomy.hu
        sl = self.slices(box)
        region = self.region[sl]
        f = np.float32
        dy = y - (f(s["y"]) - f(s["lordosis"]) * ((z - f(s["z0"])) / f(100.0)) ** 2)
        ax = np.abs(x)
        ex, ey, erx, ery = s["erector"]
        erector = ((ax - f(ex)) / f(erx)) ** 2 + ((dy - f(ey)) / f(ery)) ** 2 < 1
        erector &= ((region == FAT) | (region == MUSCLE) | (region == CAVITY)) & (self.labels[sl] == 0)
        self.hu[sl][erector] = f(hu["muscle"])
        self.region[sl][erector] = MUSCLE
        phase = np.mod(z - f(s["phase"]), f(s["pitch"]))
        disc = phase < f(s["disc"])
        upper = (phase > f(s["disc"] + 2.0)) & (phase < f(s["disc"] + 0.6 * (s["pitch"] - s["disc"])))
        e_body = (x / f(s["rx"])) ** 2 + (dy / f(s["ry"])) ** 2
        vertebra = e_body < 1
        core = (x / f(s["rx"] - 2.0)) ** 2 + (dy / f(s["ry"] - 2.0)) ** 2 < 1
        crx, cry = s["canal_r"]
        e_canal = (x / f(crx)) ** 2 + ((dy - f(s["canal_y"])) / f(cry)) ** 2
        canal = e_canal < 1
        arch = ((x / f(crx + 5.0)) ** 2 + ((dy - f(s["canal_y"])) / f(cry + 5.0)) ** 2 < 1) & ~canal & ~disc
        spinous = (ax < 4) & (dy > f(s["canal_y"] + cry)) & (dy < f(s["spinous_end"])) & upper
        transverse = (np.abs(dy - f(s["canal_y"])) < 5) & (ax < f(s["transverse"])) & upper
        values = self.hu[sl]
        values[arch | spinous | transverse] = f(hu["cortical"] - 150.0)
        values[vertebra & disc] = f(hu["disc"])
        values[vertebra & ~disc] = f(hu["cortical"])
        values[vertebra & ~disc & core] = f(hu["cancellous"])
        values[canal] = f(hu["csf"])
        self.labels[sl][arch | spinous | transverse | vertebra | canal] = 0


# --------------------------------------------------------------------------------------------------------------
# Datasets and command line.


def write_dataset(out_dir, n: int, seed: int, progress: ProgressCallback | None = None, **phantom_kwargs) -> dict:
    """Write ``n`` phantoms as an AbdomenCT-1K style dataset.

    Layout: ``out_dir/volumes/Case_XXXXX_0000.nii.gz`` (CT, int16 HU) and ``out_dir/segmentations/Case_XXXXX.nii.gz``
    (labels, uint8), ids 1-based (``Case_00001`` … ``Case_{n:05d}``); case ``k`` is ``make_phantom(seed + k - 1,
    **phantom_kwargs)``, so datasets with disjoint seed ranges hold different phantoms. ``out_dir/dataset.json``
    records the generator, the library and generator versions, the arguments and, per case, its seed, files,
    size, spacing and the drawn quantities of :func:`phantom_parameters` (version 2). Every file is written
    atomically; existing cases with the same ids are replaced.

    Returns
    -------
    dict, the content of ``dataset.json``.
    """
    check_int("n", n)
    seed = check_int("seed", seed, 0)
    out_dir = Path(out_dir)
    cases = []
    for k in range(1, n + 1):
        case_id = f"Case_{k:05d}"
        report(progress, (k - 1) / n, f"phantom {k}/{n}")
        ct, labels = make_phantom(seed + k - 1, progress=sub_progress(progress, (k - 1) / n, (k - 0.1) / n),
                                  **phantom_kwargs)
        image_path = sconet_io.write_image(ct, out_dir / "volumes" / f"{case_id}_0000.nii.gz")
        label_path = sconet_io.write_image(labels, out_dir / "segmentations" / f"{case_id}.nii.gz")
        cases.append({"id": case_id, "seed": seed + k - 1, "image": image_path.relative_to(out_dir).as_posix(),
                      "label": label_path.relative_to(out_dir).as_posix(), "size": list(ct.GetSize()),
                      "spacing": [round(s, 6) for s in ct.GetSpacing()],
                      "parameters": json.loads(ct.GetMetaData("sconet_phantom_parameters"))})
        logger.info("wrote %s: size %s, spacing %s mm", case_id, ct.GetSize(),
                    tuple(round(s, 3) for s in ct.GetSpacing()))
    description = {
        "name": "SCONet synthetic abdominal CT phantoms",
        "generator": "SCONetLib.phantom.make_phantom", "sconet_version": __version__,
        "generator_version": int(phantom_kwargs.get("version", DEFAULT_VERSION)),
        "seed": seed, "n": n, "phantom_kwargs": sconet_io.jsonable(phantom_kwargs),
        "labels": {str(i): name for i, name in enumerate(organ_table.CLASS_NAMES)},
        "cases": cases,
    }
    write_json(description, out_dir / "dataset.json")
    report(progress, 1.0, f"wrote {n} phantoms to {out_dir}")
    return description


def main(argv=None) -> int:
    """``python -m SCONetLib.phantom OUT --n N --seed S``: write a phantom dataset (see :func:`write_dataset`)."""
    parser = argparse.ArgumentParser(
        prog="python -m SCONetLib.phantom",
        description="Write synthetic abdominal CT phantoms with organ labels as an AbdomenCT-1K style dataset "
                    "(volumes/Case_XXXXX_0000.nii.gz, segmentations/Case_XXXXX.nii.gz, dataset.json). "
                    "See SCONetLib.phantom.make_phantom for the anatomy and the randomisation.")
    parser.add_argument("out", type=Path, help="output folder (created if needed)")
    parser.add_argument("--n", type=int, default=10, help="number of phantoms (default 10)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the first case; case k uses seed + k - 1")
    parser.add_argument("--size", type=int, default=DEFAULT_SIZE, help="in-plane size in voxels (default 512)")
    parser.add_argument("--slices", type=int, default=None, help="slice count (default: 150-300 mm coverage)")
    parser.add_argument("--spacing", type=float, nargs=3, metavar=("X", "Y", "Z"), default=None,
                        help="voxel spacing in mm (default: random per case)")
    parser.add_argument("--fixed-orientation", action="store_true",
                        help="identity direction instead of random flips and tilts")
    parser.add_argument("--generator", type=int, choices=VERSIONS, default=2,
                        help="generator version: 2 (default, domain-randomised anatomy and appearance) or 1 "
                             "(the original narrow layout)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        write_dataset(args.out, args.n, args.seed, size=(args.size, args.size, args.slices), spacing=args.spacing,
                      random_orientation=not args.fixed_orientation, version=args.generator)
    except (ValueError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
