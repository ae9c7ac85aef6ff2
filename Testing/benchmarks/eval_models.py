"""Accuracy of SCONet checkpoints on the three test sets the README reports; prints JSON.

1. **Real CT**: a folder of real abdominal CTs with labels (``--real DIR`` holding ``example_ct_sm.nii.gz`` and
   ``example_seg.nii.gz``, TotalSegmentator label values; default ``Testing/data/real``, else ``../shared/real``).
   Measured only: never trained on or tuned against.
2. **Held-out version-2 phantoms**: ``make_phantom(9000 + i, version=2, size=(256, 256, None), max_slices=160)``,
   seeds that no training recipe uses (training streams start at 1,000,000, validation at 5000).
3. **Held-out version-1 phantoms**: the bundled v1 model's test cases, ``make_phantom(1036 + i, size=(256, 256,
   None))`` (``Case_00037`` … of ``SCONetLib/configs/phantom_A.yaml``'s dataset).

Each case is scored as the model outputs it and after keeping each organ's largest components
(:mod:`SCONetLib.evaluate`). Usage::

    python Testing/benchmarks/eval_models.py --weights OLD.pt NEW.pt [--n-v2 20] [--n-v1 20]
        [--record-in BUNDLED.pt --recipe RECIPE.json]

``--record-in`` copies the last ``--weights`` checkpoint there with this report as ``metadata["evaluation"]``
(and the JSON file ``--recipe`` as ``metadata["recipe"]``), and writes the metadata beside it as JSON.
"""
from __future__ import annotations

import argparse
import json
import platform
import shutil
import tempfile
import time
from pathlib import Path

import torch

from SCONetLib import io as sconet_io
from SCONetLib.data import Case
from SCONetLib.evaluate import ORGAN_NAMES, evaluate_cases, record_metadata
from SCONetLib.infer import Segmenter
from SCONetLib.phantom import make_phantom

REPO = Path(__file__).resolve().parents[2]
REAL_CANDIDATES = (REPO / "Testing" / "data" / "real", REPO.parent / "shared" / "real")
V2_SEED, V1_SEED = 9000, 1036


def phantom_cases(folder: Path, seed: int, n: int, **kwargs) -> list:
    """``n`` phantoms written once into ``folder`` (reused when present) as Cases."""
    cases = []
    for i in range(n):
        image, label = folder / f"ct_{seed + i}.nii.gz", folder / f"labels_{seed + i}.nii.gz"
        if not label.exists():
            ct, labels = make_phantom(seed + i, **kwargs)
            sconet_io.write_image(ct, image)
            sconet_io.write_image(labels, label)
        cases.append(Case(f"seed_{seed + i}", image, label))
    return cases


def _table(result: dict) -> dict:
    out = {}
    for name, key in (("raw", "summary"), ("postprocessed", "summary_postprocessed")):
        summary = result[key]
        out[name] = {metric: {organ: round(summary[metric][organ]["mean"], 4) for organ in ORGAN_NAMES + ("mean",)}
                     for metric in ("dice", "hd95")}
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weights", nargs="+", default=[None], help="checkpoints (default: the bundled model)")
    parser.add_argument("--n-v2", type=int, default=20)
    parser.add_argument("--n-v1", type=int, default=20)
    parser.add_argument("--real", type=Path, default=next((p for p in REAL_CANDIDATES if p.is_dir()), None))
    parser.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "sconet_eval_models")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--record-in", type=Path, help="copy the last checkpoint here with this report recorded")
    parser.add_argument("--recipe", type=Path, help="JSON file recorded as metadata['recipe'] with --record-in")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    sets = {}
    if args.real is not None:
        real = args.cache / "real"
        real.mkdir(parents=True, exist_ok=True)
        for name in ("example_ct_sm.nii.gz", "example_seg.nii.gz"):
            shutil.copyfile(args.real / name, real / name)
        sets["real"] = ([Case("example_ct_sm", real / "example_ct_sm.nii.gz", real / "example_seg.nii.gz")],
                        "totalsegmentator")
    sets["phantoms_v2"] = (phantom_cases(args.cache / "v2", V2_SEED, args.n_v2, version=2, size=(256, 256, None),
                                         max_slices=160), None)
    sets["phantoms_v1"] = (phantom_cases(args.cache / "v1", V1_SEED, args.n_v1, size=(256, 256, None)), None)
    report = {"machine": platform.processor() or platform.machine(), "torch_threads": args.threads,
              "device": "cpu", "sets": {name: len(cases) for name, (cases, _) in sets.items()}, "models": {}}
    for weights in args.weights:
        segmenter = Segmenter(weights, device="cpu")
        name = str(segmenter.weights_path)
        report["models"][name] = {}
        for set_name, (cases, label_map) in sets.items():
            start = time.perf_counter()
            result = evaluate_cases(cases, segmenter, label_map)
            report["models"][name][set_name] = {**_table(result), "seconds": round(time.perf_counter() - start, 1),
                                                "skipped": result["skipped"]}
    print(json.dumps(report, indent=1))
    if args.record_in is not None:
        entries = {"evaluation": report}
        if args.recipe is not None:
            entries["recipe"] = json.loads(args.recipe.read_text(encoding="utf-8"))
        record_metadata(args.weights[-1], args.record_in, entries)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
