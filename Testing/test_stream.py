"""Tests of the on-the-fly phantom stream (SCONetLib.data.PhantomStream) and of training on it: seeded and
reproducible, distinct phantoms per epoch, reuse, the record in the checkpoint, and exact resume."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from SCONetLib.checkpoint import load_checkpoint
from SCONetLib.data import DataConfig, PhantomStream, stream_phantom_draw
from SCONetLib.train import TrainConfig, train

#: Tiny phantoms: 48–64 voxels in plane, at most 16 slices, 3,000 SURF points (about a second each).
TINY = {"seed": 42, "per_epoch": 2, "reuse": 2, "size": [48, 64], "max_slices": 16, "surf_points": 3000,
        "v1_fraction": 0.5}


def _arrays(case):
    return case.labels, case.cloud.xyz_lps, case.cloud.surf_int8


@pytest.mark.slow  # long: runs in .ci/run's second pass, not in the default suite
def test_stream_is_seeded_distinct_per_epoch_and_reused_within_it():
    with PhantomStream(TINY, 400.0, workers=1) as first, PhantomStream(TINY, 400.0, workers=1) as second:
        first.set_epoch(1)
        second.set_epoch(1)
        for index in range(len(first)):
            for a, b in zip(_arrays(first[index]), _arrays(second[index])):
                np.testing.assert_array_equal(a, b)
        assert len(first) == 4
        assert first[0] is first[2] and first[1] is first[3]  # each phantom used `reuse` times
        assert {first[i].case_id for i in range(4)} == {"stream_0000002", "stream_0000003"}
        first.set_epoch(2)
        assert first[0].case_id == "stream_0000004"
        assert first.throughput["phantoms"] == 3 and first.throughput["phantoms_per_s"] > 0
        record = first.describe(epochs_done=3)
        assert record["phantoms_seen"] == 6 and record["seed_range"] == [42, 47] and record["version"] == 2


def test_stream_draws_sizes_and_versions_in_their_ranges():
    draws = [stream_phantom_draw({**TINY, "aspect": [0.75, 1.0], "version": 2}, k) for k in range(200)]
    assert all(48 <= nx <= 64 and 0.74 * nx <= ny <= nx and nz is None for (nx, ny, nz), _, _ in draws)
    assert [seed for _, seed, _ in draws] == list(range(42, 242))
    share_v1 = np.mean([version == 1 for _, _, version in draws])
    assert 0.4 < share_v1 < 0.6


@pytest.mark.parametrize("section, match", [({"per_epoch": 0}, "per_epoch must be an integer >= 1"),
                                            ({"size": [64, 32]}, "size must be"),
                                            ({"version": 3}, "version must be 1 or 2"),
                                            ({"bogus": 1}, "unknown data.stream keys")])
def test_stream_section_errors(section, match):
    with pytest.raises(ValueError, match=match):
        DataConfig.from_dict({"source": "phantom", "phantom": {"n_train": 0, "n_val": 1}, "stream": section})


def _config(out: Path, cache: Path, epochs: int) -> TrainConfig:
    return TrainConfig.from_dict({
        "out_dir": str(out), "epochs": epochs, "model": {"grid_resolution": 8}, "n_points": 1000,
        "n_queries": 1000, "val_queries": 2000, "threads": 1, "checkpoint_every": 100, "tensorboard": False,
        "data": {"source": "phantom", "cache_dir": str(cache), "workers": 1, "stream": TINY,
                 "phantom": {"n_train": 0, "n_val": 1, "n_test": 0, "seed": 7, "size": [48, 48, 12],
                             "spacing": [6.0, 6.0, 8.0], "version": 2}}})


@pytest.mark.slow  # long: runs in .ci/run's second pass, not in the default suite
def test_training_on_the_stream_resumes_exactly_and_records_it(tmp_path):
    cache = tmp_path / "cache"
    straight = train(_config(tmp_path / "straight", cache, epochs=2))
    train(_config(tmp_path / "split", cache, epochs=1))
    resumed = train(_config(tmp_path / "split", cache, epochs=2), resume=True)
    assert straight["global_step"] == resumed["global_step"] == 8
    a, meta = load_checkpoint(tmp_path / "straight" / "model_last.pt")
    b, _ = load_checkpoint(tmp_path / "split" / "model_last.pt")
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(x, y), name
    record = meta["training_stream"]
    assert record["phantoms_seen"] == 4 and record["seed_range"] == [42, 45] and record["version"] == 2
