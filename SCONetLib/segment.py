"""Segment a CT file or DICOM folder and write the label map, optional probability maps and a JSON sidecar.

:func:`segment_file` does the whole job (the ``sconet-segment`` command line in :mod:`SCONetLib.cli` only parses
arguments, shows progress and prints the result). :func:`segment_image` is its computing half, for callers that
write further files in the same all-or-nothing set (the demo: :mod:`SCONetLib.demo`).
"""
from __future__ import annotations

import contextlib
import datetime
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from . import __version__
from . import io as sconet_io
from .geometry import Grid
from .infer import PROBABILITY_BYTES_PER_VOXEL, SEGMENT_BYTES_PER_VOXEL, Segmenter, output_grid
from .labels import ORGANS
from .points.cloud import DEFAULT_N_POINTS
from .progress import ProgressCallback, report, sub_progress

#: Name of the tool in sidecars.
PROG = "sconet-segment"
#: Appended to the input's stem for the default output name.
OUTPUT_TAG = "_sconet"
DEFAULT_SUFFIX = ".nii.gz"
#: Output suffixes: plain label volumes (io.write_image) and Slicer segmentations (io.write_segmentation).
OUTPUT_SUFFIXES = sconet_io.WRITE_SUFFIXES + (sconet_io.SEG_SUFFIX,)


@dataclass
class SegmentationResult:
    """What :func:`segment_image` computed and :func:`segment_file` wrote.

    Attributes
    ----------
    labels : sitk.Image, uint8 label map (0 background, 1 liver, 2 kidneys, 3 spleen, 4 pancreas), LPS geometry.
    output : Path of the label map.
    plan : OutputPlan, every file of the result.
    maps : probability / entropy map path → float32 image (empty without ``probabilities_dir``).
    files : every file written (label map, probability maps, then the JSON sidecar last); empty until written.
    volumes_ml : organ name → volume in millilitres.
    timings_s : step name → seconds.
    warnings : messages of the warnings raised on the way (also re-issued as warnings).
    sidecar : the JSON sidecar's content (``timings_s`` is completed when it is written).
    """

    labels: sitk.Image
    output: Path
    plan: "OutputPlan"
    maps: dict = field(default_factory=dict)
    files: list = field(default_factory=list)
    volumes_ml: dict = field(default_factory=dict)
    timings_s: dict = field(default_factory=dict)
    warnings: list = field(default_factory=list)
    sidecar: dict = field(default_factory=dict)

    def outputs(self, start: float) -> list:
        """The :class:`SCONetLib.io.Output` set of this result (label map, maps, sidecar last); the sidecar's
        ``timings_s`` gets the write time and the total since ``start`` (``time.perf_counter()``) when written."""
        write_start = time.perf_counter()

        def sidecar():
            self.timings_s["write"] = time.perf_counter() - write_start
            self.timings_s["total"] = time.perf_counter() - start
            self.sidecar["timings_s"] = {key: round(value, 3) for key, value in self.timings_s.items()}
            return self.sidecar

        plan = self.plan
        label_output = (sconet_io.segmentation_output if plan.suffix == sconet_io.SEG_SUFFIX
                        else sconet_io.image_output)(self.labels, plan.labels)
        return [label_output, *(sconet_io.image_output(image, path) for path, image in self.maps.items()),
                sconet_io.json_output(sidecar, plan.sidecar)]


def segment_file(input, output=None, spacing=None, device: str = "auto", weights=None, probabilities_dir=None,
                 dense: bool = False, n_points: int = DEFAULT_N_POINTS, arguments: dict | None = None,
                 progress: ProgressCallback | None = None, postprocess: bool = True,
                 precision: str = "float32") -> SegmentationResult:
    """Segment a CT and write the label map, optional probability maps and a JSON sidecar.

    Parameters
    ----------
    input : str, Path or sitk.Image
        A CT file (NIfTI, NRRD, MetaImage) or a folder holding one DICOM series (see
        :func:`SCONetLib.io.read_image`), or an image already in memory (then ``output`` is required).
    output : str or Path, optional
        Label map to write: ``.nii.gz``, ``.nii``, ``.nrrd``, ``.mha`` (uint8 label volume) or ``.seg.nrrd``
        (3D Slicer segmentation with organ names, colours and terminology). Default: ``<stem>_sconet.nii.gz``
        next to an input file, or in the current folder for a DICOM folder. It may not be the input itself.
    spacing : float or 3 floats (mm), optional
        Output spacing; default the input grid (see :meth:`SCONetLib.infer.Segmenter.segment`).
    device : str
        ``"auto"``, ``"cpu"``, ``"cuda"`` or ``"cuda:N"``.
    weights : str or Path, optional
        SCONet checkpoint; default the bundled model.
    probabilities_dir : str or Path, optional
        Also write, into this folder, one float32 probability map per organ (``<stem>_probability_<organ>``)
        and the normalised entropy (``<stem>_entropy``, 0 certain … 1 uniform), in the label map's format
        (``.nrrd`` for a ``.seg.nrrd`` output). Evaluated densely: slower than the label map.
    dense : bool
        Decode every voxel instead of coarse to fine.
    n_points : int
        Points of the input cloud (reference and default 50,000).
    arguments : dict, optional
        Recorded as ``"arguments"`` in the sidecar (the command line passes its parsed arguments); default the
        arguments of this call.
    progress : callable(fraction, message), optional
        May raise :class:`SCONetLib.progress.Cancelled`: nothing is written then.
    postprocess : bool
        Keep each organ's largest connected components in the label map (default; the probability maps are
        never altered). False: the network's argmax as it is, as in the paper.
    precision : str
        Decoder precision (``"float32"``, ``"bfloat16"``, ``"float16"``), see :class:`SCONetLib.infer.Segmenter`.

    Returns
    -------
    SegmentationResult

    Raises
    ------
    FileNotFoundError
        Missing input or weights.
    ValueError
        Unsupported output suffix, output equal to the input, bad spacing or too large an output, an input that
        cannot be segmented (not 3D scalar, NaN, no edges, damaged file, uneven DICOM slices).
    OSError
        An output folder that cannot be written (checked before the computation).
    SCONetLib.checkpoint.CheckpointError
        Corrupt weights file.

    Notes
    -----
    The files are written as one set (:func:`SCONetLib.io.write_outputs`) after everything is computed: a
    failure, a cancellation, Ctrl-C or SIGTERM leaves every earlier file at these paths as it was, and a run
    killed outright is completed or cleaned up at the next start (temporaries in the output folders are swept
    before the computation). The JSON sidecar (``<output>.json``: arguments, input and output grids, model
    summary, volumes, timings, warnings) is the last file of the set.
    """
    start = time.perf_counter()
    in_memory = isinstance(input, sitk.Image)
    if in_memory and output is None:
        raise ValueError("output is required when input is an image in memory")
    input_path = None if in_memory else Path(input)
    if input_path is not None and not input_path.exists():
        raise FileNotFoundError(f"input does not exist: {str(input_path)!r}")
    plan = OutputPlan.make(default_output_path(input_path) if output is None else Path(output), probabilities_dir)
    if input_path is not None:
        _refuse_overwriting_input(plan.all, input_path)
    plan.prepare_folders()
    if arguments is None:
        arguments = {"input": "<image in memory>" if in_memory else str(input_path), "output": str(plan.labels),
                     "spacing": spacing, "device": device, "weights": weights,
                     "probabilities_dir": probabilities_dir, "dense": dense, "n_points": n_points,
                     "postprocess": postprocess, "precision": precision}
    timings = {}
    with recording_warnings() as messages:
        t = time.perf_counter()
        segmenter = Segmenter(weights=weights, device=device, n_points=n_points, precision=precision)
        timings["load_model"] = time.perf_counter() - t
        t = time.perf_counter()
        image = input if in_memory else sconet_io.read_image(input_path)
        timings["read"] = time.perf_counter() - t
        result = segment_image(image, plan, segmenter, spacing, dense, arguments,
                               None if in_memory else input_path, progress, postprocess)
    result.timings_s = {**timings, **result.timings_s}
    result.warnings = messages
    result.sidecar["warnings"] = messages
    report(progress, 0.98, "writing")
    result.files = sconet_io.write_outputs(result.outputs(start))
    report(progress, 1.0, "done")
    return result


def segment_image(image: sitk.Image, plan: "OutputPlan", segmenter: Segmenter, spacing=None, dense: bool = False,
                  arguments: dict | None = None, input_path: Path | None = None,
                  progress: ProgressCallback | None = None, postprocess: bool = True) -> SegmentationResult:
    """Compute everything :func:`segment_file` writes for ``image``, without writing (see its parameters).

    Progress runs from 0 to 0.98. The sidecar's ``"warnings"`` list is empty: the caller records the warnings
    of the whole run (:func:`recording_warnings`) and fills it.
    """
    maps_wanted = plan.entropy is not None
    for bytes_per_voxel in [SEGMENT_BYTES_PER_VOXEL] + ([PROBABILITY_BYTES_PER_VOXEL] if maps_wanted else []):
        output_grid(Grid.of(image), spacing, bytes_per_voxel)     # bad spacing: fail before the long steps
    prepared, segmented = (0.6, 0.7) if maps_wanted else (0.8, 0.98)   # progress fractions
    timings = {}
    t = time.perf_counter()
    segmenter.prepare(image, progress=sub_progress(progress, 0.0, prepared))
    timings["prepare"] = time.perf_counter() - t
    t = time.perf_counter()
    labels = segmenter.segment(spacing, dense=dense, progress=sub_progress(progress, prepared, segmented),
                               postprocess=postprocess)
    timings["segment"] = time.perf_counter() - t
    maps = {}
    if maps_wanted:
        t = time.perf_counter()
        probs, entropy = segmenter.probabilities(spacing, progress=sub_progress(progress, segmented, 0.98))
        maps = {path: sitk.VectorIndexSelectionCast(probs, organ.label, sitk.sitkFloat32)
                for organ, path in zip(ORGANS, plan.probabilities)}
        maps[plan.entropy] = entropy
        del probs
        timings["probabilities"] = time.perf_counter() - t
    volumes = organ_volumes_ml(labels)
    sidecar = {
        "tool": PROG,
        "library_version": __version__,
        "created_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "arguments": arguments,
        "input": {"path": None if input_path is None else str(input_path.resolve()),
                  "grid": _grid_dict(segmenter.input_grid)},
        "output": {"path": str(plan.labels.resolve()), "grid": _grid_dict(Grid.of(labels))},
        "files": [str(p.resolve()) for p in plan.all],
        "device": str(segmenter.device),
        "model": model_summary(segmenter),
        "points": {"encoded": segmenter.n_points, "seed": segmenter.seed,
                   "fraction_outside_model_box": segmenter.fraction_points_outside,
                   "fraction_volume_outside_model_box": segmenter.fraction_volume_outside},
        "volumes_ml": volumes,
        "warnings": [],
    }
    return SegmentationResult(labels, plan.labels, plan, maps, [], volumes, timings, [], sidecar)


@dataclass(frozen=True)
class OutputPlan:
    """Every file a run writes: label map, optional probability and entropy maps, JSON sidecar (last)."""

    labels: Path
    suffix: str
    probabilities: tuple
    entropy: Path | None
    sidecar: Path

    @classmethod
    def make(cls, output: Path, probabilities_dir=None) -> "OutputPlan":
        """The files of a run writing the label map ``output`` (and maps into ``probabilities_dir`` if given);
        ``ValueError`` for an unsupported output suffix."""
        output = Path(output)
        suffix = sconet_io.image_suffix(output.name, OUTPUT_SUFFIXES)
        if suffix is None:
            raise ValueError(f"unsupported output file name {str(output)!r}: expected a name ending in one of "
                             f"{list(OUTPUT_SUFFIXES)}")
        probabilities, entropy = (), None
        if probabilities_dir is not None:
            stem = output.name[:-len(suffix)]
            map_suffix = ".nrrd" if suffix == sconet_io.SEG_SUFFIX else suffix
            probabilities = tuple(Path(probabilities_dir) / f"{stem}_probability_{organ.name}{map_suffix}"
                                  for organ in ORGANS)
            entropy = Path(probabilities_dir) / f"{stem}_entropy{map_suffix}"
        return cls(output, suffix, probabilities, entropy, output.with_name(output.name + ".json"))

    @property
    def all(self) -> list:
        return [self.labels, *self.probabilities, *([self.entropy] if self.entropy else []), self.sidecar]

    def prepare_folders(self) -> None:
        """Before any computation: refuse folders that cannot be written (``OSError`` naming them) and sweep the
        temporaries of killed runs from the existing ones (:func:`SCONetLib.io.remove_partial_outputs`)."""
        folders = list(dict.fromkeys(path.parent for path in self.all))
        for folder in folders:
            sconet_io.check_writable_folder(folder)
        for folder in folders:
            sconet_io.remove_partial_outputs(folder)


@contextlib.contextmanager
def recording_warnings():
    """Collect the messages of the warnings raised inside the block, and re-issue the warnings after it."""
    messages, caught = [], []
    try:
        with warnings.catch_warnings(record=True) as recorder:
            warnings.simplefilter("always")
            try:
                yield messages
            finally:
                caught.extend(recorder)
                messages.extend(str(w.message) for w in recorder)
    finally:
        for w in caught:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)


def default_output_path(input_path: Path, suffix: str = DEFAULT_SUFFIX) -> Path:
    """``<stem>_sconet<suffix>`` beside an input file, or in the current folder for a DICOM folder."""
    input_path = Path(input_path)
    if input_path.is_dir():
        return Path.cwd() / f"{input_path.resolve().name}{OUTPUT_TAG}{suffix}"
    return input_path.with_name(f"{sconet_io.image_stem(input_path.name)}{OUTPUT_TAG}{suffix}")


def _refuse_overwriting_input(paths: list, input_path: Path) -> None:
    """``ValueError`` if a planned output is the input file, or an existing file of the input DICOM folder."""
    source = input_path.resolve()
    for path in paths:
        target = path.resolve()
        if target == source or (source.is_dir() and target.parent == source and target.exists()):
            what = "the input" if target == source else "a file of the input folder"
            raise ValueError(f"refusing to overwrite the input: output {str(path)!r} is {what} "
                             f"{str(input_path)!r}; choose another output name")


def organ_volumes_ml(labels: sitk.Image) -> dict:
    """Organ name → volume (mL) of a label map: voxel count × voxel volume (spacing product, mm³) / 1000."""
    counts = np.bincount(sitk.GetArrayViewFromImage(labels).ravel(), minlength=max(o.label for o in ORGANS) + 1)
    voxel_ml = float(np.prod(labels.GetSpacing())) / 1000.0
    return {organ.name: round(float(counts[organ.label]) * voxel_ml, 3) for organ in ORGANS}


def model_summary(segmenter: Segmenter) -> dict:
    """JSON-ready description of the segmenter's model: weights file, config and the checkpoint's metadata."""
    config = segmenter.model.config
    return {
        "weights": None if segmenter.weights_path is None else str(Path(segmenter.weights_path).resolve()),
        "config": config.to_dict() if hasattr(config, "to_dict") else sconet_io.jsonable(vars(config)),
        "metadata": sconet_io.jsonable(segmenter.metadata),
    }


def _grid_dict(grid: Grid) -> dict:
    return {"size": list(grid.size), "spacing_mm": list(grid.spacing), "origin_lps_mm": list(grid.origin),
            "direction": list(grid.direction)}
