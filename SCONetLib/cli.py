"""The command lines: ``sconet-segment`` (and its demo), ``sconet-train`` and ``sconet-evaluate``.

Each ``*_main(argv=None) -> int`` parses arguments, calls the library (:func:`SCONetLib.segment.segment_file`,
:func:`SCONetLib.demo.run_demo`, :func:`SCONetLib.train_loop.train`, :func:`SCONetLib.evaluate.evaluate_cases`),
shows progress and returns the exit status: 0 success, 1 error, 2 bad usage, 130 interrupted (Ctrl-C or SIGTERM,
which are handled alike: the run cleans up and earlier outputs stay as they were).

They also run as ``python -m SCONetLib`` (sconet-segment), ``python -m SCONetLib.train`` (also as a script,
``Slicer --python-script SCONetLib/train.py -- …``) and ``python -m SCONetLib.evaluate``.
"""
from __future__ import annotations

import argparse
import contextlib
import logging
import os
import shlex
import signal
import sys
import threading
import warnings
from pathlib import Path

from . import io as sconet_io
from .checkpoint import CheckpointError
from .data import LAYOUTS, find_cases, split_cases
from .demo import DEMO_FOLDER, run_demo
from .geometry import Grid
from .labels import ORGANS
from .model import ModelConfig
from .points.cloud import DEFAULT_N_POINTS
from .progress import Cancelled
from .batch import is_batch_source, segment_batch
from .segment import PROG, SegmentationResult, segment_file
from .train_config import SELECTION_KEYS, TrainConfig, load_config

#: Exit statuses.
OK, FAILED, USAGE, INTERRUPTED = 0, 1, 2, 130


# ============================================================================ shared


@contextlib.contextmanager
def sigterm_as_interrupt():
    """Inside the block SIGTERM (what schedulers and ``kill`` send) raises ``KeyboardInterrupt`` like Ctrl-C, so a
    run cleans up its temporaries and reports instead of dying silently (main thread only)."""
    if not hasattr(signal, "SIGTERM") or threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, sconet_io.raise_keyboard_interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


class ProgressBar:
    """Text progress bar on a terminal stream: ``[#####     ]  50% message``."""

    WIDTH = 30

    def __init__(self, stream):
        self.stream = stream
        self.shown = False

    @classmethod
    def on_terminal(cls, stream=None) -> "ProgressBar | None":
        """A bar on ``stream`` (default stderr) if it is a terminal, else ``None`` (logs are enough there)."""
        stream = sys.stderr if stream is None else stream
        return cls(stream) if stream.isatty() else None

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


def _strip_separator(argv) -> list:
    """``argv`` (default ``sys.argv[1:]``) without a leading ``--`` (``Slicer --python-script x.py -- …``)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    return argv[1:] if argv[:1] == ["--"] else argv


def run_as_script(main) -> None:
    """Run ``main()`` and exit with its status, whatever happens (a headless Slicer would otherwise keep
    running after ``--python-script``)."""
    try:
        status = main()
    except SystemExit as exit_request:  # argparse --help / usage errors
        status = exit_request.code if isinstance(exit_request.code, int) else USAGE
    except BaseException as error:  # never leave a headless Slicer hanging
        print(f"error: {type(error).__name__}: {error}", file=sys.stderr)
        status = FAILED
    sys.exit(status)


# ============================================================================ sconet-segment


def build_segment_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Segment the liver, kidneys, spleen and pancreas in an abdominal CT with SCONet. Without "
                    "INPUT (or with --demo), run the demo: segment a synthetic phantom and write a figure. "
                    "Details: help(SCONetLib.segment.segment_file).")
    parser.add_argument("input", nargs="?", metavar="INPUT",
                        help="CT file (.nii, .nii.gz, .nrrd, .nhdr, .mha, .mhd) or DICOM series folder; or, for a "
                             "batch, a folder of CT files / DICOM series folders or a text file listing CTs, one "
                             "per line (then -o is the output folder, default the current folder)")
    parser.add_argument("-o", "--output", metavar="OUTPUT",
                        help="label map to write (.nii.gz, .nii, .nrrd, .mha, or .seg.nrrd for a Slicer "
                             "segmentation); default <stem>_sconet.nii.gz beside INPUT (current folder for DICOM). "
                             f"With --demo: the output folder (default ./{DEMO_FOLDER})")
    parser.add_argument("--demo", action="store_true",
                        help="run the demo on a synthetic phantom (what sconet-segment does without arguments)")
    parser.add_argument("--spacing", nargs="+", metavar="MM",
                        help="output spacing in mm: one value (isotropic) or three (i j k); default: input grid")
    parser.add_argument("--device", default="auto", help="auto (default), cpu, cuda or cuda:N")
    parser.add_argument("--weights", metavar="W", help="SCONet checkpoint (default: the bundled model)")
    parser.add_argument("--probabilities", metavar="DIR",
                        help="also write per-organ probability maps and the entropy map into DIR")
    parser.add_argument("--dense", action="store_true", help="decode every voxel (exact, slower)")
    parser.add_argument("--no-postprocess", dest="postprocess", action="store_false",
                        help="keep the network's raw output (as the paper) instead of each organ's largest "
                             "connected components (liver 1, kidneys 2, spleen 1, pancreas 1)")
    parser.add_argument("--precision", default="float32", choices=["float32", "bfloat16", "float16"],
                        help="decoder precision (reduced precision is for CUDA; default float32)")
    parser.add_argument("--points", type=int, default=DEFAULT_N_POINTS, metavar="N",
                        help=f"points of the input cloud (default {DEFAULT_N_POINTS})")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    return parser


def _parse_segment_args(parser: argparse.ArgumentParser, argv) -> argparse.Namespace:
    """Parse and cross-check the arguments (``parser.error`` exits with status 2)."""
    args = parser.parse_args(argv)
    if args.spacing is not None:
        # --spacing takes one or three numbers; a path right after them (``--spacing 2 CT.nii.gz``) is INPUT
        numbers = []
        for text in args.spacing:
            try:
                numbers.append(float(text))
            except ValueError:
                break
        rest = args.spacing[len(numbers):]
        if rest and args.input is None and len(rest) == 1:
            args.input = rest[0]
        elif rest:
            parser.error(f"--spacing takes one or three numbers (mm); {rest[0]!r} is not a number")
        if len(numbers) not in (1, 3):
            parser.error(f"--spacing takes one or three values (mm), got {len(numbers)}")
        args.spacing = numbers[0] if len(numbers) == 1 else numbers
    if args.input is None:
        if args.spacing is not None or args.probabilities is not None:
            parser.error("--spacing and --probabilities need an INPUT (without INPUT, the demo runs)")
        if args.output is not None and not args.demo:
            parser.error(f"-o {args.output} was given without INPUT: pass the CT to segment (an empty shell "
                         f"variable?), or --demo to write the demo into that folder")
        args.demo = True
    elif args.demo:
        parser.error(f"--demo takes no INPUT (got {args.input!r})")
    if args.demo and args.output is not None and sconet_io.image_suffix(args.output) is not None:
        parser.error(f"the demo writes a folder of files; -o {args.output} looks like an image file name")
    return args


def segment_main(argv=None) -> int:
    """Entry point of ``sconet-segment``; returns the exit status (0 ok, 1 error, 2 usage, 130 interrupted)."""
    parser = build_segment_parser()
    args = _parse_segment_args(parser, argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format=f"{PROG}: %(levelname)s: %(message)s")
    bar = ProgressBar.on_terminal()
    try:
        with warnings.catch_warnings(), sigterm_as_interrupt():
            warnings.showwarning = _show_warning
            if args.demo:
                demo = run_demo(args.output or DEMO_FOLDER, weights=args.weights, device=args.device,
                                dense=args.dense, n_points=args.points, progress=bar)
                _finish(bar)
                _print_result(demo.result, demo.dice, extra=f"figure: {demo.figure}")
            elif is_batch_source(args.input):
                if args.probabilities is not None:
                    parser.error("--probabilities is not available for a batch (a folder or list of CTs)")
                summary = segment_batch(args.input, args.output or ".", spacing=args.spacing, device=args.device,
                                        weights=args.weights, dense=args.dense, n_points=args.points,
                                        precision=args.precision, progress=bar, postprocess=args.postprocess)
                _finish(bar)
                print(f"{PROG}: {summary['done']} segmented, {summary['skipped']} already done, "
                      f"{summary['failed']} failed; {summary['cts_per_hour']:.1f} CTs/hour; summary: "
                      f"{summary['summary']}")
                return FAILED if summary["failed"] else OK
            else:
                result = segment_file(args.input, args.output, spacing=args.spacing, device=args.device,
                                      weights=args.weights, probabilities_dir=args.probabilities, dense=args.dense,
                                      n_points=args.points, arguments=vars(args), progress=bar,
                                      postprocess=args.postprocess, precision=args.precision)
                _finish(bar)
                _print_result(result)
    except sconet_io.InterruptedAfterWriting as interrupt:
        _finish(bar)
        print(f"{PROG}: interrupted after the outputs were complete: {', '.join(map(str, interrupt.paths))}",
              file=sys.stderr)
        return INTERRUPTED
    except (Cancelled, KeyboardInterrupt):
        _finish(bar)
        print(f"{PROG}: interrupted; no output was written (earlier files at the output paths are unchanged)",
              file=sys.stderr)
        return INTERRUPTED
    except (FileNotFoundError, ValueError, TypeError, CheckpointError, RuntimeError, OSError) as error:
        _finish(bar)
        print(f"{PROG}: error: {error}", file=sys.stderr)
        return FAILED
    return OK


def _show_warning(message, category, filename, lineno, file=None, line=None):
    print(f"{PROG}: warning: {message}", file=sys.stderr)


def _finish(bar) -> None:
    if bar is not None:
        bar.close()


def _print_result(result: SegmentationResult, dice: dict | None = None, extra: str | None = None) -> None:
    grid = Grid.of(result.labels)
    print(f"{PROG}: wrote {result.output}")
    print(f"  grid {' × '.join(str(n) for n in grid.size)} voxels of "
          f"{' × '.join(f'{s:.3g}' for s in grid.spacing)} mm")
    for organ in ORGANS:
        score = f"   Dice {dice[organ.name]:.3f}" if dice and organ.name in dice else ""
        print(f"  {organ.display_name:<10}{result.volumes_ml[organ.name]:>10.1f} mL{score}")
    print("  time: " + ", ".join(f"{k.replace('_', ' ')} {v:.1f} s" for k, v in result.timings_s.items()))
    for path in result.files[1:]:
        print(f"  also wrote {path}")
    if extra:
        print(f"  {extra}")


# ============================================================================ sconet-train

#: Flags that override configuration keys: flag destination → dotted key.
_TRAIN_FLAG_KEYS = {
    "out": "out_dir", "source": "data.source", "data": "data.root", "image_pattern": "data.image_pattern",
    "label_pattern": "data.label_pattern", "label_map": "data.label_map", "split_seed": "data.split_seed",
    "cache_dir": "data.cache_dir", "workers": "data.workers", "grid": "model.grid_resolution",
    "epochs": "epochs", "points": "n_points", "queries": "n_queries", "lr": "lr", "weight_decay": "weight_decay",
    "augment_sigma": "augment_sigma", "organ_fraction": "organ_fraction", "seed": "seed", "device": "device",
    "threads": "threads", "val_queries": "val_queries", "checkpoint_every": "checkpoint_every",
    "select_on": "select_on", "init_weights": "init_weights",
}


def build_train_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m SCONetLib.train",
        description="Train SCONet (see the SCONetLib.train_loop module and TrainConfig for every setting). A YAML "
                    "--config gives the settings; each flag overrides the YAML key named in its help.")
    parser.add_argument("--config", type=Path, help="YAML file with TrainConfig keys (unknown keys are errors)")
    parser.add_argument("--resume", action="store_true", help="continue the run in --out from its model_last.pt")
    parser.add_argument("--preprocess-only", action="store_true", help="build the preprocessing cache and stop")
    add = parser.add_argument
    add("--out", help="run folder [out_dir]")
    add("--source", choices=["abdomenct1k", "folder", "phantom"], help="dataset kind [data.source]")
    add("--data", help="dataset folder [data.root]")
    add("--image-pattern", help="image path pattern with {id}, for --source folder [data.image_pattern]")
    add("--label-pattern", help="label path pattern with {id}, for --source folder [data.label_pattern]")
    add("--label-map", help="preset (totalsegmentator, btcv, ...) or 'src:dst,...' [data.label_map]")
    add("--split-seed", type=int, help="seed of the split when there are no .lst files [data.split_seed]")
    add("--cache-dir", help="preprocessing cache folder [data.cache_dir]")
    add("--workers", type=int, help="preprocessing worker processes [data.workers]")
    add("--grid", type=int, help="feature grid resolution, 32 (A) or 64 (B) [model.grid_resolution]")
    add("--epochs", type=int, help="[epochs]")
    add("--points", type=int, help="input points per step [n_points]")
    add("--queries", type=int, help="query voxels per step [n_queries]")
    add("--lr", type=float, help="AdamW learning rate [lr]")
    add("--weight-decay", type=float, help="[weight_decay]")
    add("--augment-sigma", type=float, help="random linear transform sigma, object units [augment_sigma]")
    add("--organ-fraction", type=float, help="share of queries near the organs [organ_fraction]")
    add("--seed", type=int, help="[seed]")
    add("--device", help="auto, cpu, cuda or cuda:N [device]")
    add("--threads", type=int, help="torch threads [threads]")
    add("--val-queries", type=int, help="query voxels per validation case [val_queries]")
    add("--checkpoint-every", type=int, help="steps between mid-epoch checkpoints [checkpoint_every]")
    add("--select-on", choices=sorted(SELECTION_KEYS), help="best-checkpoint metric [select_on]")
    add("--init-weights", help="checkpoint whose weights start a new run [init_weights]")
    return parser


def train_config_from_args(args: argparse.Namespace) -> TrainConfig:
    """The YAML of ``--config`` (if any) with every given flag written over its key, validated."""
    values = load_config(args.config) if args.config else {}
    for dest, key in _TRAIN_FLAG_KEYS.items():
        value = getattr(args, dest)
        if value is None:
            continue
        section, _, name = key.rpartition(".")
        target = values
        if section:
            current = target.get(section)
            if isinstance(current, str) and section == "model":
                current = ModelConfig.preset(current).to_dict()
            target[section] = target = dict(current or {})
        target[name] = value
    return TrainConfig.from_dict(values)


def train_main(argv=None) -> int:
    """Entry point of ``sconet-train`` / ``python -m SCONetLib.train`` (see :func:`build_train_parser`); returns
    the exit status (0 success, 1 error, 2 bad usage, 130 interrupted: resume with ``--resume``)."""
    import torch

    from .train_loop import Dist, Trainer, train

    argv = _strip_separator(argv)
    parser = build_train_parser()
    args = parser.parse_args(argv)
    try:
        config = train_config_from_args(args)
    except (ValueError, TypeError, OSError) as error:
        parser.print_usage(sys.stderr)
        print(f"error: {error}", file=sys.stderr)
        return USAGE
    rank = int(os.environ.get("RANK", "0"))
    _setup_train_logging(Path(config.out_dir), rank)
    command = " ".join(["python -m SCONetLib.train"] + [shlex.quote(a) for a in argv])
    logger = logging.getLogger("SCONetLib.train")
    try:
        with sigterm_as_interrupt():
            if args.preprocess_only:
                Path(config.out_dir).mkdir(parents=True, exist_ok=True)
                Trainer(config, Dist(), torch.device("cpu"), command, None).prepare_data()
                return OK
            train(config, resume=args.resume, command_line=command,
                  progress=ProgressBar.on_terminal() if rank == 0 else None)
        return OK
    except KeyboardInterrupt:
        logger.error("interrupted; resume with --resume")
        return INTERRUPTED
    except Exception as error:  # the command line reports every failure as one message and a status
        logger.error("training failed: %s: %s", type(error).__name__, error,
                     exc_info=logger.isEnabledFor(logging.DEBUG))
        return FAILED


_LOG_HANDLERS: list = []


def _setup_train_logging(out_dir: Path, rank: int) -> None:
    """Log INFO to stderr and (rank 0) to ``out_dir/train.log``; replaces the handlers of a previous call."""
    root = logging.getLogger()
    for handler in _LOG_HANDLERS:
        root.removeHandler(handler)
        handler.close()
    _LOG_HANDLERS.clear()
    root.setLevel(logging.INFO)
    fmt = logging.Formatter(f"%(asctime)s {'[rank %d] ' % rank if rank else ''}%(levelname)s %(message)s",
                            "%H:%M:%S")
    _LOG_HANDLERS.append(logging.StreamHandler(sys.stderr))
    if rank == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
        _LOG_HANDLERS.append(logging.FileHandler(out_dir / "train.log", encoding="utf-8"))
    for handler in _LOG_HANDLERS:
        handler.setFormatter(fmt)
        root.addHandler(handler)


# ============================================================================ sconet-evaluate


def build_evaluate_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m SCONetLib.evaluate",
        description="Evaluate a SCONet model on a labelled dataset: per-organ Dice, Hausdorff distance and HD95 "
                    "(see the SCONetLib.evaluate module), printed as a table and saved as CSV, JSON and a PNG "
                    "of box plots.")
    parser.add_argument("--data", required=True, type=Path, help="dataset folder")
    parser.add_argument("--weights", type=Path, help="SCONet checkpoint (default: the bundled model)")
    parser.add_argument("--split", default="test", choices=["train", "val", "test", "all"],
                        help="cases to evaluate: a split (train.lst/val.lst/test.lst, else the seeded split) or all")
    parser.add_argument("--out", type=Path, help="output folder (default: DATA/evaluation)")
    parser.add_argument("--layout", default="abdomenct1k", choices=sorted(LAYOUTS) + ["pattern"],
                        help="dataset layout (default abdomenct1k: volumes/, segmentations/)")
    parser.add_argument("--image-pattern", help="image path pattern with {id} (layout pattern)")
    parser.add_argument("--label-pattern", help="label path pattern with {id} (layout pattern)")
    parser.add_argument("--label-map", help="preset (totalsegmentator, btcv, ...) or 'src:dst,...' for the labels")
    parser.add_argument("--split-seed", type=int, default=0, help="seed of the split when there are no .lst files")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    parser.add_argument("--points", type=int, default=DEFAULT_N_POINTS,
                        help=f"input points per volume (default {DEFAULT_N_POINTS})")
    parser.add_argument("--threads", type=int, help="torch threads")
    parser.add_argument("--limit", type=int, help="evaluate only the first N cases of the split")
    parser.add_argument("--save-predictions", action="store_true", help="write OUT/predictions/<case>.nii.gz")
    parser.add_argument("--record-in", type=Path, metavar="PATH.pt",
                        help="also write a copy of the weights with this evaluation in its metadata, plus PATH.json "
                             "(how the bundled model was made)")
    return parser


def evaluate_main(argv=None) -> int:
    """Entry point of ``sconet-evaluate`` / ``python -m SCONetLib.evaluate``; returns the exit status (0 success,
    1 failure, 2 bad usage, 130 interrupted)."""
    import torch

    from .evaluate import evaluate_cases, format_table, record_in_checkpoint, write_outputs
    from .infer import Segmenter

    argv = _strip_separator(argv)
    args = build_evaluate_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    logger = logging.getLogger("SCONetLib.evaluate")
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        with sigterm_as_interrupt():
            cases, problems = find_cases(args.data, args.layout, args.image_pattern, args.label_pattern)
            if args.split != "all":
                cases = split_cases(cases, args.data, args.split_seed)[args.split]
            cases = cases[:args.limit] if args.limit else cases
            if not cases:
                raise ValueError(f"the {args.split} split of {args.data} is empty")
            out = args.out or args.data / "evaluation"
            sconet_io.check_writable_folder(out)
            sconet_io.remove_partial_outputs(out)
            segmenter = Segmenter(args.weights, device=args.device, n_points=args.points)
            result = evaluate_cases(cases, segmenter, args.label_map,
                                    out / "predictions" if args.save_predictions else None,
                                    progress=ProgressBar.on_terminal())
            result["skipped"] += problems
            settings = {"data": str(args.data.resolve()), "split": args.split, "cases": len(cases),
                        "weights": str(segmenter.weights_path), "device": str(segmenter.device),
                        "n_points": args.points, "label_map": args.label_map,
                        "torch_threads": torch.get_num_threads(),
                        "command_line": " ".join(["python -m SCONetLib.evaluate"] + argv)}
            paths = write_outputs(result, out, settings)
            if args.record_in is not None and result["summary"] is not None:
                record_in_checkpoint(segmenter.weights_path or args.weights, args.record_in, result, settings)
    except KeyboardInterrupt:
        logger.error("interrupted; no evaluation file was written")
        return INTERRUPTED
    except (OSError, ValueError, RuntimeError, CheckpointError) as error:
        logger.error("evaluation failed: %s: %s", type(error).__name__, error)
        return FAILED
    if result["summary"] is None:
        logger.error("no case could be evaluated (%d skipped)", len(result["skipped"]))
        return FAILED
    print("as the model outputs it (no post-processing, as the paper):")
    print(format_table(result["summary"]))
    print("keeping each organ's largest connected components (the default of sconet-segment and Slicer):")
    print(format_table(result["summary_postprocessed"]))
    print(f"{len(result['cases'])} case(s), {len(result['skipped'])} skipped; results in {paths['json']}")
    return OK
