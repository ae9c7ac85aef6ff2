"""Benchmark of the point stage: SimpleITK Canny vs our 3D SURF, time and peak memory. Prints JSON.

Default case: a synthetic CT of 256 × 256 × 100 voxels at 1.4 × 1.4 × 2.5 mm, descriptors at 50,000 distinct Canny
points (target: surf3d time ≤ 3 × Canny time of the same run, peak RSS ≤ 1.5 GB).
``--large``: 512 × 512 × 300 at 0.8 × 0.8 × 1.5 mm through ``extract_point_cloud`` (target: peak RSS ≤ 3 GB).
Each case runs in a fresh subprocess so that ``ru_maxrss`` is its own peak. Wall and CPU times are both given, with the
load average: on a shared machine wall times are inflated.

``--compare``: each step in each implementation, SimpleITK/NumPy against torch (``--device cpu cuda`` to add a GPU),
on the same points: times, and whether the torch results equal the others (edge voxels, descriptors).

Usage: ``python Testing/benchmarks/bench_points.py [--large] [--compare] [--device cpu [cuda]]``
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]
CASES = {
    "default": {"size": (256, 256, 100), "spacing": (1.4, 1.4, 2.5), "n_points": 50_000},
    "large": {"size": (512, 512, 300), "spacing": (0.8, 0.8, 1.5), "n_points": 50_000},
}


def synthetic_ct(size, spacing, seed=0):
    """SimpleITK int16 CT-like volume: air, body ellipse with fat rim, organ blobs, spine, noise (HU).

    Built a few slices at a time so that the benchmark's peak memory is that of the point extraction.
    """
    import SimpleITK as sitk

    rng = np.random.default_rng(seed)
    nx, ny, nz = size
    y, x = np.meshgrid(*[(np.arange(n) - (n - 1) / 2) * s for n, s in ((ny, spacing[1]), (nx, spacing[0]))],
                       indexing="ij", sparse=True)
    half_x, half_y, half_z = 0.42 * nx * spacing[0], 0.32 * ny * spacing[1], nz * spacing[2] / 2
    body = (x / half_x) ** 2 + (y / half_y) ** 2
    blobs = [(0.45, -0.1, 0.0, 0.35, 0.3, 0.5, 60.0), (-0.5, -0.05, 0.1, 0.18, 0.15, 0.25, 50.0),
             (0.3, 0.45, -0.1, 0.09, 0.1, 0.2, 160.0), (-0.3, 0.45, -0.1, 0.09, 0.1, 0.2, 160.0),
             (0.0, 0.2, 0.0, 0.06, 0.06, 0.9, 180.0), (-0.1, -0.35, 0.2, 0.2, 0.12, 0.3, -20.0)]
    spine = ((x / (0.08 * half_x)) ** 2 + ((y - 0.72 * half_y) / (0.12 * half_y)) ** 2) < 1.0
    ct = np.empty((nz, ny, nx), dtype=np.int16)
    for k in range(nz):
        z = (k - (nz - 1) / 2) * spacing[2]
        plane = np.where(body < 1.0, np.where(body < 0.85, 30.0, -100.0), -1000.0)
        for cx, cy, cz, rx, ry, rz, hu in blobs:
            inside = (((x - cx * half_x) / (rx * half_x)) ** 2 + ((y - cy * half_y) / (ry * half_y)) ** 2
                      + ((z - cz * half_z) / (rz * half_z)) ** 2) < 1.0
            plane = np.where(inside, hu, plane)
        if np.sin(z / 12.0) > -0.7:
            plane = np.where(spine, 600.0, plane)
        ct[k] = np.round(plane + rng.normal(0.0, 12.0, plane.shape))
    image = sitk.GetImageFromArray(ct)
    image.SetSpacing(spacing)
    image.SetOrigin((-(nx - 1) * spacing[0] / 2, -(ny - 1) * spacing[1] / 2, -200.0))
    image.SetDirection((-1.0, 0, 0, 0, -1.0, 0, 0, 0, 1.0))
    return image


def run_case(name: str) -> dict:
    """Run one case in this process and return its measurements."""
    import SimpleITK as sitk

    from SCONetLib.points import canny_points, extract_point_cloud, surf3d

    case = CASES[name]
    image = synthetic_ct(case["size"], case["spacing"])
    result = {"case": name, "size": case["size"], "spacing": case["spacing"],
              "sitk_threads": sitk.ProcessObject.GetGlobalDefaultNumberOfThreads(),
              "load_average_1min": os.getloadavg()[0]}
    edges, result["canny_s"], result["canny_cpu_s"] = _timed(canny_points, image)
    result["canny_points"] = len(edges)
    chosen = np.random.default_rng(0).choice(len(edges), size=min(case["n_points"], len(edges)), replace=False)
    _, result["surf3d_s"], result["surf3d_cpu_s"] = _timed(surf3d, image, edges[chosen])
    result["n_points"] = len(chosen)
    result["ratio"] = result["surf3d_s"] / result["canny_s"]
    cloud, result["extract_point_cloud_s"], _ = _timed(extract_point_cloud, image, n_points=case["n_points"])
    result["cloud_points"] = len(cloud.xyz_lps)
    result["peak_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20
    return result


def compare_case(name: str, device: str) -> dict:
    """Each step in each implementation on one device: wall and CPU seconds, and agreement of the results."""
    import torch

    from SCONetLib.points import canny_points, canny_points_torch, surf3d, surf3d_torch

    case = CASES[name]
    image = synthetic_ct(case["size"], case["spacing"])
    cuda = device.startswith("cuda")
    from bench_infer import _machine
    result = {"case": name, "size": case["size"], "spacing": case["spacing"], "device": device,
              "device_name": torch.cuda.get_device_name(torch.device(device)) if cuda else _machine()["cpu"],
              "torch_threads": torch.get_num_threads(), "load_average_1min": os.getloadavg()[0]}
    edges, result["canny_sitk_s"], result["canny_sitk_cpu_s"] = _timed(canny_points, image)
    torch_edges, result["canny_torch_s"], result["canny_torch_cpu_s"] = _timed(canny_points_torch, image,
                                                                               device=device)
    result["canny_points"] = len(edges)
    result["canny_identical"] = bool(np.array_equal(edges, torch_edges))
    chosen = edges[np.random.default_rng(0).choice(len(edges), size=min(case["n_points"], len(edges)),
                                                   replace=False)]
    descriptors, result["surf3d_numpy_s"], result["surf3d_numpy_cpu_s"] = _timed(surf3d, image, chosen)
    torch_descriptors, result["surf3d_torch_s"], result["surf3d_torch_cpu_s"] = _timed(surf3d_torch, image, chosen,
                                                                                       device=device)
    result["surf3d_points"] = len(chosen)
    result["surf3d_max_abs_difference"] = float(np.abs(descriptors - torch_descriptors).max())
    if cuda:
        result["peak_gpu_memory_gb"] = torch.cuda.max_memory_allocated(torch.device(device)) / 2 ** 30
    result["peak_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20
    return result


def _timed(function, *args, **kwargs):
    """(result, wall seconds, CPU seconds of this process) of one call."""
    wall, cpu = time.perf_counter(), time.process_time()
    result = function(*args, **kwargs)
    return result, time.perf_counter() - wall, time.process_time() - cpu


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--large", action="store_true", help="also run the 512 × 512 × 300 case")
    parser.add_argument("--compare", action="store_true", help="each step in both implementations")
    parser.add_argument("--device", nargs="+", default=["cpu"], help="devices for the torch steps (--compare)")
    parser.add_argument("--case", choices=sorted(CASES), help=argparse.SUPPRESS)  # internal: run in this process
    parser.add_argument("--on", help=argparse.SUPPRESS)                           # internal: device of --compare
    args = parser.parse_args(argv)
    if args.case:
        print(json.dumps(compare_case(args.case, args.on) if args.compare else run_case(args.case)))
        return 0
    results = []
    for name in ["default"] + (["large"] if args.large else []):
        for device in args.device if args.compare else [None]:
            extra = ["--compare", "--on", device] if args.compare else []
            done = subprocess.run([sys.executable, __file__, "--case", name] + extra, check=True,
                                  capture_output=True, encoding="utf-8", cwd=REPO,
                                  env={**os.environ, "PYTHONPATH": str(REPO)})
            results.append(json.loads(done.stdout.strip().splitlines()[-1]))
    print(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    sys.exit(main())
