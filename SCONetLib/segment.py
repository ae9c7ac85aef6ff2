"""``sconet-segment``: segment the liver, kidneys, spleen and pancreas in a CT file or DICOM folder.

Command line (also ``python -m SCONetLib.segment``)::

    sconet-segment INPUT [-o OUTPUT] [--spacing MM [MM MM]] [--device auto|cpu|cuda|cuda:N] [--weights W]
                   [--probabilities DIR] [--dense] [--precision float32|bfloat16|float16]
    sconet-segment FOLDER_OR_LIST [-o DIR] ...   # batch: one label map per CT (SCONetLib.batch)
    sconet-segment [-o DIR]          # no INPUT: the demo on a synthetic phantom (SCONetLib.demo)

The arguments are documented on :func:`segment_file`, which does the work; :func:`main` only parses them, shows
progress and prints the result.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import logging
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from . import __version__
from . import io as sconet_io
from .batch import case_stem, is_batch_source, segment_batch
from .io import write_json
from .checkpoint import CheckpointError
from .geometry import Grid
from .infer import PROBABILITY_BYTES_PER_VOXEL, SEGMENT_BYTES_PER_VOXEL, Segmenter, output_grid
from .labels import ORGANS
from .metrics import dice
from .points.cloud import DEFAULT_N_POINTS
from .progress import Cancelled, ProgressCallback, report, sub_progress

logger = logging.getLogger(__name__)

PROG = "sconet-segment"
#: Appended to the input's stem for the default output name.
OUTPUT_TAG = "_sconet"
DEFAULT_SUFFIX = ".nii.gz"
#: Output suffixes: plain label volumes (io.write_image) and Slicer segmentations (io.write_segmentation).
OUTPUT_SUFFIXES = sconet_io.WRITE_SUFFIXES + (sconet_io.SEG_SUFFIX,)


@dataclass
class SegmentationResult:
    """What :func:`segment_file` produced.

    Attributes
    ----------
    labels : sitk.Image, uint8 label map (0 background, 1 liver, 2 kidneys, 3 spleen, 4 pancreas), LPS geometry.
    output : Path of the label map written.
    files : every file written (label map, probability maps, then the JSON sidecar last).
    volumes_ml : organ name → volume in millilitres.
    dice : organ name → Dice against ``reference`` (empty without a reference).
    timings_s : step name → seconds.
    warnings : messages of the warnings raised on the way (also re-issued as warnings).
    sidecar : the JSON sidecar's content.
    """

    labels: sitk.Image
    output: Path
    files: list = field(default_factory=list)
    volumes_ml: dict = field(default_factory=dict)
    dice: dict = field(default_factory=dict)
    timings_s: dict = field(default_factory=dict)
    warnings: list = field(default_factory=list)
    sidecar: dict = field(default_factory=dict)


def segment_file(input, output=None, spacing=None, device: str = "auto", weights=None, probabilities_dir=None,
                 dense: bool = False, n_points: int = DEFAULT_N_POINTS, reference: sitk.Image | None = None,
                 arguments: dict | None = None, progress: ProgressCallback | None = None,
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
    reference : sitk.Image, optional
        Label map to compare with (same grid as the output): Dice per organ goes into the result and sidecar.
    arguments : dict, optional
        Recorded as ``"arguments"`` in the sidecar (the command line passes its parsed arguments); default the
        arguments of this call.
    progress : callable(fraction, message), optional
        May raise :class:`SCONetLib.progress.Cancelled`: nothing is written then.
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
        cannot be segmented (not 3D scalar, NaN, no edges), a reference on another grid.
    SCONetLib.checkpoint.CheckpointError
        Corrupt weights file.

    Notes
    -----
    Files are written only after everything is computed, each atomically, the JSON sidecar (``<output>.json``:
    arguments, input and output grids, model summary, volumes, timings, warnings) last. If a write fails, the
    files already written by this call are removed, so a run leaves either all its files or none.
    """
    start = time.perf_counter()
    in_memory = isinstance(input, sitk.Image)
    if in_memory and output is None:
        raise ValueError("output is required when input is an image in memory")
    input_path = None if in_memory else Path(input)
    if input_path is not None and not input_path.exists():
        raise FileNotFoundError(f"input does not exist: {str(input_path)!r}")
    plan = _OutputPlan.make(default_output_path(input_path) if output is None else Path(output), probabilities_dir)
    if input_path is not None:
        _refuse_overwriting_input(plan.all, input_path)

    timings = {}
    maps_wanted = probabilities_dir is not None
    with _recording_warnings() as messages:
        t = time.perf_counter()
        segmenter = Segmenter(weights=weights, device=device, n_points=n_points, precision=precision)
        timings["load_model"] = time.perf_counter() - t
        t = time.perf_counter()
        image = input if in_memory else sconet_io.read_image(input_path)
        timings["read"] = time.perf_counter() - t
        for bytes_per_voxel in [SEGMENT_BYTES_PER_VOXEL] + ([PROBABILITY_BYTES_PER_VOXEL] if maps_wanted else []):
            output_grid(Grid.of(image), spacing, bytes_per_voxel)     # bad spacing: fail before the long steps
        prepared, segmented = (0.6, 0.7) if maps_wanted else (0.8, 0.98)   # progress fractions
        t = time.perf_counter()
        segmenter.prepare(image, progress=sub_progress(progress, 0.0, prepared))
        timings["prepare"] = time.perf_counter() - t
        t = time.perf_counter()
        labels = segmenter.segment(spacing, dense=dense, progress=sub_progress(progress, prepared, segmented))
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
    scores = {}
    if reference is not None:
        if Grid.of(reference) != Grid.of(labels):
            raise ValueError(f"reference must be on the output grid {Grid.of(labels)}, got {Grid.of(reference)}")
        truth = sitk.GetArrayViewFromImage(reference)
        predicted = sitk.GetArrayViewFromImage(labels)
        scores = {organ.name: dice(predicted, truth, organ.label) for organ in ORGANS}
    if arguments is None:
        arguments = {"input": "<image in memory>" if in_memory else str(input_path), "output": str(plan.labels),
                     "spacing": spacing, "device": device, "weights": weights,
                     "probabilities_dir": probabilities_dir, "dense": dense, "n_points": n_points}
    volumes = organ_volumes_ml(labels)
    sidecar = {
        "tool": PROG,
        "library_version": __version__,
        "created_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "arguments": _jsonable(arguments),
        "input": {"path": None if in_memory else str(input_path.resolve()), "grid": _grid_dict(segmenter.input_grid)},
        "output": {"path": str(plan.labels.resolve()), "grid": _grid_dict(Grid.of(labels))},
        "files": [str(p.resolve()) for p in plan.all],
        "device": str(segmenter.device),
        "model": model_summary(segmenter),
        "points": {"encoded": segmenter.n_points, "seed": segmenter.seed,
                   "fraction_outside_model_box": segmenter.fraction_points_outside,
                   "fraction_volume_outside_model_box": segmenter.fraction_volume_outside},
        "volumes_ml": volumes,
        **({"dice": scores} if scores else {}),
        "warnings": messages,
    }
    report(progress, 0.98, "writing")
    written = plan.write(labels, maps, sidecar, timings, start)
    report(progress, 1.0, "done")
    return SegmentationResult(labels, plan.labels, written, volumes, scores, timings, messages, sidecar)


@dataclass(frozen=True)
class _OutputPlan:
    """Every file a run writes: label map, optional probability and entropy maps, JSON sidecar (last)."""

    labels: Path
    suffix: str
    probabilities: tuple
    entropy: Path | None
    sidecar: Path

    @classmethod
    def make(cls, output: Path, probabilities_dir) -> "_OutputPlan":
        suffix = _output_suffix(output)
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

    def write(self, labels: sitk.Image, maps: dict, sidecar: dict, timings: dict, start: float) -> list:
        """Write everything (sidecar last, with the write and total times); on failure remove what was written."""
        t = time.perf_counter()
        written = []
        try:
            write = sconet_io.write_segmentation if self.suffix == sconet_io.SEG_SUFFIX else sconet_io.write_image
            written.append(write(labels, self.labels))
            for path, image in maps.items():
                written.append(sconet_io.write_image(image, path))
            timings["write"] = time.perf_counter() - t
            timings["total"] = time.perf_counter() - start
            sidecar["timings_s"] = {key: round(value, 3) for key, value in timings.items()}
            written.append(write_json(sidecar, self.sidecar))
        except BaseException:
            for path in written:
                with contextlib.suppress(OSError):
                    path.unlink()
            raise
        return written


@contextlib.contextmanager
def _recording_warnings():
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
    return input_path.with_name(f"{case_stem(input_path)}{OUTPUT_TAG}{suffix}")


def _output_suffix(output: Path) -> str:
    """The (lower-case) supported suffix of ``output``; ``ValueError`` listing the supported ones otherwise."""
    lower = output.name.lower()
    for suffix in sorted(OUTPUT_SUFFIXES, key=len, reverse=True):
        if lower.endswith(suffix) and len(lower) > len(suffix):
            return suffix
    raise ValueError(f"unsupported output file name {str(output)!r}: expected a name ending in one of "
                     f"{list(OUTPUT_SUFFIXES)}")


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
        "config": config.to_dict() if hasattr(config, "to_dict") else _jsonable(vars(config)),
        "metadata": _jsonable(segmenter.metadata),
    }


def _grid_dict(grid: Grid) -> dict:
    return {"size": list(grid.size), "spacing_mm": list(grid.spacing), "origin_lps_mm": list(grid.origin),
            "direction": list(grid.direction)}


def _jsonable(value):
    """``value`` with paths, numpy scalars/arrays and tuples turned into JSON types (others via ``str``)."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


# ---------------------------------------------------------------------------------------------- command line


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Segment the liver, kidneys, spleen and pancreas in an abdominal CT with SCONet. Without "
                    "INPUT, run the demo: segment a synthetic phantom and write a figure. Details: "
                    "help(SCONetLib.segment.segment_file).")
    parser.add_argument("input", nargs="?", metavar="INPUT",
                        help="CT file (.nii, .nii.gz, .nrrd, .nhdr, .mha, .mhd) or DICOM series folder; or, for a "
                             "batch, a folder of CT files / DICOM series folders or a text file listing CTs, one "
                             "per line (then -o is the output folder, default the current folder)")
    parser.add_argument("-o", "--output", metavar="OUTPUT",
                        help="label map to write (.nii.gz, .nii, .nrrd, .mha, or .seg.nrrd for a Slicer "
                             "segmentation); default <stem>_sconet.nii.gz beside INPUT (current folder for DICOM). "
                             "Demo: the output folder (default ./sconet-demo)")
    parser.add_argument("--spacing", nargs="+", type=float, metavar="MM",
                        help="output spacing in mm: one value (isotropic) or three (i j k); default: input grid")
    parser.add_argument("--device", default="auto", help="auto (default), cpu, cuda or cuda:N")
    parser.add_argument("--weights", metavar="W", help="SCONet checkpoint (default: the bundled model)")
    parser.add_argument("--probabilities", metavar="DIR",
                        help="also write per-organ probability maps and the entropy map into DIR")
    parser.add_argument("--dense", action="store_true", help="decode every voxel (exact, slower)")
    parser.add_argument("--precision", default="float32", choices=["float32", "bfloat16", "float16"],
                        help="decoder precision (reduced precision is for CUDA; default float32)")
    parser.add_argument("--points", type=int, default=DEFAULT_N_POINTS, metavar="N",
                        help=f"points of the input cloud (default {DEFAULT_N_POINTS})")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    return parser


def main(argv=None) -> int:
    """Entry point of ``sconet-segment``; returns the exit status (0 ok, 1 error, 2 usage, 130 cancelled)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.spacing is not None and len(args.spacing) not in (1, 3):
        parser.error(f"--spacing takes one or three values (mm), got {len(args.spacing)}")
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format=f"{PROG}: %(levelname)s: %(message)s")
    if args.input is None and (args.spacing is not None or args.probabilities is not None):
        parser.error("--spacing and --probabilities need an INPUT (without INPUT, the demo runs)")
    spacing = None if args.spacing is None else (args.spacing[0] if len(args.spacing) == 1 else args.spacing)
    bar = _ProgressBar(sys.stderr) if sys.stderr.isatty() else None
    try:
        with warnings.catch_warnings():
            warnings.showwarning = _show_warning
            if args.input is None:
                from .demo import run_demo
                demo = run_demo(args.output or "sconet-demo", weights=args.weights, device=args.device,
                                dense=args.dense, n_points=args.points, progress=bar)
                _finish(bar)
                _print_result(demo.result, extra=f"figure: {demo.figure}")
            elif is_batch_source(args.input):
                if args.probabilities is not None:
                    parser.error("--probabilities is not available for a batch (a folder or list of CTs)")
                summary = segment_batch(args.input, args.output or ".", spacing=spacing, device=args.device,
                                        weights=args.weights, dense=args.dense, n_points=args.points,
                                        precision=args.precision, progress=bar)
                _finish(bar)
                print(f"{PROG}: {summary['done']} segmented, {summary['skipped']} already done, "
                      f"{summary['failed']} failed; {summary['cts_per_hour']:.1f} CTs/hour; summary: "
                      f"{summary['summary']}")
                return 1 if summary["failed"] else 0
            else:
                result = segment_file(args.input, args.output, spacing=spacing, device=args.device,
                                      weights=args.weights, probabilities_dir=args.probabilities, dense=args.dense,
                                      n_points=args.points, arguments=vars(args), progress=bar,
                                      precision=args.precision)
                _finish(bar)
                _print_result(result)
    except (Cancelled, KeyboardInterrupt):
        _finish(bar)
        print(f"{PROG}: cancelled; nothing was written", file=sys.stderr)
        return 130
    except (FileNotFoundError, ValueError, TypeError, CheckpointError, RuntimeError, OSError) as error:
        _finish(bar)
        print(f"{PROG}: error: {error}", file=sys.stderr)
        return 1
    return 0


def _show_warning(message, category, filename, lineno, file=None, line=None):
    print(f"{PROG}: warning: {message}", file=sys.stderr)


def _finish(bar) -> None:
    if bar is not None:
        bar.close()


def _print_result(result: SegmentationResult, extra: str | None = None) -> None:
    grid = Grid.of(result.labels)
    print(f"{PROG}: wrote {result.output}")
    print(f"  grid {' × '.join(str(n) for n in grid.size)} voxels of "
          f"{' × '.join(f'{s:.3g}' for s in grid.spacing)} mm")
    for organ in ORGANS:
        score = f"   Dice {result.dice[organ.name]:.3f}" if organ.name in result.dice else ""
        print(f"  {organ.display_name:<10}{result.volumes_ml[organ.name]:>10.1f} mL{score}")
    print("  time: " + ", ".join(f"{k.replace('_', ' ')} {v:.1f} s" for k, v in result.timings_s.items()))
    for path in result.files[1:]:
        print(f"  also wrote {path}")
    if extra:
        print(f"  {extra}")


class _ProgressBar:
    """Text progress bar on a terminal stream: ``[#####     ]  50% message``."""

    WIDTH = 30

    def __init__(self, stream):
        self.stream = stream
        self.shown = False

    def __call__(self, fraction: float, message: str) -> None:
        filled = int(round(fraction * self.WIDTH))
        text = f"\r[{'#' * filled}{' ' * (self.WIDTH - filled)}] {fraction:4.0%} {message[:60]:<60}"
        self.stream.write(text)
        self.stream.flush()
        self.shown = True

    def close(self) -> None:
        if self.shown:
            self.stream.write("\n")
            self.stream.flush()
            self.shown = False


if __name__ == "__main__":
    sys.exit(main())
