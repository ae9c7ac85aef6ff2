"""Benchmark of SCONet inference (SCONetLib.infer) on phantom CTs of clinical size, per device and implementation; JSON.

For each slice count (default 100) a 512 × 512 × N phantom at 0.8 × 0.8 × 2.5 mm is written to a cache folder once.
Then, for each device and point-stage implementation asked for, a fresh worker process reads it and times:

* end to end: reading the CT, ``prepare`` (point stage + encoding) and ``segment()`` (coarse to fine, input grid);
* the per-stage breakdown, run again after it: Canny, 3D SURF, encoding, and the decoding of ``segment()``;
* re-segmenting the same box at other spacings from the cached feature grid;
* optionally the dense decode and its agreement with coarse to fine (``--dense``).

Each worker reports its peak resident memory (``ru_maxrss``: interpreter, torch and the CT included) and, on CUDA,
the peak GPU memory; the JSON names the CPU, the GPU, torch's thread count and the load average (on a shared
machine wall times are inflated: compare runs made at the same load, or on an idle machine).

Usage::

    python Testing/benchmarks/bench_infer.py                       # CPU, the implementation "auto" chooses
    python Testing/benchmarks/bench_infer.py --implementation numpy torch --device cpu cuda
    python Testing/benchmarks/bench_infer.py --slices 100 300 --precision bfloat16 --dense

Without ``--weights`` the bundled model is used if present, else a seeded random SCONet (its noisy boundaries make
the coarse-to-fine figures pessimistic; the JSON says which model ran).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SPACING = (0.8, 0.8, 2.5)
RESEGMENT_SPACINGS = ((1.6, 1.6, 2.5), (1.0, 1.0, 1.0), (2.0, 2.0, 2.0))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weights", help="SCONet checkpoint (default: bundled model, else a random one)")
    parser.add_argument("--slices", type=int, nargs="+", default=[100])
    parser.add_argument("--device", nargs="+", default=["cpu"], help="one or more of cpu, cuda, cuda:N")
    parser.add_argument("--implementation", nargs="+", default=["auto"], choices=["auto", "numpy", "torch"],
                        help="point-stage implementation(s) to compare")
    parser.add_argument("--precision", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--dense", action="store_true", help="also time the dense decode and measure agreement")
    parser.add_argument("--repeat", type=int, default=1, help="runs per case (fresh process each); all reported")
    parser.add_argument("--cache", default=str(Path(tempfile.gettempdir()) / "sconet_bench_infer"))
    parser.add_argument("--worker", help=argparse.SUPPRESS)        # JSON case description, run in this process
    args = parser.parse_args(argv)
    cache = Path(args.cache)
    cache.mkdir(parents=True, exist_ok=True)
    if args.worker is not None:
        print(json.dumps(_run_case(json.loads(args.worker), cache)))
        return 0
    weights, model_kind = _weights(args.weights, cache)
    results = {"model": model_kind, "weights": str(weights), "spacing_mm": SPACING, "machine": _machine(),
               "precision": args.precision, "cases": []}
    for slices in args.slices:
        _phantom_file(slices, cache)
        for device in args.device:
            for implementation in args.implementation:
                for _ in range(args.repeat):
                    case = {"slices": slices, "device": device, "implementation": implementation,
                            "precision": args.precision, "weights": str(weights), "dense": args.dense}
                    command = [sys.executable, __file__, "--worker", json.dumps(case), "--cache", str(cache)]
                    done = subprocess.run(command, capture_output=True, encoding="utf-8", cwd=REPO,
                                          env={**os.environ, "PYTHONPATH": str(REPO)})
                    if done.returncode != 0:
                        results["cases"].append({**case, "error": done.stderr.strip().splitlines()[-1:]})
                        continue
                    results["cases"].append(json.loads(done.stdout.strip().splitlines()[-1]))
    print(json.dumps(results, indent=2))
    return 0


def _machine() -> dict:
    """What ran the benchmark: CPU, core count, GPUs, torch version and threads, load average."""
    import torch
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as info:
            cpu = next(line.split(":", 1)[1].strip() for line in info if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
            "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
            "load_average_1_5_15min": [round(x, 2) for x in os.getloadavg()]}


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


def _run_case(case: dict, cache: Path) -> dict:
    import numpy as np
    import SimpleITK as sitk
    import torch
    from SCONetLib import infer
    from SCONetLib.infer import Segmenter
    from SCONetLib.io import read_image

    evaluated = []
    logging.getLogger(infer.__name__).addHandler(_CountingHandler(evaluated))
    logging.getLogger(infer.__name__).setLevel(logging.INFO)
    cuda = case["device"].startswith("cuda")
    out = {**case, "size": [512, 512, case["slices"]], "load_average_1min": round(os.getloadavg()[0], 2),
           "torch_threads": torch.get_num_threads()}
    out["device_name"] = torch.cuda.get_device_name(torch.device(case["device"])) if cuda else _machine()["cpu"]
    t = time.perf_counter()
    segmenter = Segmenter(weights=case["weights"], device=case["device"], precision=case["precision"],
                          implementation=case["implementation"])
    out["load_model_s"] = time.perf_counter() - t
    path = _phantom_file(case["slices"], cache)
    start = time.perf_counter()
    image = read_image(path)
    out["read_s"] = time.perf_counter() - start
    t = time.perf_counter()
    segmenter.prepare(image)
    _sync(cuda)
    out["prepare_s"] = time.perf_counter() - t
    t = time.perf_counter()
    labels = segmenter.segment()
    out["segment_s"] = time.perf_counter() - t
    out["end_to_end_s"] = time.perf_counter() - start
    out["segment_evaluated_fraction"] = evaluated[-1] if evaluated else None
    out["label_fractions"] = (np.bincount(sitk.GetArrayViewFromImage(labels).ravel(), minlength=5)
                              / np.prod(labels.GetSize())).round(4).tolist()
    out["stages_s"] = _stages(segmenter, image, cuda)
    out["resegment"] = []
    for spacing in RESEGMENT_SPACINGS:
        t = time.perf_counter()
        other = segmenter.segment(spacing)
        out["resegment"].append({"spacing_mm": spacing, "size": list(other.GetSize()),
                                 "seconds": round(time.perf_counter() - t, 3),
                                 "evaluated_fraction": evaluated[-1] if evaluated else None})
    if case["dense"]:
        t = time.perf_counter()
        exact = segmenter.segment(dense=True)
        out["dense_segment_s"] = time.perf_counter() - t
        out["coarse_to_fine_agreement"] = float(np.mean(sitk.GetArrayViewFromImage(exact)
                                                        == sitk.GetArrayViewFromImage(labels)))
    out["peak_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 2**30
    if cuda:
        out["peak_gpu_memory_gb"] = torch.cuda.max_memory_allocated(torch.device(case["device"])) / 2**30
    return {key: (round(value, 3) if isinstance(value, float) else value) for key, value in out.items()}


def _stages(segmenter, image, cuda: bool) -> dict:
    """Seconds of each stage of ``prepare`` + ``segment()``, run one by one with the segmenter's choices."""
    import numpy as np
    import torch
    from SCONetLib.points.canny import _canny_points
    from SCONetLib.points.canny_torch import _canny_points_torch
    from SCONetLib.points.cloud import DEFAULT_SCALE_MM, PointCloud, choose_implementations
    from SCONetLib.points.surf import _surf3d
    from SCONetLib.points.surf3d_torch import _surf3d_torch

    steps = choose_implementations(segmenter.implementation, segmenter.device)
    stages = {"implementations": steps}
    t = time.perf_counter()
    edges = (_canny_points_torch(image, segmenter.device) if steps["canny"] == "torch" else _canny_points(image))
    stages["canny"] = time.perf_counter() - t
    drawn = np.random.default_rng(segmenter.seed).integers(0, len(edges), size=segmenter.n_points)
    unique, inverse = np.unique(drawn, return_inverse=True)
    t = time.perf_counter()
    surf = (_surf3d_torch(image, edges[unique], DEFAULT_SCALE_MM, segmenter.device, None)
            if steps["surf3d"] == "torch" else _surf3d(image, edges[unique], DEFAULT_SCALE_MM, None))
    stages["surf3d"] = time.perf_counter() - t
    cloud = PointCloud.from_descriptors(edges[drawn], surf[inverse.reshape(-1)])
    t = time.perf_counter()
    points = torch.from_numpy(cloud.model_input(segmenter.frame)).to(segmenter.device)
    with torch.inference_mode():
        segmenter.model.encode(points[None])
    _sync(cuda)
    stages["encode"] = time.perf_counter() - t
    t = time.perf_counter()
    segmenter.segment()
    stages["segment"] = time.perf_counter() - t
    return {key: (round(value, 3) if isinstance(value, float) else value) for key, value in stages.items()}


def _sync(cuda: bool) -> None:
    if cuda:
        import torch
        torch.cuda.synchronize()


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
    sys.path.insert(0, str(REPO))
    sys.exit(main())
