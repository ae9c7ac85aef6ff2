"""Benchmark of the Slicer module's Output spacing slider through the worker process, on a 512 × 512 × 100 CT;
prints JSON.

The module (SCONetSegmentation/SCONetSegmentation.py) runs against the Slicer stand-in (Testing/slicer_stub) with
the real worker (``python -m SCONetLib.worker``, bundled model, CPU) over the stand-in's ``QProcess``. A phantom
CT of 512 × 512 × 100 voxels at 0.8 × 0.8 × 2.5 mm is segmented once (the worker starts, loads the model, runs the
point stage and the encoder, decodes); then the output spacing is changed as the slider does: each change sends a
decode-only request to the live worker and writes the new segments (with closed surfaces, as the GUI does). A
change is timed from ``startProcessing`` to the completion callback, including the 50 ms poll timer, reading the
labels back, cropping and the MRML writes; ``worker_s`` is the decode inside the worker (the engine's own time),
``overhead_s`` the rest (process round trip, array files, polling, crops and MRML writes) and ``write_s`` the
part of it spent writing MRML.

Usage: ``python Testing/benchmarks/bench_slider.py [--spacings 2 3 1.5 1.2] [--repeats 2]``. The JSON records the
load average: on a shared machine wall times are inflated.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
for path in (REPO, REPO / "Testing" / "slicer_stub", REPO / "SCONetSegmentation"):
    sys.path.insert(0, str(path))

import qt  # noqa: E402  (the stand-in)
import SimpleITK as sitk  # noqa: E402
import slicer  # noqa: E402  (the stand-in)

import SCONetSegmentation as module  # noqa: E402
from SCONetLib.geometry import Grid  # noqa: E402
from SCONetLib.phantom import make_phantom  # noqa: E402

SIZE = (512, 512, 100)
SPACING = (0.8, 0.8, 2.5)


def run(logic, volume, segmentation, spacing):
    """(seconds from startProcessing to the completion callback, seconds in the worker, seconds writing MRML,
    job)."""
    done, writing = [], [0.0]
    apply = logic._apply

    def timed_apply(*args):
        start = time.perf_counter()
        try:
            return apply(*args)
        finally:
            writing[0] += time.perf_counter() - start

    logic._apply = timed_apply
    start = time.perf_counter()
    logic.startProcessing(volume, segmentation, spacing=spacing, device="cpu", completedCallback=done.append)
    while not done:
        qt._idle(0.005)
        slicer.app.processEvents()
    seconds = time.perf_counter() - start
    logic._apply = apply
    job = done[0]
    if job.error is not None:
        raise job.error
    return seconds, job.request.result["seconds"], writing[0], job


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spacings", type=float, nargs="+", default=[2.0, 3.0, 1.5, 1.2])
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args(argv)
    load_before = os.getloadavg()
    ct, _labels = make_phantom(0, size=SIZE, spacing=SPACING)
    volume = slicer.util.addVolumeFromArray(sitk.GetArrayFromImage(ct), ijkToRAS=Grid.of(ct).ijk_to_ras, name="CT")
    logic = module.SCONetSegmentationLogic()
    try:
        first, first_worker, first_write, job = run(logic, volume, None, None)
        segmentation = job.outputs.segmentation
        changes = {}
        for spacing in args.spacings:
            times = [run(logic, volume, segmentation, spacing)[:3] for _ in range(args.repeats)]
            voxels = Grid.of(ct).with_spacing(spacing).voxel_count()
            changes[f"{spacing:g} mm"] = {"output_voxels": voxels,
                                          "seconds": [round(t, 3) for t, _, _ in times],
                                          "worker_s": [round(w, 3) for _, w, _ in times],
                                          "overhead_s": [round(t - w, 3) for t, w, _ in times],
                                          "write_s": [round(m, 3) for _, _, m in times],
                                          "min_s": round(min(t for t, _, _ in times), 3)}
        calls = logic.client().call("stats")["calls"]
    finally:
        logic.shutdown()
    print(json.dumps({
        "benchmark": "Output spacing slider through the worker (stand-in Slicer, bundled model)",
        "ct": {"size": SIZE, "spacing_mm": SPACING},
        "machine": {"platform": platform.platform(), "processor": platform.processor(), "cpus": os.cpu_count(),
                    "python": platform.python_version()},
        "device": "cpu",
        "load_average_before": [round(x, 2) for x in load_before],
        "load_average_after": [round(x, 2) for x in os.getloadavg()],
        "first_run_s": round(first, 3), "first_run_worker_s": round(first_worker, 3),
        "first_run_write_s": round(first_write, 3),
        "slider_changes": changes,
        "worker_calls": {name: calls.count(name) for name in sorted(set(calls))},
    }, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
