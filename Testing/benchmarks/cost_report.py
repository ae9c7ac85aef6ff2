"""Cost of the SCONet network: parameters, multiply-accumulates and CPU wall time. Prints one JSON document.

Usage::

    python Testing/benchmarks/cost_report.py [--chunk 100000] [--timed-chunks 10] [--full-decode]

Conventions
-----------
* MACs are counted from the layer shapes seen in a real forward pass (forward hooks on every ``Linear`` and
  ``Conv3d``): ``output elements × input features`` (× kernel volume for convolutions). 1 MAC = 1 "flop" in
  the reference's fvcore convention; the 2-ops-per-MAC FLOP figure is twice that.
* "other ops" follow fvcore's handles: GroupNorm 5 operations per element (with affine), nearest upsampling 1 per
  output element, trilinear ``grid_sample`` 4 per output value (128 per query, as the reference reports).
  ReLU, additions, max pooling and the scatter operations are not counted.
* Timings use torch's default thread count, random inputs (coordinates within ±0.45, SURF-like values
  ~N(0, 1000²)), one warm-up call, then the median of several calls. On a shared machine they are inflated by
  other processes' load.
"""
from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from SCONetLib.model import build_model  # noqa: E402

N_POINTS = 50_000
VOLUME_QUERIES = 256 * 256 * 100
REFERENCE = {"encoder_macs_A": 15.33e9, "encoder_macs_B": 113.11e9, "decoder_macs_6553600": 104.7e9,
             "paper_total_gflops_A": 120}


def count_parameters(model) -> dict:
    """Parameters of the whole network and of its parts."""
    def size(module):
        return sum(p.numel() for p in module.parameters())
    return {"total": size(model), "encoder": size(model.encoder), "unet3d": size(model.encoder.unet3d),
            "pointnet": size(model.encoder) - size(model.encoder.unet3d), "decoder": size(model.decoder),
            "decoder_fc_p_unused": size(model.decoder.fc_p), "effective": size(model) - size(model.decoder.fc_p)}


def count_macs(module: nn.Module, run) -> dict:
    """MACs of conv/linear layers and fvcore-style other operations during ``run()`` (see module docstring)."""
    totals = {"conv_linear": 0, "other": 0}

    def hook(layer, args, output):
        if isinstance(layer, nn.Linear):
            totals["conv_linear"] += output.numel() * layer.in_features
        elif isinstance(layer, nn.Conv3d):
            kernel = layer.kernel_size[0] * layer.kernel_size[1] * layer.kernel_size[2]
            totals["conv_linear"] += output.numel() * layer.in_channels // layer.groups * kernel
        elif isinstance(layer, nn.GroupNorm):
            totals["other"] += 5 * output.numel()

    handles = [m.register_forward_hook(hook) for m in module.modules()
               if isinstance(m, (nn.Linear, nn.Conv3d, nn.GroupNorm))]
    original_interpolate, original_grid_sample = nn.functional.interpolate, nn.functional.grid_sample

    def counted(function, per_element):
        def wrapper(*args, **kwargs):
            output = function(*args, **kwargs)
            totals["other"] += per_element * output.numel()
            return output
        return wrapper

    nn.functional.interpolate = counted(original_interpolate, 1)
    nn.functional.grid_sample = counted(original_grid_sample, 4)
    try:
        with torch.inference_mode():
            run()
    finally:
        nn.functional.interpolate, nn.functional.grid_sample = original_interpolate, original_grid_sample
        for handle in handles:
            handle.remove()
    totals["total"] = totals["conv_linear"] + totals["other"]
    return totals


def random_points(n: int, seed: int = 0) -> torch.Tensor:
    """(1, n, 51) float32: coordinates within ±0.45, 48 SURF-like values ~N(0, 1000²)."""
    gen = torch.Generator().manual_seed(seed)
    xyz = (torch.rand(1, n, 3, generator=gen) - 0.5) * 0.9
    return torch.cat([xyz, torch.randn(1, n, 48, generator=gen) * 1000.0], dim=2)


def median_time(function, repeats: int) -> tuple[float, float]:
    """(first call, median of ``repeats`` further calls) in seconds."""
    times = []
    for _ in range(repeats + 1):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return times[0], statistics.median(times[1:])


def giga(macs: float) -> dict:
    return {"GMAC": round(macs / 1e9, 3), "GFLOP_2_per_MAC": round(2 * macs / 1e9, 3)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--chunk", type=int, default=100_000, help="queries per decode call (reference 100,000)")
    parser.add_argument("--timed-chunks", type=int, default=10, help="chunks timed when extrapolating")
    parser.add_argument("--full-decode", action="store_true", help="time all chunks instead of extrapolating")
    parser.add_argument("--repeats", type=int, default=5, help="timed encode calls for preset A (B: 3)")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    points = random_points(N_POINTS)
    report = {"torch": torch.__version__, "threads": torch.get_num_threads(), "n_points": N_POINTS,
              "mac_convention": "1 MAC = 1 flop (reference/fvcore); GFLOP_2_per_MAC doubles it",
              "reference": REFERENCE, "presets": {}}
    for preset, repeats in (("A", args.repeats), ("B", max(1, args.repeats - 2))):
        model = build_model(preset).eval()
        queries = torch.rand(1, 10_000, 3) - 0.5
        with torch.inference_mode():
            grid = model.encode(points)
        encoder_macs = count_macs(model, lambda: model.encode(points))
        decoder_macs = count_macs(model, lambda: model.decode(queries, grid))
        per_query = {k: v / queries.shape[1] for k, v in decoder_macs.items()}
        with torch.inference_mode():
            first, median = median_time(lambda: model.encode(points), repeats)
        report["presets"][preset] = {
            "grid_resolution": model.config.grid_resolution,
            "parameters": count_parameters(model),
            "encoder_50k_points": {"conv_linear": giga(encoder_macs["conv_linear"]),
                                   "with_other_ops": giga(encoder_macs["total"])},
            "decoder_per_query_MAC": {k: round(v, 1) for k, v in per_query.items()},
            "decoder_6553600_queries": {"conv_linear": giga(per_query["conv_linear"] * VOLUME_QUERIES),
                                        "with_other_ops": giga(per_query["total"] * VOLUME_QUERIES)},
            "encode_plus_volume_decode": giga(encoder_macs["total"] + per_query["total"] * VOLUME_QUERIES),
            "encode_seconds": {"first_call": round(first, 3), "median": round(median, 3), "calls": repeats},
        }
        if preset == "A":
            report["presets"][preset]["decode_6553600_queries"] = time_decode(model, grid, args)
    report["peak_rss_GB"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 ** 2, 3)
    print(json.dumps(report, indent=2))
    return 0


def time_decode(model, grid, args) -> dict:
    """Wall time of decoding 256·256·100 queries in chunks, measured in full or extrapolated from some chunks."""
    n_chunks = -(-VOLUME_QUERIES // args.chunk)
    timed = n_chunks if args.full_decode else min(args.timed_chunks, n_chunks)
    gen = torch.Generator().manual_seed(1)
    chunks = [torch.rand(1, min(args.chunk, VOLUME_QUERIES - i * args.chunk), 3, generator=gen) - 0.5
              for i in range(timed)]
    with torch.inference_mode():
        model.decode(chunks[0], grid)  # warm-up
        start = time.perf_counter()
        for chunk in chunks:
            model.decode(chunk, grid)
        elapsed = time.perf_counter() - start
    queries_timed = min(timed * args.chunk, VOLUME_QUERIES)
    return {"chunk": args.chunk, "chunks": n_chunks, "chunks_timed": timed,
            "seconds_timed": round(elapsed, 3),
            "seconds_for_all": round(elapsed * VOLUME_QUERIES / queries_timed, 3),
            "extrapolated": timed < n_chunks}


if __name__ == "__main__":
    raise SystemExit(main())
