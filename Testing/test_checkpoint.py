"""Tests of SCONetLib.checkpoint: round trips, training state, atomic writes and damaged or hostile files."""
from __future__ import annotations

import os
import pickle
import random

import numpy as np
import pytest
import torch

from SCONetLib import __version__, checkpoint
from SCONetLib.checkpoint import (CheckpointError, capture_rng_state, default_weights_path, load_checkpoint,
                                  load_training_checkpoint, restore_rng_state, save_checkpoint)
from SCONetLib.model import SCONet, ModelConfig

METADATA = {"training_data": "40 phantoms, seeds 0-39", "training_command": "python -m SCONetLib.train x",
            "points": {"n_points": 50_000, "surf_int8": "per-column max / 127"},
            "evaluation": {"dice": {"liver": 0.91, "kidneys": 0.85}}}


@pytest.fixture
def model():
    torch.manual_seed(3)
    net = SCONet(8, scale_mm=350.0)
    with torch.no_grad():
        for block in [*net.encoder.blocks, *net.decoder.blocks]:
            block.fc_1.weight.normal_(0, 0.1)
    return net.eval()


@pytest.fixture
def inputs():
    gen = torch.Generator().manual_seed(0)
    xyz = torch.rand(1, 200, 3, generator=gen) - 0.5
    points = torch.cat([xyz, torch.randn(1, 200, 48, generator=gen) * 100], dim=2)
    return points, torch.rand(1, 300, 3, generator=gen) - 0.5


@pytest.fixture
def saved(tmp_path, model):
    return save_checkpoint(tmp_path / "model.pt", model, METADATA)


def test_round_trip_is_bit_identical(saved, model, inputs):
    loaded, metadata = load_checkpoint(saved)
    assert loaded.config == model.config and not loaded.training
    with torch.inference_mode():
        assert torch.equal(loaded(*inputs), model(*inputs))
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value)
    assert os.listdir(saved.parent) == ["model.pt"]  # no temporary file left behind


def test_metadata_is_preserved_and_completed(saved):
    _, metadata = load_checkpoint(saved, device=torch.device("cpu"))
    assert {k: metadata[k] for k in METADATA} == METADATA
    assert metadata["classes"][2] == {"label": 2, "name": "kidneys"} and len(metadata["classes"]) == 5
    assert metadata["normalisation"]["scale_mm"] == 350.0 and metadata["normalisation"]["padding"] == 0.1
    assert metadata["library_version"] == __version__ and metadata["torch_version"] == torch.__version__


def test_training_state_round_trip_resumes_identically(tmp_path, model, inputs):
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)

    def step(net, opt):
        opt.zero_grad()
        net(*inputs).square().mean().backward()
        opt.step()

    step(model, optimizer)
    state = {"optimizer": optimizer.state_dict(), "epoch": 7, "rng": capture_rng_state()}
    path = save_checkpoint(tmp_path / "train.pt", model, training_state=state)
    resumed, _, loaded_state = load_training_checkpoint(path)
    assert loaded_state["epoch"] == 7
    resumed_optimizer = torch.optim.AdamW(resumed.parameters(), lr=1e-3)
    resumed_optimizer.load_state_dict(loaded_state["optimizer"])
    step(model, optimizer)
    step(resumed, resumed_optimizer)
    for key, value in model.state_dict().items():
        assert torch.equal(resumed.state_dict()[key], value), key
    assert load_training_checkpoint(tmp_path / "train.pt")[2] is not None
    assert load_training_checkpoint(save_checkpoint(tmp_path / "plain.pt", model))[2] is None


def test_rng_state_restores_every_generator():
    state = capture_rng_state()
    first = (torch.rand(3), np.random.rand(3), random.random())
    restore_rng_state(state)
    again = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(first[0], again[0]) and np.array_equal(first[1], again[1]) and first[2] == again[2]


def test_save_replaces_atomically_and_keeps_old_file_on_failure(tmp_path, model, monkeypatch):
    path = save_checkpoint(tmp_path / "model.pt", model, {"run": 1})
    original = path.read_bytes()

    def broken_save(obj, file):
        file.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint.torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(path, model, {"run": 2})
    assert path.read_bytes() == original and os.listdir(tmp_path) == ["model.pt"]
    monkeypatch.undo()
    save_checkpoint(path, model, {"run": 3})
    assert load_checkpoint(path)[1]["run"] == 3


@pytest.mark.parametrize("metadata, training_state, message", [
    ({"x": object()}, None, "metadata must be JSON-serialisable"),
    (["a"], None, "metadata must be a dict"),
    (None, {"rng": {"numpy": np.zeros(3)}}, r"training_state\['rng'\]\['numpy'\] is a numpy.ndarray"),
    (None, {"step": np.int64(3)}, r"training_state\['step'\] is a numpy.int64"),
    (None, {(1, 2): 3}, "has a key of type tuple"),
    (None, [1, 2], "training_state must be a dict or None"),
])
def test_save_rejects_what_cannot_be_loaded_safely(tmp_path, model, metadata, training_state, message):
    with pytest.raises(TypeError, match=message):
        save_checkpoint(tmp_path / "model.pt", model, metadata, training_state)
    assert not os.listdir(tmp_path)


def test_save_rejects_non_models(tmp_path):
    with pytest.raises(TypeError, match="model must be a SCONet, got Linear"):
        save_checkpoint(tmp_path / "model.pt", torch.nn.Linear(2, 2))


# --------------------------------------------------------------------------------------- damaged and hostile

def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="SCONet checkpoint not found"):
        load_checkpoint(tmp_path / "nothing.pt")


@pytest.mark.parametrize("keep", [0.0, 0.1, 0.5, 0.9, 0.999])
def test_truncated_file(saved, keep):
    data = saved.read_bytes()
    saved.write_bytes(data[:int(len(data) * keep)])
    with pytest.raises(CheckpointError, match="model.pt is truncated or corrupt"):
        load_checkpoint(saved)


def _flip(path, offset):
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x5A
    path.write_bytes(bytes(data))


def test_flipped_byte_in_weights_is_detected(saved, model):
    weight = model.decoder.fc_out.weight.detach().numpy().tobytes()
    offset = saved.read_bytes().find(weight)
    assert offset > 0
    _flip(saved, offset + 17)
    with pytest.raises(CheckpointError, match="do not match the stored SHA-256 digest"):
        load_checkpoint(saved)


@pytest.mark.parametrize("marker", [b"training_command", b"sconet-checkpoint", b"decoder.fc_c.0.weight"])
def test_flipped_byte_in_structure_is_detected(saved, marker):
    offset = saved.read_bytes().find(marker)
    assert offset > 0
    _flip(saved, offset + 2)
    with pytest.raises(CheckpointError, match="model.pt"):
        load_checkpoint(saved)


def _rewrite(path, edit):
    """Load the raw dict, apply ``edit`` and save it back with a valid digest."""
    payload = torch.load(path, weights_only=True)
    edit(payload)
    payload["sha256"] = checkpoint._digest(payload)
    torch.save(payload, path)


@pytest.mark.parametrize("edit, message", [
    (lambda p: p["state_dict"].pop("decoder.fc_out.bias"), r"missing keys \['decoder.fc_out.bias'\]"),
    (lambda p: p["state_dict"].update(extra=torch.zeros(2)), r"unexpected keys \['extra'\]"),
    (lambda p: p["config"].update(num_classes=4), r"decoder.fc_out.weight: shape \(5, 32\), expected \(4, 32\)"),
    (lambda p: p["config"].update(colour=True), r"unknown ModelConfig keys \['colour'\]"),
])
def test_config_and_weights_mismatch(saved, edit, message):
    _rewrite(saved, edit)
    with pytest.raises(CheckpointError, match="do not form a valid SCONet: .*" + message):
        load_checkpoint(saved)


@pytest.mark.parametrize("payload, message", [
    ({"format": "other", "state_dict": {}}, "is not a SCONet checkpoint: no 'format': 'sconet-checkpoint'"),
    ({"model": {}, "epoch_it": 3}, "looks like a reference SCONet training checkpoint"),
    (torch.zeros(3), "is not a SCONet checkpoint"),
    ({"format": "sconet-checkpoint", "format_version": 2}, "format version 2, newer than the version 1"),
    ({"format": "sconet-checkpoint", "format_version": "1"}, "invalid format_version '1'"),
    ({"format": "sconet-checkpoint", "format_version": 1, "config": {}}, "entry 'state_dict' is missing"),
])
def test_files_that_are_not_checkpoints(tmp_path, payload, message):
    path = tmp_path / "other.pt"
    torch.save(payload, path)
    with pytest.raises(CheckpointError, match=message):
        load_checkpoint(path)


class _Payload:
    """Pickles into a call of os.system: loading it unsafely would create ``marker``."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


class _Custom:
    """An arbitrary object; weights_only loading must refuse it."""


@pytest.mark.parametrize("writer", ["torch", "pickle"])
@pytest.mark.parametrize("hostile", ["system", "custom"])
def test_pickled_objects_are_refused_without_running_them(tmp_path, saved, writer, hostile):
    marker = tmp_path / "executed"
    payload = torch.load(saved, weights_only=True)
    payload["metadata"] = _Payload(marker) if hostile == "system" else _Custom()
    path = tmp_path / "hostile.pt"
    if writer == "torch":
        torch.save(payload, path)
    else:
        path.write_bytes(pickle.dumps(payload, protocol=2))
    with pytest.raises(CheckpointError, match="refused without running anything"):
        load_checkpoint(path)
    assert not marker.exists()


def test_default_weights_path(monkeypatch):
    path = default_weights_path(must_exist=False)
    assert path.name == "sconet_synth_A.pt" and path.parent.name == "weights"
    assert path.parent.parent.name == "SCONetLib" and path.parent.is_dir()
    monkeypatch.setattr(checkpoint, "DEFAULT_WEIGHTS_NAME", "not_trained_yet.pt")
    with pytest.raises(FileNotFoundError, match=r"not_trained_yet.pt.*python -m SCONetLib.train"):
        default_weights_path()


def test_config_dict_is_stored_verbatim(saved):
    raw = torch.load(saved, weights_only=True)
    assert raw["format"] == "sconet-checkpoint" and raw["format_version"] == 1
    assert ModelConfig.from_dict(raw["config"]) == ModelConfig(grid_resolution=8, scale_mm=350.0)
