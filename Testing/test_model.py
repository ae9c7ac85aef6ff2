"""Tests of SCONetLib.model: golden-vector parity with the reference network, quirks, batching, chunking, errors."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from SCONetLib.model import (MODEL_PRESETS, SCONet, ModelConfig, build_model, cell_index, load_reference_state_dict,
                             normalize_to_unit_cube)

GOLDEN = Path(__file__).resolve().parent / "data" / "golden" / "sconet_forward_A.npz"


@pytest.fixture(scope="module")
def golden():
    with np.load(GOLDEN) as data:
        return {key: data[key] for key in data.files}


def _reference_params(golden):
    return {key[len("param/"):]: value for key, value in golden.items() if key.startswith("param/")}


@pytest.fixture(scope="module")
def golden_model(golden):
    model = SCONet(32)
    load_reference_state_dict(model, _reference_params(golden))
    return model.eval()


@pytest.fixture(scope="module")
def run(golden, golden_model):
    """Every intermediate of one forward pass on the golden inputs, as numpy arrays."""
    points = torch.from_numpy(golden["input/points"])
    queries = torch.from_numpy(golden["input/queries"])
    encoder = golden_model.encoder
    with torch.inference_mode():
        index = encoder.cell_index(points)
        features = encoder.point_features(points)
        sparse = encoder.scatter_to_grid(torch.cat([features, points[..., 3:]], dim=2), index)
        grid = golden_model.encode(points)
        sampled = golden_model.decoder.sample_features(queries[:, :1024], grid)
        logits = golden_model.decode(queries, grid)
    flat = grid[0].double().reshape(grid.shape[1], -1)
    stats = torch.stack([flat.mean(1), flat.std(1, unbiased=False), flat.min(1).values, flat.max(1).values], 1)
    return {
        "output/logits": logits.numpy(),
        "enc/point_features": features.numpy(),
        "enc/cell_index": index[0].numpy(),
        "enc/occupied_cells": np.unique(index[0].numpy()),
        "unet_input": sparse.reshape(1, sparse.shape[1], -1)[0].numpy(),
        "enc/grid_even": grid[:, :, ::2, ::2, ::2].numpy(),
        "enc/grid_slice_d16": grid[0, :, 16].numpy(),
        "enc/grid_channel_stats": stats.numpy(),
        "dec/sampled_features_first1024": sampled.numpy(),
        "grid": grid,
    }


# ---------------------------------------------------------------------------------------------- golden parity

@pytest.mark.parametrize("key, tolerance", [
    ("output/logits", 1e-5),
    ("enc/point_features", 1e-6),
    ("enc/grid_even", 2e-5),
    ("enc/grid_slice_d16", 2e-5),
    ("enc/grid_channel_stats", 2e-5),
    ("dec/sampled_features_first1024", 2e-5),
])
def test_golden_tensor_matches(run, golden, key, tolerance):
    assert run[key].shape == golden[key].shape
    assert np.abs(run[key] - golden[key]).max() <= tolerance


@pytest.mark.parametrize("key", ["enc/cell_index", "enc/occupied_cells"])
def test_golden_cells_match_exactly(run, golden, key):
    np.testing.assert_array_equal(run[key], golden[key])


def test_golden_unet_input(run, golden):
    occupied = golden["enc/occupied_cells"]
    sparse = run["unet_input"]
    expected = golden["enc/unet_input_occupied"]
    assert np.abs(sparse[:32, occupied] - expected[:32]).max() <= 1e-6
    assert np.abs(sparse[32:, occupied] - expected[32:]).max() <= 1e-3
    empty = np.setdiff1d(np.arange(sparse.shape[1]), occupied)
    assert not sparse[:, empty].any()


def test_state_dict_names_and_order_equal_reference(golden):
    reference = [key[len("param/"):] for key in golden if key.startswith("param/")]
    assert list(SCONet(32).state_dict()) == reference


# Deviations from the reference definition; each must move a checked tensor beyond its tolerance, which shows
# that the parity thresholds above can fail.
def _max_grid_logits(model, points, queries):
    encoder = model.encoder
    index = encoder.cell_index(points)
    features = torch.cat([encoder.point_features(points), points[..., 3:]], dim=2)
    cells = features.new_zeros(1, 32 ** 3, features.shape[2])
    cells.scatter_reduce_(1, index[..., None].expand_as(features), features, reduce="amax", include_self=False)
    grid = encoder.unet3d(cells.transpose(1, 2).reshape(1, -1, 32, 32, 32))
    return model.decode(queries, grid)


def _edge_aligned_logits(model, points, queries):
    grid = model.encode(points)
    u = normalize_to_unit_cube(queries, model.config.padding)
    sampled = F.grid_sample(grid, (2 * u - 1)[:, :, None, None], padding_mode="border", align_corners=False)
    features = sampled[:, :, :, 0, 0].transpose(1, 2)
    net = 0
    for fc_c, block in zip(model.decoder.fc_c, model.decoder.blocks):
        net = block(net + fc_c(features))
    return model.decoder.fc_out(torch.relu(net))


@pytest.mark.parametrize("deviation", [_max_grid_logits, _edge_aligned_logits])
def test_deviations_change_logits_beyond_tolerance(golden, golden_model, run, deviation):
    points = torch.from_numpy(golden["input/points"])
    queries = torch.from_numpy(golden["input/queries"])
    with torch.inference_mode():
        logits = deviation(golden_model, points, queries).numpy()
    assert np.abs(logits - golden["output/logits"]).max() > 1e-2


def test_mean_local_pooling_changes_point_features(golden, golden_model):
    encoder = golden_model.encoder
    points = torch.from_numpy(golden["input/points"])
    with torch.inference_mode():
        index = encoder.cell_index(points)
        h = encoder.blocks[0](encoder.fc_pos(points[..., :3]))
        for block in encoder.blocks[1:]:
            expanded = index[..., None].expand_as(h)
            mean = h.new_zeros(1, 32 ** 3, h.shape[2]).scatter_reduce_(1, expanded, h, "mean", include_self=False)
            h = block(torch.cat([h, mean.gather(1, expanded)], dim=2))
        features = encoder.fc_c(h).numpy()
    assert np.abs(features - golden["enc/point_features"]).max() > 1e-5


# ------------------------------------------------------------------------------------------ sizes and quirks

PART_SIZES = [
    ("total", lambda m: m, 1_255_493),
    ("encoder", lambda m: m.encoder, 1_239_360),
    ("unet3d", lambda m: m.encoder.unet3d, 1_212_128),
    ("decoder", lambda m: m.decoder, 16_133),
    ("decoder.fc_p", lambda m: m.decoder.fc_p, 128),
]


@pytest.mark.parametrize("preset", ["A", "B"])
@pytest.mark.parametrize("part, select, expected", PART_SIZES)
def test_parameter_counts(preset, part, select, expected):
    model = build_model(preset)
    assert sum(p.numel() for p in select(model).parameters()) == expected
    assert not list(model.buffers())


def test_fresh_model_zero_initialises_fc_1_and_ignores_fc_p():
    torch.manual_seed(0)
    model = SCONet(8)
    fc_1 = [m.fc_1.weight for m in [*model.encoder.blocks, *model.decoder.blocks]]
    assert len(fc_1) == 10 and all(not w.any() for w in fc_1)
    points, queries = torch.randn(1, 40, 51) * 0.3, torch.rand(1, 30, 3) - 0.5
    model(points, queries).square().sum().backward()
    assert model.decoder.fc_p.weight.grad is None
    assert model.encoder.fc_pos.weight.grad.abs().sum() > 0  # gradients flow through the scatter operations


def test_unet_layers_follow_reference():
    unet = SCONet(8).encoder.unet3d
    first = unet.encoders[0].basic_module.SingleConv1
    assert [type(m).__name__ for m in first] == ["GroupNorm", "Conv3d", "ReLU"]
    assert first.groupnorm.num_groups == 1 and first.groupnorm.eps == 1e-5
    convs = [m for m in unet.modules() if isinstance(m, torch.nn.Conv3d)]
    assert [c.bias is None for c in convs] == [True] * 10 + [False]
    assert unet.final_conv.kernel_size == (1, 1, 1)


# ------------------------------------------------------------------------------------- unit cube and the grid

@pytest.mark.parametrize("p, expected_u", [
    ((0.0, 0.0, 0.0), (0.5, 0.5, 0.5)),
    ((0.5505, -0.5505, 0.27525), (0.999, 0.0, 0.75)),   # ±half side: u = 1 → 0.999, u = 0 stays 0
    ((2.0, -3.0, 0.0), (0.999, 0.0, 0.5)),              # far outside: clamped
])
def test_normalize_to_unit_cube(p, expected_u):
    p = torch.tensor([p], dtype=torch.float64)
    before = p.clone()
    u = normalize_to_unit_cube(p, 0.1)
    np.testing.assert_allclose(u.numpy()[0], expected_u, atol=1e-12)
    assert torch.equal(p, before)


@pytest.mark.parametrize("p, expected", [
    ((0.0, 0.0, 0.0), 16 + 32 * (16 + 32 * 16)),
    ((-1.0, -1.0, -1.0), 0),
    ((1.0, 1.0, 1.0), 32 ** 3 - 1),
    ((1.0, -1.0, -1.0), 31),            # x is the fastest axis
    ((-1.0, -1.0, 1.0), 31 * 32 * 32),  # z the slowest
])
def test_cell_index(p, expected):
    assert cell_index(torch.tensor([[p]]), 32, 0.1).item() == expected


def test_scatter_to_grid_means_cells_in_zyx_layout():
    encoder = SCONet(8, use_surf=False).encoder
    # cell size 1.101 / 8 in the object frame; cell (ix, iy, iz) = (1, 2, 3) holds two points, (0, 0, 0) one
    centre = (torch.tensor([1.5, 2.5, 3.5]) / 8 - 0.5) * 1.101
    corner = (torch.tensor([0.5, 0.5, 0.5]) / 8 - 0.5) * 1.101
    points = torch.stack([centre, centre + 0.01, corner])[None]
    features = torch.tensor([[[1.0, 10.0], [3.0, 20.0], [-5.0, 7.0]]])
    grid = encoder.scatter_to_grid(features, encoder.cell_index(points))
    assert grid.shape == (1, 2, 8, 8, 8)
    assert grid[0, :, 3, 2, 1].tolist() == [2.0, 15.0]
    assert grid[0, :, 0, 0, 0].tolist() == [-5.0, 7.0]
    assert grid.ne(0).sum() == 4


# ----------------------------------------------------------------------------- batching, chunking, variants

@pytest.fixture(scope="module")
def small_model():
    torch.manual_seed(1)
    model = SCONet(8)
    with torch.no_grad():
        for block in [*model.encoder.blocks, *model.decoder.blocks]:
            block.fc_1.weight.normal_(0, 0.1)
    return model.eval()


def _cloud(seed, n=300, surf=True):
    gen = torch.Generator().manual_seed(seed)
    xyz = (torch.rand(1, n, 3, generator=gen) - 0.5) * 1.2
    return torch.cat([xyz, torch.randn(1, n, 48, generator=gen) * 100], 2) if surf else xyz


def test_batched_encode_decode_equals_single(small_model):
    points = torch.cat([_cloud(1), _cloud(2)])
    queries = torch.rand(2, 500, 3) - 0.5
    with torch.inference_mode():
        batched = small_model(points, queries)
        single = torch.cat([small_model(points[i:i + 1], queries[i:i + 1]) for i in range(2)])
    assert batched.shape == (2, 500, 5)
    torch.testing.assert_close(batched, single, rtol=0, atol=1e-5)
    assert (batched[0] - batched[1]).abs().max() > 1e-3


def test_chunked_decode_equals_full_decode_in_inference_mode(small_model):
    queries = torch.rand(1, 10_000, 3) * 1.4 - 0.7
    with torch.inference_mode():
        grid = small_model.encode(_cloud(3))
        full = small_model.decode(queries, grid)
        chunks = torch.cat([small_model.decode(chunk, grid) for chunk in queries.split(3_000, dim=1)], dim=1)
    assert full.is_inference() and not full.requires_grad
    torch.testing.assert_close(chunks, full, rtol=0, atol=1e-6)


def test_without_surf_takes_coordinates_only():
    model = SCONet(8, use_surf=False)
    assert model.encoder.unet3d.encoders[0].basic_module.SingleConv1.groupnorm.num_channels == 32
    with torch.inference_mode():
        grid = model.encode(_cloud(4, surf=False))
        logits = model.decode(torch.zeros(1, 7, 3), grid)
    assert grid.shape == (1, 32, 8, 8, 8) and logits.shape == (1, 7, 5)


BAD_INPUTS = [
    ("points", lambda: np.zeros((1, 5, 51), np.float32), TypeError, "points must be a torch.Tensor"),
    ("points", lambda: torch.zeros(5, 51), ValueError, r"points must have shape \(B, N, 51\)"),
    ("points", lambda: torch.zeros(1, 5, 3), ValueError, r"\(B, N, 51\).*got \(1, 5, 3\)"),
    ("points", lambda: torch.zeros(1, 0, 51), ValueError, "B, N >= 1"),
    ("points", lambda: torch.zeros(1, 5, 51, dtype=torch.int64), TypeError, "floating-point"),
    ("points", lambda: torch.zeros(1, 5, 51, dtype=torch.float64), TypeError, "model's dtype torch.float32"),
    ("points", lambda: torch.full((1, 5, 51), float("nan")), ValueError, "NaN or infinite"),
    ("queries", lambda: torch.zeros(1, 5, 2), ValueError, r"queries must have shape \(B, N, 3\)"),
    ("queries", lambda: torch.full((1, 5, 3), float("inf")), ValueError, "queries has NaN"),
    ("grid", lambda: torch.zeros(2, 32, 8, 8, 8), ValueError, r"grid must have shape \(1, 32, 8, 8, 8\)"),
    ("grid", lambda: torch.zeros(1, 32, 16, 16, 16), ValueError, "grid must have shape"),
]


@pytest.mark.parametrize("argument, make, error, message", BAD_INPUTS)
def test_bad_inputs_are_rejected(small_model, argument, make, error, message):
    inputs = {"points": _cloud(5, n=5), "queries": torch.zeros(1, 5, 3), "grid": torch.zeros(1, 32, 8, 8, 8)}
    inputs[argument] = make()
    with pytest.raises(error, match=message):
        if argument == "points":
            small_model.encode(inputs["points"])
        else:
            small_model.decode(inputs["queries"], inputs["grid"])


# -------------------------------------------------------------------------------------- config and loading

def test_config_round_trip_and_presets():
    config = ModelConfig(grid_resolution=64, num_classes=3, use_surf=False, scale_mm=350.0, padding=0.2)
    assert ModelConfig.from_dict(config.to_dict()) == config
    assert build_model(config).config == config
    assert SCONet(grid_resolution=64, num_classes=3, use_surf=False, scale_mm=350.0, padding=0.2).config == config
    assert build_model("A").config == MODEL_PRESETS["A"] == ModelConfig()
    assert build_model("B").config.grid_resolution == 64
    assert ModelConfig().to_dict() == {"grid_resolution": 32, "num_classes": 5, "use_surf": True, "scale_mm": 400.0,
                                       "padding": 0.1, "c_dim": 32, "hidden_dim": 32, "n_blocks": 5, "f_maps": 32,
                                       "num_levels": 3, "num_groups": 1, "decoder_hidden": 32}
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.grid_resolution = 32


@pytest.mark.parametrize("make, error, message", [
    (lambda: ModelConfig.from_dict({"grid_resoluton": 32}), ValueError, r"unknown ModelConfig keys \['grid_reso"),
    (lambda: ModelConfig.from_dict([("grid_resolution", 32)]), TypeError, "ModelConfig must be a mapping"),
    (lambda: ModelConfig(grid_resolution=30), ValueError, "multiple of 4"),
    (lambda: ModelConfig(grid_resolution=0), ValueError, "grid_resolution must be an integer >= 1"),
    (lambda: ModelConfig(grid_resolution=32.0), ValueError, "grid_resolution must be an integer >= 1"),
    (lambda: ModelConfig(num_classes=True), ValueError, "num_classes must be an integer >= 1"),
    (lambda: ModelConfig(num_classes=1), ValueError, "at least 2"),
    (lambda: ModelConfig(use_surf="yes"), ValueError, "use_surf must be True or False"),
    (lambda: ModelConfig(scale_mm=-400.0), ValueError, "scale_mm > 0"),
    (lambda: ModelConfig(padding=float("nan")), ValueError, "padding must be a finite number"),
    (lambda: ModelConfig.preset("C"), ValueError, r"unknown model preset 'C'; expected one of \['A', 'B'\]"),
    (lambda: build_model(32), TypeError, "config must be a ModelConfig"),
])
def test_bad_configs_are_rejected(make, error, message):
    with pytest.raises(error, match=message):
        make()


@pytest.mark.parametrize("edit, message", [
    (lambda t: t.pop("decoder.fc_p.bias"), r"missing keys \['decoder.fc_p.bias'\]"),
    (lambda t: t.update({"decoder.extra": np.zeros(3, np.float32)}), r"unexpected keys \['decoder.extra'\]"),
    (lambda t: t.update({"decoder.fc_out.bias": np.zeros(4, np.float32)}),
     r"decoder.fc_out.bias: shape \(4,\), expected \(5,\)"),
    (lambda t: t.update({"encoder.fc_c.bias": np.full(32, np.nan, np.float32)}), "encoder.fc_c.bias: contains NaN"),
])
def test_load_reference_state_dict_reports_mismatches(golden, edit, message):
    tensors = _reference_params(golden)
    edit(tensors)
    model = SCONet(32)
    before = model.decoder.fc_out.weight.clone()
    with pytest.raises(ValueError, match=message):
        load_reference_state_dict(model, tensors)
    assert torch.equal(model.decoder.fc_out.weight, before)  # nothing loaded on error


def test_load_reference_state_dict_accepts_tensors(golden, golden_model):
    model = SCONet(32)
    load_reference_state_dict(model, {k: torch.from_numpy(v) for k, v in _reference_params(golden).items()})
    for key, value in golden_model.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key
