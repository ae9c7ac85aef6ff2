"""Inference: SCONet label maps and class probabilities of a CT volume, at its own or any other spacing.

:class:`Segmenter` loads a model once. :meth:`Segmenter.prepare` validates a CT, extracts its point cloud and
encodes it into the feature grid **once**; :meth:`Segmenter.segment` and :meth:`Segmenter.probabilities` then
only run the decoder, on the input grid or on a grid of the same physical box at another spacing, so changing
the output spacing costs a decode, never a re-encode.

Frames: output voxel index → LPS mm (:meth:`Grid.index_to_lps`) → model object frame
(:meth:`ObjectFrame.lps_to_object`, centred on the *input* volume's box), see :mod:`SCONetLib.geometry`.

Everything after the point stage stays on the segmenter's device: the feature grid, the coarse-to-fine lattices,
their masks and the queries; a label map crosses to the host once, when it is returned. Decoding is chunked (a
bounded number of queries per decoder call, labels reduced to ``uint8`` per chunk, so the ``(M, 5)`` logits of the
whole volume never exist at once) and, for label maps, coarse to fine by default: see :meth:`Segmenter.segment`.
For an :class:`SCONetLib.model.SCONet`, the decoder runs through :class:`_GridDecoder`, the same function arranged
for large query batches; on request under bfloat16 or float16 autocast (``precision``).
"""
from __future__ import annotations

import dataclasses
import logging
import math
import os
import warnings
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch
import torch.nn.functional as F

from .checkpoint import default_weights_path, load_checkpoint
from .device import resolve_device
from .geometry import Grid, ObjectFrame, spacing_mm
from .labels import NUM_CLASSES
from .model import SCONet
from .model.encoder import normalize_to_unit_cube
from .parallel import ordered_map, single_threaded_ops
from .points import extract_point_cloud
from .points.cloud import DEFAULT_N_POINTS, choose_implementations
from .progress import ProgressCallback, report, sub_progress
from .postprocess import keep_largest_components
from .validate import check_int

logger = logging.getLogger(__name__)

#: Queries per decoder call on the CPU (timed on 2 cores: a chunk's activations stay in the processor's cache).
CPU_CHUNK = 8_192
#: Queries per decoder call on a CUDA device (about 1.3 KB of activations per query in float32: ~0.35 GB).
CUDA_CHUNK = 262_144
#: Decoder precisions: autocast dtype (``None``: plain float32). Reduced precision is meant for CUDA; on the CPU it
#: is allowed but slower.
PRECISIONS = {"float32": None, "bfloat16": torch.bfloat16, "float16": torch.float16}
#: The first coarse lattice is spaced at most this fraction of a feature-grid cell (13.76 mm at 32³).
COARSE_CELL_FRACTION = 0.6
#: Largest stride (output voxels per axis) of the first coarse lattice.
MAX_COARSE_STEP = 8
#: Hard limit on the voxels of an output grid (SimpleITK and index arithmetic stay safely within 2**31).
MAX_OUTPUT_VOXELS = 2 ** 31
#: Fraction of the currently available memory an output may plan to use.
MEMORY_FRACTION = 0.5
#: Working memory per output voxel (bytes): labels, refinement masks and lattices, and the returned image for
#: segment() (peak resident memory measured at 8.7 B per voxel on a 512×512×100 CT);
#: (5 probabilities + entropy) float32 twice (array and image) for probabilities().
SEGMENT_BYTES_PER_VOXEL = 9
PROBABILITY_BYTES_PER_VOXEL = 2 * 4 * (NUM_CLASSES + 1)
#: Samples per axis of the volume-fraction estimate in the field-of-view check.
_FOV_SAMPLES_PER_AXIS = 33


@dataclasses.dataclass(frozen=True)
class _Prepared:
    """What :meth:`Segmenter.prepare` computes once per volume."""

    grid: Grid                    # input geometry (LPS)
    frame: ObjectFrame            # model frame of the input volume
    features: torch.Tensor        # (1, C, R, R, R) feature grid on the model's device
    logits: object                # (M, 3) float32 object-frame queries on the device → (M, C) logits
    fraction_volume_outside: float
    fraction_points_outside: float


class Segmenter:
    """SCONet inference on one CT at a time: encode once, decode at any output spacing.

    Parameters
    ----------
    weights : str or Path, optional
        SCONet checkpoint (:func:`SCONetLib.checkpoint.save_checkpoint`). ``None``: the bundled default model
        (:func:`SCONetLib.checkpoint.default_weights_path`).
    device : str or torch.device
        ``"auto"`` (CUDA if available, else CPU), ``"cpu"``, ``"cuda"`` or ``"cuda:N"``.
    n_points : int
        Points of the input cloud (sampled with replacement, as in training; reference 50,000).
    seed : int
        Seed of the point sampling, so a volume always gives the same segmentation.
    chunk_size : int, optional
        Queries per decoder call; default :data:`CPU_CHUNK` or :data:`CUDA_CHUNK`.
    precision : str
        Decoder precision, a key of :data:`PRECISIONS`: ``"float32"`` (default), or ``"bfloat16"`` / ``"float16"``
        autocast (for CUDA; labels agree with float32 on ≥ 99.9 % of voxels, tested). The encoder and the point
        stage always run in float32.
    implementation : str
        Point-stage implementation (``"auto"``, ``"numpy"``, ``"torch"``), see
        :func:`SCONetLib.points.extract_point_cloud`; ``"auto"`` chooses per device.

    Raises
    ------
    FileNotFoundError
        If the weights file (or, with ``weights=None``, the bundled model) does not exist.
    SCONetLib.checkpoint.CheckpointError
        If the file is not a valid SCONet checkpoint.
    ValueError
        For an unknown or unavailable device, precision or implementation.

    Examples
    --------
    Encode once, then label maps on the CT's own grid and on the same box at 2 mm (no re-encoding):

    >>> segmenter = Segmenter(device="cpu")        # doctest: +SKIP
    >>> segmenter.prepare(ct)                      # doctest: +SKIP
    >>> labels = segmenter.segment()               # doctest: +SKIP
    >>> coarse = segmenter.segment(spacing=2.0)    # doctest: +SKIP
    """

    def __init__(self, weights=None, device: str | torch.device = "auto", n_points: int = DEFAULT_N_POINTS,
                 seed: int = 0, chunk_size: int | None = None, *, precision: str = "float32",
                 implementation: str = "auto"):
        self.device = resolve_device(device)
        self.weights_path = default_weights_path() if weights is None else Path(weights)
        model, metadata = load_checkpoint(self.weights_path, device=self.device)
        self._init(model, metadata, n_points, seed, chunk_size)
        self._set_options(precision, implementation)

    @classmethod
    def from_model(cls, model, metadata: dict | None = None, device: str | torch.device = "cpu",
                   n_points: int = DEFAULT_N_POINTS, seed: int = 0, chunk_size: int | None = None, *,
                   precision: str = "float32", implementation: str = "auto") -> "Segmenter":
        """A segmenter around an in-memory model (e.g. during training or evaluation); nothing is loaded.

        ``model`` needs ``config`` (``scale_mm``, ``padding``, ``grid_resolution``, ``num_classes``), ``encode``
        and ``decode`` as :class:`SCONetLib.model.SCONet` has; it is moved to ``device`` and put in eval mode.
        """
        self = cls.__new__(cls)
        self.device = resolve_device(device)
        self.weights_path = None
        self._init(model.to(self.device).eval(), metadata or {}, n_points, seed, chunk_size)
        self._set_options(precision, implementation)
        return self

    def _set_options(self, precision: str, implementation: str) -> None:
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {list(PRECISIONS)}, got {precision!r}")
        choose_implementations(implementation, self.device)         # ValueError for an unknown name
        self.precision = precision
        self.implementation = implementation

    def _init(self, model, metadata: dict, n_points: int, seed: int, chunk_size: int | None) -> None:
        check_int("n_points", n_points, allow_none=True)
        check_int("chunk_size", chunk_size, allow_none=True)
        self.model = model
        self.metadata = metadata
        self.n_points = n_points
        self.seed = seed
        self.chunk_size = chunk_size or (CUDA_CHUNK if self.device.type == "cuda" else CPU_CHUNK)
        self._prepared: _Prepared | None = None

    # ------------------------------------------------------------------ encode once

    def prepare(self, image: sitk.Image, progress: ProgressCallback | None = None) -> None:
        """Validate a CT, extract its point cloud and encode it; later decodes reuse the result.

        Parameters
        ----------
        image : sitk.Image
            3D scalar CT in Hounsfield units, any geometry (LPS, any direction).
        progress : callable(fraction, message), optional
            May raise :class:`SCONetLib.progress.Cancelled`; the segmenter is then left unprepared.

        Raises
        ------
        TypeError, ValueError
            From :func:`SCONetLib.points.extract_point_cloud`: not a 3D scalar image, fewer than 2 voxels along
            an axis, NaN or infinite intensities, or a volume without edges (empty or constant).

        Warns
        -----
        UserWarning
            If the intensities do not look like CT in HU (from the point stage), or the field of view exceeds
            the model's box (±220.2 mm around the volume centre at the reference scale), stating the fraction of
            the volume and of the points outside it (those are clamped into the border cells; labels there are
            unreliable).
        """
        self._prepared = None
        cloud = extract_point_cloud(image, n_points=self.n_points, seed=self.seed,  # validates the image first
                                    progress=sub_progress(progress, 0.0, 0.9), implementation=self.implementation,
                                    device=self.device)
        grid = Grid.of(image)
        config = self.model.config
        frame = ObjectFrame.of(grid, config.scale_mm)
        volume_outside, points_outside = _check_field_of_view(grid, frame, cloud.xyz_lps, config.padding)
        report(progress, 0.9, "encoding the point cloud")
        points = torch.from_numpy(np.ascontiguousarray(cloud.model_input(frame), dtype=np.float32))
        with torch.inference_mode():
            features = self.model.encode(points[None].to(self.device))
        report(progress, 1.0, "encoded")
        logits = _logits_function(self.model, features, PRECISIONS[self.precision])
        self._prepared = _Prepared(grid, frame, features, logits, volume_outside, points_outside)
        logger.info("prepared volume %s: %d points encoded on %s", grid.size, len(cloud.xyz_lps), self.device)

    @property
    def is_prepared(self) -> bool:
        """Whether a volume has been encoded (``prepare`` finished)."""
        return self._prepared is not None

    @property
    def input_grid(self) -> Grid:
        """Grid of the prepared volume."""
        return self._state().grid

    @property
    def frame(self) -> ObjectFrame:
        """Object frame of the prepared volume."""
        return self._state().frame

    @property
    def fraction_volume_outside(self) -> float:
        """Fraction of the prepared volume outside the model's box (clamped into its border cells)."""
        return self._state().fraction_volume_outside

    @property
    def fraction_points_outside(self) -> float:
        """Fraction of the encoded points outside the model's box."""
        return self._state().fraction_points_outside

    def _state(self) -> _Prepared:
        if self._prepared is None:
            raise RuntimeError("no volume is prepared: call prepare(image) first (it did not run, failed or was "
                               "cancelled)")
        return self._prepared

    # ------------------------------------------------------------------ output grids

    def output_grid(self, spacing=None, bytes_per_voxel: int = SEGMENT_BYTES_PER_VOXEL) -> Grid:
        """Grid of an output at ``spacing`` for the prepared volume; see :func:`output_grid`."""
        return output_grid(self._state().grid, spacing, bytes_per_voxel)

    # ------------------------------------------------------------------ decode

    def segment(self, spacing=None, progress: ProgressCallback | None = None, dense: bool = False,
                postprocess: bool = False) -> sitk.Image:
        """Label map of the prepared volume.

        Parameters
        ----------
        spacing : float or 3 floats (mm), optional
            ``None``: on the input grid (same size, spacing, origin and direction exactly). Otherwise on
            ``input_grid.with_spacing(spacing)``: the same physical box and direction at the new spacing.
        progress : callable(fraction, message), optional
            May raise :class:`SCONetLib.progress.Cancelled`.
        dense : bool
            Evaluate every output voxel instead of coarse to fine (exact, several times slower).
        postprocess : bool
            Keep each organ's largest connected components (:func:`SCONetLib.postprocess.keep_largest_components`);
            False (the paper's setting): the argmax as it is.

        Returns
        -------
        sitk.Image, uint8
            0 background, 1 liver, 2 kidneys, 3 spleen, 4 pancreas (argmax of the logits).

        Notes
        -----
        Coarse to fine: the decoder runs on a lattice of every ``s``-th output voxel per axis (``s`` a power of
        two, the largest with ``s · spacing ≤`` :data:`COARSE_CELL_FRACTION` of a feature-grid cell, at most
        :data:`MAX_COARSE_STEP`; the last voxel of each axis is always included). A lattice cell whose 8 corners
        do not all carry the same label is refined together with its 26 neighbour cells (one coarse cell of
        margin; at the last step, from stride ≤ 2 to 1, without margin: a uniform cell of 2 voxels per axis could
        hide only a structure one voxel thin). The next, twice finer lattice is evaluated inside refined cells and
        copied from the cells' (uniform) corners elsewhere; this repeats down to stride 1. Labels are piecewise
        smooth at the
        feature-grid scale (the decoder sees position only through trilinear interpolation of the 13.8 mm grid),
        so this agrees with ``dense=True`` on all but a tiny fraction of voxels (tested ≥ 99.9 %) while
        evaluating a few percent of them. Which strides are used is logged at DEBUG level.
        """
        state = self._state()          # one snapshot: a prepare() finishing meanwhile cannot mix two volumes
        out = output_grid(state.grid, spacing, SEGMENT_BYTES_PER_VOXEL)
        if dense:
            labels = torch.empty(out.voxel_count(), dtype=torch.uint8, device=self.device)
            self._decode(state, out, None, progress, labels=labels)
        else:
            labels = self._coarse_to_fine(state, out, progress)
        labels = labels.cpu().numpy().reshape(out.size[::-1])      # the one transfer of the label map
        image = out.image_from_array(labels)
        if postprocess:
            image = keep_largest_components(image)
        report(progress, 1.0, "segmented")
        return image

    def probabilities(self, spacing=None, progress: ProgressCallback | None = None) -> tuple[sitk.Image, sitk.Image]:
        """Softmax class probabilities and their normalised entropy, on every output voxel.

        Parameters
        ----------
        spacing, progress
            As for :meth:`segment`.

        Returns
        -------
        probabilities : sitk.Image, float32 vector image with ``num_classes`` (5) components
            Component ``c`` is the probability of label ``c`` (softmax of the logits; components sum to 1).
        entropy : sitk.Image, float32
            Entropy of the class distribution divided by ``ln(num_classes)``, so 0 = certain, 1 = uniform.

        Notes
        -----
        Evaluated densely (probabilities have no uniform regions to skip), so it is several times slower than
        :meth:`segment` at the same spacing.
        """
        state = self._state()          # one snapshot, as in segment()
        out = output_grid(state.grid, spacing, PROBABILITY_BYTES_PER_VOXEL)
        num_classes = self.model.config.num_classes
        probs = np.empty(out.size[::-1] + (num_classes,), dtype=np.float32)
        entropy = np.empty(out.size[::-1], dtype=np.float32)
        self._decode(state, out, None, progress, probabilities=probs.reshape(-1, num_classes),
                     entropy=entropy.reshape(-1))
        report(progress, 1.0, "probabilities computed")
        probs_image = out.apply_to(sitk.GetImageFromArray(probs, isVector=True))
        del probs
        return probs_image, out.image_from_array(entropy)

    def _coarse_to_fine(self, state: _Prepared, out: Grid, progress: ProgressCallback | None) -> torch.Tensor:
        """(K, J, I) uint8 labels on ``out``, coarse to fine (see :meth:`segment`), on the segmenter's device."""
        config = self.model.config
        shape = out.size[::-1]
        cell_mm = state.frame.half_extent_mm(config.padding) * 2.0 / config.grid_resolution
        levels = _stride_levels(out.spacing[::-1], cell_mm)
        logger.debug("coarse-to-fine strides (k, j, i) per level: %s", levels)
        fractions = np.linspace(0.0, 1.0, len(levels) + 1)
        axes = [torch.from_numpy(_lattice(n, s)).to(self.device) for n, s in zip(shape, levels[0])]
        labels = torch.empty(tuple(len(a) for a in axes), dtype=torch.uint8, device=self.device)
        voxels = torch.cartesian_prod(*axes).reshape(-1, 3)
        self._decode(state, out, voxels, sub_progress(progress, 0.0, fractions[1]), labels=labels.view(-1))
        evaluated = len(voxels)
        for level, strides in enumerate(levels[1:], start=1):
            new_axes = [torch.from_numpy(_lattice(n, s)).to(self.device) for n, s in zip(shape, strides)]
            labels, need = _refine(labels, axes, new_axes, margin=level < len(levels) - 1)
            where = torch.nonzero(need)
            voxels = torch.stack([axis[where[:, d]] for d, axis in enumerate(new_axes)], dim=1)
            values = torch.empty(len(voxels), dtype=torch.uint8, device=self.device)
            self._decode(state, out, voxels, sub_progress(progress, fractions[level], fractions[level + 1]),
                         labels=values)
            labels[need] = values                  # nonzero and boolean assignment both run in C order
            logger.debug("level %d, strides %s: %d voxels decoded", level, strides, len(voxels))
            evaluated += len(voxels)
            axes = new_axes
        total = int(np.prod(shape))
        logger.info("coarse-to-fine decoding evaluated %d of %d voxels (%.1f %%)", evaluated, total,
                    100.0 * evaluated / total)
        return labels

    def _decode(self, state: _Prepared, out: Grid, voxels: torch.Tensor | None, progress: ProgressCallback | None,
                labels: torch.Tensor | None = None, probabilities: np.ndarray | None = None,
                entropy: np.ndarray | None = None) -> None:
        """Run the decoder on output voxels, chunk by chunk, writing the reduced results into the given arrays.

        On the CPU, chunks run on as many threads as torch has intra-op threads, with torch's own parallelism off
        meanwhile (:mod:`SCONetLib.parallel`); progress is reported in order from this thread.

        Parameters
        ----------
        state : the prepared volume.
        out : output grid.
        voxels : (M, 3) int64 tensor of (k, j, i) voxel indices on the device, or ``None`` for every voxel of
            ``out`` in C (K, J, I) order.
        labels : (M,) uint8 tensor on the device, optional
            Receives the argmax class of each query.
        probabilities : (M, num_classes) float32 numpy array, optional
            Receives the softmax.
        entropy : (M,) float32 numpy array, optional
            Receives the entropy / ln(num_classes).
        """
        total = out.voxel_count() if voxels is None else len(voxels)
        index_to_object = torch.from_numpy((state.frame.lps_to_object_matrix @ out.ijk_to_lps)[:3]).to(self.device)
        plane = out.size[0] * out.size[1]
        log_classes = math.log(self.model.config.num_classes)

        def decode_chunk(start: int) -> int:
            stop = min(total, start + self.chunk_size)
            with torch.inference_mode():
                if voxels is None:
                    flat = torch.arange(start, stop, device=self.device)
                    ijk = torch.stack([flat % out.size[0], (flat % plane) // out.size[0], flat // plane], dim=1)
                else:
                    ijk = voxels[start:stop].flip(1)
                queries = (ijk.double() @ index_to_object[:, :3].T + index_to_object[:, 3]).float()
                logits = state.logits(queries)
                if labels is not None:
                    labels[start:stop] = logits.argmax(dim=1).to(torch.uint8)
                if probabilities is not None or entropy is not None:
                    log_p = torch.log_softmax(logits.float(), dim=1)
                    p = log_p.exp()
                    if probabilities is not None:
                        probabilities[start:stop] = p.cpu().numpy()
                    if entropy is not None:
                        entropy[start:stop] = (-(p * log_p).sum(dim=1) / log_classes).cpu().numpy()
            return stop

        with single_threaded_ops(self.device) as workers:
            for stop in ordered_map(decode_chunk, range(0, total, self.chunk_size), workers):
                report(progress, stop / total, f"decoding {stop:,} / {total:,} voxels")


def _logits_function(model, features: torch.Tensor, autocast_dtype: torch.dtype | None):
    """``f(queries (M, 3) float32) -> (M, C) logits`` for ``model`` and its feature grid ``features``.

    An :class:`SCONetLib.model.SCONet` with its own ``decode`` goes through :class:`_GridDecoder`; any other model
    (or a patched one) through ``model.decode``. With ``autocast_dtype``, calls run under ``torch.autocast``.
    """
    if isinstance(model, SCONet) and "decode" not in vars(model) and _GridDecoder.supports(model.decoder):
        decode = _GridDecoder(model.decoder, features)
    else:
        def decode(queries):
            return model.decode(queries[None], features)[0]
    if autocast_dtype is None:
        return decode

    def decode_autocast(queries):
        with torch.autocast(device_type=queries.device.type, dtype=autocast_dtype):
            return decode(queries)
    return decode_autocast


class _GridDecoder:
    """:class:`SCONetLib.model.decoder.LocalDecoder` evaluated for large query batches at inference.

    The same function, arranged for throughput: the feature grid is stored channels-last, ``(R³, C)``, so that the
    trilinear interpolation gathers whole rows (corner-aligned, at continuous index ``(R - 1)·u``, as the decoder's
    ``grid_sample`` with ``align_corners=True``); the five ``fc_c`` layers run as one ``(C, 5·H)`` product. Logits
    equal ``model.decode``'s up to float32 rounding (tested).

    Parameters
    ----------
    decoder : LocalDecoder (identity shortcuts, as SCONet's).
    grid : (1, C, R, R, R) feature grid, axes [z, y, x].
    """

    def __init__(self, decoder, grid: torch.Tensor):
        channels, resolution = grid.shape[1], grid.shape[-1]
        self.padding = decoder.padding
        self.resolution = resolution
        self.table = grid[0].permute(1, 2, 3, 0).reshape(-1, channels).contiguous()
        self.conditioning = (torch.cat([fc.weight for fc in decoder.fc_c]), torch.cat([fc.bias for fc in decoder.fc_c]))
        self.blocks = [(b.fc_0.weight, b.fc_0.bias, b.fc_1.weight, b.fc_1.bias) for b in decoder.blocks]
        self.width = decoder.blocks[0].fc_0.out_features
        self.output = (decoder.fc_out.weight, decoder.fc_out.bias)

    @staticmethod
    def supports(decoder) -> bool:
        """Whether ``decoder`` has the structure this class evaluates (every block with an identity shortcut)."""
        return all(block.shortcut is None for block in decoder.blocks)

    def __call__(self, queries: torch.Tensor) -> torch.Tensor:
        """(M, 3) float32 object-frame queries → (M, num_classes) logits."""
        conditioning = F.linear(self._features(queries), *self.conditioning)
        net = None
        for index, (w0, b0, w1, b1) in enumerate(self.blocks):
            part = conditioning[:, index * self.width:(index + 1) * self.width]
            net = part if net is None else net + part
            hidden = F.linear(torch.relu(net), w0, b0).relu_()
            net = net + F.linear(hidden, w1, b1)
        return F.linear(torch.relu(net), *self.output)

    def _features(self, queries: torch.Tensor) -> torch.Tensor:
        """(M, C) trilinear interpolation of the grid at the queries (units of the unit cube, border-clamped)."""
        r = self.resolution
        position = normalize_to_unit_cube(queries, self.padding) * (r - 1)       # in [0, 0.999 (R - 1)]
        corner = position.floor().clamp_(max=max(r - 2, 0))
        weight = position - corner
        corner = corner.long()
        base = corner[:, 0] + r * (corner[:, 1] + r * corner[:, 2])
        features = None
        for dz in (0, 1):
            for dy in (0, 1):
                for dx in (0, 1):
                    w = ((weight[:, 0] if dx else 1.0 - weight[:, 0]) * (weight[:, 1] if dy else 1.0 - weight[:, 1])
                         * (weight[:, 2] if dz else 1.0 - weight[:, 2]))
                    rows = self.table.index_select(0, base + (dx + r * (dy + r * dz)))
                    rows *= w[:, None]
                    features = rows if features is None else features.add_(rows)
        return features


def output_grid(grid: Grid, spacing=None, bytes_per_voxel: int = SEGMENT_BYTES_PER_VOXEL) -> Grid:
    """Grid of an output at ``spacing``: ``grid`` itself for ``None``, else the same box resampled.

    Parameters
    ----------
    grid : Grid
        The input volume's grid.
    spacing : float or 3 floats (mm, i/j/k order), optional
        See :meth:`SCONetLib.geometry.Grid.with_spacing` (same physical box and direction).
    bytes_per_voxel : int
        Working memory the caller needs per output voxel, for the budget check
        (:data:`SEGMENT_BYTES_PER_VOXEL`, :data:`PROBABILITY_BYTES_PER_VOXEL`).

    Raises
    ------
    ValueError
        Spacing not one or three positive finite numbers, or an output larger than :data:`MAX_OUTPUT_VOXELS` or
        than :data:`MEMORY_FRACTION` of the available memory. Checked before anything is allocated; the message
        states the size.
    """
    if spacing is None:
        _check_budget(np.asarray(grid.size, dtype=np.float64), bytes_per_voxel, "the input grid")
        return grid
    spacing = spacing_mm(spacing)
    _check_budget(grid.size_at(spacing), bytes_per_voxel, f"spacing {tuple(float(s) for s in spacing)} mm")
    return grid.with_spacing(spacing)


def _stride_levels(spacing_mm, cell_mm: float) -> list[tuple]:
    """Lattice strides per level, coarsest first, ending with all ones.

    The first stride along an axis is the largest power of two ``s ≤`` :data:`MAX_COARSE_STEP` with
    ``s · spacing ≤ COARSE_CELL_FRACTION · cell_mm`` (at least 1). Level ``l`` of ``L`` uses
    ``min(first, 2**(L - 1 - l))``: the largest strides halve first, so a coarsely sampled axis (thick slices)
    stays coarse until the last levels.
    """
    target = COARSE_CELL_FRACTION * cell_mm
    first = [int(min(MAX_COARSE_STEP, 2 ** max(0, math.floor(math.log2(target / s))))) for s in spacing_mm]
    n_levels = int(math.log2(max(first))) + 1
    return [tuple(min(s, 2 ** (n_levels - 1 - level)) for s in first) for level in range(n_levels)]


def _lattice(n: int, stride: int) -> np.ndarray:
    """Indices ``0, stride, 2·stride, …`` along an axis of ``n`` voxels, plus ``n - 1``: (L,) int64, increasing."""
    indices = np.arange(0, n, stride, dtype=np.int64)
    return indices if indices[-1] == n - 1 else np.append(indices, n - 1)


def _refine(labels: torch.Tensor, axes: list, new_axes: list, margin: bool = True) -> tuple[torch.Tensor,
                                                                                             torch.Tensor]:
    """Carry coarse labels to a finer lattice and mark where the decoder must run (on the labels' device).

    Parameters
    ----------
    labels : (Lk, Lj, Li) uint8 tensor, labels on the coarse lattice ``axes`` (three increasing int64 tensors).
    axes, new_axes : per (k, j, i) axis, the output indices of the coarse and of the finer lattice; every coarse
        index is also a finer one.
    margin : bool
        Also refine the 26 neighbours of every cell with mixed corners.

    Returns
    -------
    new_labels : (Lk', Lj', Li') uint8 tensor
        On the finer lattice: each point takes the label of the coarse lattice point at or below it (exact on
        coarse points, and the label of the whole neighbourhood where that is uniform).
    need : (Lk', Lj', Li') bool tensor
        Points to evaluate: inside a coarse cell whose corners do not all carry the same label, or (``margin``) next
        to such a cell (3×3×3 cells), excluding the points already evaluated on the coarse lattice.
    """
    high, low = labels, labels
    for axis in range(3):            # extremes over the 8 corners of each cell (between lattice points c, c + 1)
        n = labels.shape[axis]
        if n > 1:
            high = torch.maximum(high.narrow(axis, 0, n - 1), high.narrow(axis, 1, n - 1))
            low = torch.minimum(low.narrow(axis, 0, n - 1), low.narrow(axis, 1, n - 1))
    cells = _dilate(high != low) if margin else high != low
    below = [torch.searchsorted(old, new, right=True) - 1 for old, new in zip(axes, new_axes)]
    cell_of = [b.clamp(max=max(0, len(old) - 2)) for b, old in zip(below, axes)]
    new_labels, need = labels, cells
    for axis in range(3):
        new_labels = _take(new_labels, axis, below[axis])
        need = _take(need, axis, cell_of[axis])
    on_old = [torch.nonzero(torch.isin(new, old)).reshape(-1) for old, new in zip(axes, new_axes)]
    need[on_old[0][:, None, None], on_old[1][None, :, None], on_old[2][None, None, :]] = False
    return new_labels, need


def _take(x: torch.Tensor, dim: int, index: torch.Tensor) -> torch.Tensor:
    """``x.index_select(dim, index)``, by advanced indexing along the last axis (faster there on the CPU)."""
    if dim == x.dim() - 1:
        return x[..., index]
    return x.index_select(dim, index)


def _dilate(mask: torch.Tensor) -> torch.Tensor:
    """3 × 3 × 3 maximum filter of a bool tensor (the border repeats, which leaves a maximum unchanged)."""
    for axis in range(3):
        n = mask.shape[axis]
        if n > 1:
            grown = mask.clone()
            grown.narrow(axis, 1, n - 1).logical_or_(mask.narrow(axis, 0, n - 1))
            grown.narrow(axis, 0, n - 1).logical_or_(mask.narrow(axis, 1, n - 1))
            mask = grown
    return mask


def _check_budget(size: np.ndarray, bytes_per_voxel: int, what: str) -> None:
    """Refuse an output of ``size`` (3 floats, i/j/k) voxels beyond the voxel and memory limits."""
    voxels = math.prod(float(s) for s in size)          # Python floats: inf rather than an overflow warning
    limit = float(MAX_OUTPUT_VOXELS)
    available = _available_memory()
    if available is not None:
        limit = min(limit, MEMORY_FRACTION * available / bytes_per_voxel)
    if voxels > limit:
        dims = " × ".join(_format_count(s) for s in size)
        memory = "" if available is None else \
            f", and {MEMORY_FRACTION:.0%} of the {_format_bytes(available)} available"
        raise ValueError(f"the output for {what} would be {dims} = {_format_count(voxels)} voxels "
                         f"(~{_format_bytes(voxels * bytes_per_voxel)}), over the limit of {limit:,.0f} voxels "
                         f"(at most {MAX_OUTPUT_VOXELS:,}{memory}); choose a larger spacing")


def _format_bytes(n: float) -> str:
    """``n`` bytes as MiB below 1 GiB, GiB below 1 PiB (one decimal), else in scientific notation."""
    if n < 2**30:
        return f"{n / 2**20:,.1f} MiB"
    return f"{n / 2**30:,.1f} GiB" if n < 2**50 else f"{n / 2**30:.2g} GiB"


def _format_count(n: float) -> str:
    """A count with thousands separators, or in scientific notation from 10^15 on (``--spacing 1e-300``)."""
    return f"{n:,.0f}" if n < 1e15 else f"{n:.2g}"


def _available_memory() -> int | None:
    """Bytes of memory currently available (Linux ``MemAvailable``, else free physical pages), or ``None``."""
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):
        return None


def _check_field_of_view(grid: Grid, frame: ObjectFrame, xyz_lps: np.ndarray, padding: float) -> tuple:
    """Fractions (volume, points) outside the model's box; warns when the volume sticks out of it."""
    samples = [np.linspace(0.0, n - 1.0, min(n, _FOV_SAMPLES_PER_AXIS)) for n in grid.size]
    ijk = np.stack([a.ravel() for a in np.meshgrid(*samples, indexing="ij")], axis=1)
    volume_outside = frame.fraction_outside(grid.index_to_lps(ijk), padding)
    points_outside = frame.fraction_outside(xyz_lps, padding)
    if volume_outside > 0.0 or points_outside > 0.0:
        corners = np.array([[a, b, c] for a in (-0.5, grid.size[0] - 0.5) for b in (-0.5, grid.size[1] - 0.5)
                            for c in (-0.5, grid.size[2] - 0.5)])
        extent = np.ptp(grid.index_to_lps(corners), axis=0)
        half = frame.half_extent_mm(padding)
        warnings.warn(f"the field of view ({extent[0]:.0f} × {extent[1]:.0f} × {extent[2]:.0f} mm, x/y/z) exceeds "
                      f"the model's box of ±{half:.1f} mm around the volume centre: {volume_outside:.1%} of the "
                      f"volume and {points_outside:.1%} of the edge points lie outside it and are clamped into the "
                      f"border cells, so labels there are unreliable; crop the volume to the abdomen for best "
                      f"results", UserWarning, stacklevel=3)
    return volume_outside, points_outside
