"""Benchmark of SCONetLib.phantom.make_phantom: generation time and organ volumes; prints JSON.

Usage: ``python Testing/benchmarks/bench_phantom.py [--repeats 3] [--seeds 0 1 2 3 4]``. Times are wall-clock
on the current machine (single process); organ volumes are measured on 256 × 256 × 200 phantoms at 1.5 mm slices
(300 mm coverage, so every organ is whole).
"""
from __future__ import annotations

import argparse
import json
import time

import numpy as np
import SimpleITK as sitk

from SCONetLib.labels import ORGANS
from SCONetLib.phantom import make_phantom


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    args = parser.parse_args(argv)
    times = []
    for repeat in range(args.repeats):
        start = time.perf_counter()
        make_phantom(repeat, size=(512, 512, 100))
        times.append(time.perf_counter() - start)
    volumes = {}
    for seed in args.seeds:
        _, labels = make_phantom(seed, size=(256, 256, 200), spacing=(1.6, 1.6, 1.5))
        counts = np.bincount(sitk.GetArrayViewFromImage(labels).ravel(), minlength=len(ORGANS) + 1)
        voxel_ml = float(np.prod(labels.GetSpacing())) / 1000.0
        volumes[seed] = {organ.name: round(float(counts[organ.label]) * voxel_ml, 1) for organ in ORGANS}
    print(json.dumps({"make_phantom_512x512x100_s": {"min": round(min(times), 3), "all": [round(t, 3) for t in times]},
                      "organ_volumes_ml": volumes}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
