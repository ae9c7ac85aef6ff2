"""Benchmark of SCONet inference (SCONetLib.infer) on phantom CTs of clinical size; prints JSON.

For each slice count (default 100 and 300) a 512 × 512 × N phantom at 0.8 × 0.8 × 2.5 mm is written to a cache
folder once, then a fresh worker process reads it and times: loading the model, reading the CT, ``prepare``
(points + encoding), ``segment()`` (coarse to fine, input grid), re-segmenting the same box at other spacings,
and optionally the dense decode with its agreement. Each worker reports its peak resident memory (``ru_maxrss``,
which includes the interpreter, torch and the CT), so the cases do not pollute each other.

Usage::

    python Testing/benchmarks/bench_infer.py [--weights W] [--slices 100 300] [--dense] [--device cpu]

Without ``--weights`` the bundled model is used if present, else a seeded random SCONet. A random model has
noisy boundaries everywhere, so its coarse-to-fine figures are pessimistic; the JSON says which model ran.
"""
from __future__ import annotations

import argparse
import json
import logging
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SPACING = (0.8, 0.8, 2.5)
RESEGMENT_SPACINGS = ((1.6, 1.6, 2.5), (1.0, 1.0, 1.0), (2.0, 2.0, 2.0))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weights", help="SCONet checkpoint (default: bundled model, else a random one)")
    parser.add_argument("--slices", type=int, nargs="+", default=[100, 300])
    parser.add_argument("--dense", action="store_true", help="also time the dense decode and measure agreement")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--cache", default=str(Path(tempfile.gettempdir()) / "sconet_bench_infer"))
    parser.add_argument("--worker", type=int, help=argparse.SUPPRESS)   # slice count, run in a child process
    args = parser.parse_args(argv)
    cache = Path(args.cache)
    cache.mkdir(parents=True, exist_ok=True)
    if args.worker is not None:
        print(json.dumps(_run_case(args.worker, Path(args.weights), args.device, args.dense, cache)))
        return 0
    weights, model_kind = _weights(args.weights, cache)
    results = {"model": model_kind, "weights": str(weights), "device": args.device, "spacing_mm": SPACING,
               "cases": []}
    for slices in args.slices:
        _phantom_file(slices, cache)
        command = [sys.executable, __file__, "--worker", str(slices), "--weights", str(weights), "--device",
                   args.device, "--cache", str(cache)] + (["--dense"] if args.dense else [])
        done = subprocess.run(command, capture_output=True, encoding="utf-8", check=True)
        results["cases"].append(json.loads(done.stdout.strip().splitlines()[-1]))
    print(json.dumps(results, indent=2))
    return 0


def _weights(path, cache: Path) -> tuple[Path, str]:
    from SCONetLib.checkpoint import default_weights_path
    if path is not None:
        return Path(path), "given checkpoint"
    bundled = default_weights_path(must_exist=False)
    if bundled.is_file():
        return bundled, "bundled"
    import torch
    from SCONetLib.checkpoint import save_checkpoint
    from SCONetLib.model import SCONet
    torch.manual_seed(0)
    return save_checkpoint(cache / "random_A.pt", SCONet()), "random (bundled model absent; pessimistic)"


def _phantom_file(slices: int, cache: Path) -> Path:
    path = cache / f"phantom_512x512x{slices}.nii.gz"
    if not path.is_file():
        from SCONetLib.io import write_image
        from SCONetLib.phantom import make_phantom
        ct, _ = make_phantom(11, size=(512, 512, slices), spacing=SPACING, random_orientation=False)
        write_image(ct, path)
    return path


def _run_case(slices: int, weights: Path, device: str, dense: bool, cache: Path) -> dict:
    import numpy as np
    import SimpleITK as sitk
    from SCONetLib import infer
    from SCONetLib.infer import Segmenter
    from SCONetLib.io import read_image

    evaluated = []
    handler = _CountingHandler(evaluated)
    logging.getLogger(infer.__name__).addHandler(handler)
    logging.getLogger(infer.__name__).setLevel(logging.INFO)
    case = {"size": [512, 512, slices]}
    t = time.perf_counter()
    segmenter = Segmenter(weights=weights, device=device)
    case["load_model_s"] = time.perf_counter() - t
    start = time.perf_counter()
    image = read_image(_phantom_file(slices, cache))
    case["read_s"] = time.perf_counter() - start
    t = time.perf_counter()
    segmenter.prepare(image)
    case["prepare_s"] = time.perf_counter() - t
    t = time.perf_counter()
    labels = segmenter.segment()
    case["segment_s"] = time.perf_counter() - t
    case["end_to_end_s"] = time.perf_counter() - start
    case["segment_evaluated_fraction"] = evaluated[-1] if evaluated else None
    case["label_fractions"] = (np.bincount(sitk.GetArrayViewFromImage(labels).ravel(), minlength=5)
                               / np.prod(labels.GetSize())).round(4).tolist()
    case["resegment"] = []
    for spacing in RESEGMENT_SPACINGS:
        t = time.perf_counter()
        other = segmenter.segment(spacing)
        case["resegment"].append({"spacing_mm": spacing, "size": list(other.GetSize()),
                                  "seconds": round(time.perf_counter() - t, 3),
                                  "evaluated_fraction": evaluated[-1] if evaluated else None})
    if dense:
        t = time.perf_counter()
        exact = segmenter.segment(dense=True)
        case["dense_segment_s"] = time.perf_counter() - t
        case["coarse_to_fine_agreement"] = float(np.mean(sitk.GetArrayViewFromImage(exact)
                                                         == sitk.GetArrayViewFromImage(labels)))
    case["peak_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 2**30
    return {key: (round(value, 3) if isinstance(value, float) else value) for key, value in case.items()}


class _CountingHandler(logging.Handler):
    """Catches the ``coarse-to-fine decoding evaluated A of B voxels`` log line and stores A / B."""

    def __init__(self, sink: list):
        super().__init__()
        self.sink = sink

    def emit(self, record):
        if record.getMessage().startswith("coarse-to-fine decoding evaluated"):
            evaluated, total = record.args[0], record.args[1]
            self.sink.append(round(evaluated / total, 4))


if __name__ == "__main__":
    sys.exit(main())
