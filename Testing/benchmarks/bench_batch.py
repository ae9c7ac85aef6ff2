"""Benchmark of batch segmentation (``sconet-segment FOLDER``, SCONetLib.batch) on phantom CTs; prints JSON.

Writes ``--cases`` phantoms (default 20, 256 × 256 in-plane, random spacing, slice count and orientation, as the
demo's) to a cache folder once, then segments the folder with the real command line into a fresh output folder,
as one process or as ``--ranks`` torchrun processes, and reports throughput (CTs per hour of wall time, per rank
and together), the per-case times of the batch summaries, the machine and its load average.

Usage::

    python Testing/benchmarks/bench_batch.py [--cases 20] [--device cpu] [--ranks 1]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=20)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--ranks", type=int, default=1, help="processes under torchrun (one per GPU, or CPU ranks)")
    parser.add_argument("--cache", default=str(Path(tempfile.gettempdir()) / "sconet_bench_batch"))
    args = parser.parse_args(argv)
    from bench_infer import _machine

    cases = _phantoms(args.cases, Path(args.cache) / "cts")
    out = Path(args.cache) / "out"
    shutil.rmtree(out, ignore_errors=True)
    command = ["-m", "SCONetLib", str(cases), "-o", str(out), "--device", args.device]
    if args.ranks > 1:
        command = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.ranks}"] + command
    machine = _machine()
    start = time.perf_counter()
    done = subprocess.run([sys.executable] + command, capture_output=True, encoding="utf-8", cwd=REPO,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    wall = time.perf_counter() - start
    summaries = [json.loads(p.read_text(encoding="utf-8")) for p in sorted(out.glob("sconet_batch*.json"))]
    segmented = sum(s["done"] for s in summaries)
    result = {"machine": machine, "device": args.device, "ranks": args.ranks, "cases": args.cases,
              "exit_status": done.returncode, "segmented": segmented,
              "failed": sum(s["failed"] for s in summaries),
              "wall_s_including_start": round(wall, 2),
              "cts_per_hour_including_start": round(3600 * segmented / wall, 1),
              "cts_per_hour_per_rank": [s["cts_per_hour"] for s in summaries],
              "load_average_after": [round(x, 2) for x in os.getloadavg()],
              "per_case": [{key: case.get(key) for key in ("input", "status", "read_s", "prepare_s", "segment_s",
                                                          "write_s", "total_s")}
                           for s in summaries for case in s["cases"]]}
    print(json.dumps(result, indent=1))
    return 0 if done.returncode == 0 else 1


def _phantoms(count: int, folder: Path) -> Path:
    """``folder`` holding ``count`` phantom CTs (``case_XXX.nii.gz``), written once."""
    from SCONetLib.io import write_image
    from SCONetLib.phantom import make_phantom

    folder.mkdir(parents=True, exist_ok=True)
    for seed in range(count):
        path = folder / f"case_{seed:03d}.nii.gz"
        if not path.is_file():
            ct, _ = make_phantom(1000 + seed)
            write_image(ct, path)
    for extra in sorted(folder.glob("case_*.nii.gz"))[count:]:
        extra.unlink()
    return folder


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    sys.exit(main())
