"""Tests of SCONetLib.train: loss, metric, configuration, curves, and real training runs on small phantoms
(learning, resume after SIGKILL, DDP with two gloo processes, script mode, broken cases)."""
import csv
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
import yaml

from SCONetLib import train_loop
from SCONetLib.checkpoint import load_checkpoint, load_training_checkpoint
from SCONetLib.cli import build_train_parser as build_parser, train_config_from_args as config_from_args, train_main
from SCONetLib.data import DataConfig, dataset_splits, prepare_cases
from SCONetLib.figures import CURVE_COLOURS, save_png, training_curves
from SCONetLib.metrics import threshold_dice
from SCONetLib.train import TrainConfig, train
from SCONetLib.train_loop import ce_dice_loss

REPO = Path(__file__).resolve().parents[1]
#: Small phantoms: 256 × 256 in plane (the Canny grid) but only 32 slices of 6 mm, a few seconds each to prepare.
PHANTOMS = {"n_train": 4, "n_val": 1, "n_test": 0, "seed": 500, "size": [256, 256, 32], "spacing": [1.6, 1.6, 6.0]}


# ---------------------------------------------------------------- loss and metric

def test_ce_dice_loss_matches_a_hand_computation():
    logits = torch.tensor([[[2.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 3.0], [1.0, 1.0, 0.0]]])
    targets = torch.tensor([[0, 1, 1, 0]])
    p = torch.softmax(logits[0], dim=1).numpy()
    t = np.eye(3)[[0, 1, 1, 0]]
    ce = -np.mean(np.log(p[np.arange(4), [0, 1, 1, 0]]))
    dice = np.mean(1 - 2 * (p * t).sum(0) / np.maximum(p.sum(0) + t.sum(0), 1e-5))
    assert float(ce_dice_loss(logits, targets)) == pytest.approx(ce + dice, rel=1e-6)


def test_ce_dice_loss_is_small_for_confident_correct_logits_and_has_gradients():
    targets = torch.tensor([[0, 1, 2, 3, 4, 0]])
    logits = (20.0 * torch.nn.functional.one_hot(targets, 5).float()).requires_grad_()
    assert float(ce_dice_loss(logits, targets).detach()) < 1e-6
    wrong = ce_dice_loss(torch.roll(logits, 1, dims=2), targets)
    assert float(wrong.detach()) > 20
    wrong.backward()
    assert logits.grad is not None and torch.isfinite(logits.grad).all()


def test_threshold_dice_per_class():
    probabilities = np.array([[0.9, 0.1], [0.6, 0.4], [0.3, 0.7], [0.45, 0.55]])
    targets = np.array([0, 1, 1, 1])
    dice = threshold_dice(probabilities, targets)
    assert dice[0] == pytest.approx((2 * 1 + 1e-5) / (2 + 1 + 1e-5))
    assert dice[1] == pytest.approx((2 * 2 + 1e-5) / (2 + 3 + 1e-5))


def test_rank_partition_covers_the_epoch_with_equal_shares():
    permutation = [4, 0, 3, 1, 2]
    shares = [train_loop._rank_cases(permutation, train_loop.Dist(rank, 2)) for rank in range(2)]
    assert shares == [[4, 3, 2], [0, 1, 4]]  # padded with the permutation's start, like DistributedSampler
    assert train_loop._rank_cases(permutation, train_loop.Dist()) == permutation


# ---------------------------------------------------------------- configuration

def _write_yaml(path: Path, values: dict) -> Path:
    path.write_text(yaml.safe_dump(values))
    return path


@pytest.mark.parametrize("values, match", [
    ({"out_dir": "x", "epoch": 3}, r"unknown training config keys \['epoch'\]"),
    ({"out_dir": "x", "data": {"source": "phantom", "workrs": 2}}, r"unknown data keys \['workrs'\]"),
    ({"out_dir": "x", "model": {"grid": 32}}, r"unknown ModelConfig keys \['grid'\]"),
    ({"out_dir": "x", "model": "C"}, "unknown model preset 'C'"),
    ({"out_dir": "x", "lr": -1}, "lr must be a number"),
    ({"out_dir": "x", "epochs": 0}, "epochs must be an integer >= 1"),
    ({"out_dir": "x", "select_on": "loss"}, "select_on must be one of"),
    ({"out_dir": "x", "device": "tpu"}, "device must be"),
    ({"out_dir": "x", "lr_milestones": [5, 3]}, "lr_milestones must be increasing"),
    ({"out_dir": "x", "lr_gamma": 0}, "lr_gamma must be a number in"),
    ({"epochs": 2}, "out_dir"),
])
def test_config_validation_errors(values, match):
    with pytest.raises(ValueError, match=match):
        TrainConfig.from_dict({"data": {"source": "phantom"}, **values})


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message when CUDA is absent")
def test_device_is_checked_when_training_starts_not_in_the_config(tmp_path):
    config = TrainConfig.from_dict({"out_dir": str(tmp_path / "run"), "data": {"source": "phantom"},
                                    "device": "cuda:1"})       # valid on a machine without CUDA (e.g. to copy)
    assert config.device == "cuda:1"
    with pytest.raises(ValueError, match="device 'cuda:1' was requested but CUDA is not available"):
        train(config)
    assert not (tmp_path / "run").exists()


def test_learning_rate_step_decay():
    config = TrainConfig.from_dict({"out_dir": "x", "data": {"source": "phantom"}, "lr": 1e-3,
                                    "lr_milestones": [24, 32], "lr_gamma": 0.3})
    rates = [config.learning_rate(epoch) for epoch in (0, 23, 24, 31, 32, 39)]
    assert rates == pytest.approx([1e-3, 1e-3, 3e-4, 3e-4, 9e-5, 9e-5])
    constant = TrainConfig.from_dict({"out_dir": "x", "data": {"source": "phantom"}})
    assert {constant.learning_rate(epoch) for epoch in range(300)} == {1e-4}


def test_flags_override_the_yaml(tmp_path):
    path = _write_yaml(tmp_path / "c.yaml", {"out_dir": "from_yaml", "epochs": 5, "model": "A",
                                             "data": {"source": "phantom", "workers": 1}})
    args = build_parser().parse_args(["--config", str(path), "--epochs", "7", "--grid", "64", "--workers", "2",
                                      "--lr", "0.003", "--out", "from_flag"])
    config = config_from_args(args)
    assert (config.out_dir, config.epochs, config.lr) == ("from_flag", 7, 0.003)
    assert config.model.grid_resolution == 64 and config.model.use_surf
    assert config.data.workers == 2 and config.data.source == "phantom"
    assert TrainConfig.from_dict(config.to_dict()) == config


@pytest.mark.parametrize("name", ["phantom_A.yaml", "abdomenct1k_A.yaml", "synth_A.yaml", "synth_A_gpu.yaml"])
def test_shipped_configs_are_valid(name, tmp_path):
    path = REPO / "SCONetLib" / "configs" / name
    args = build_parser().parse_args(["--config", str(path), "--out", str(tmp_path), "--data", str(tmp_path)])
    config = config_from_args(args)
    assert config.model.grid_resolution == 32 and config.augment_sigma == 0.1
    if name == "abdomenct1k_A.yaml":  # the reference's settings
        assert (config.lr, config.n_points, config.n_queries, config.val_queries, config.select_on) == \
            (1e-4, 50_000, 50_000, 524_288, "all")
        assert config.learning_rate(299) == 1e-4
    if name.startswith("synth_"):  # the phantom stream: version-2 training data, disjoint seed ranges
        stream, val = config.data.stream, config.data.phantom
        assert stream["version"] == 2 and val["version"] == 2 and val["n_train"] == 0
        assert stream["seed"] >= 1_000_000 and val["seed"] + val["n_val"] <= 9000


def test_main_reports_config_errors_with_status_2(tmp_path, capsys):
    path = _write_yaml(tmp_path / "c.yaml", {"out_dir": str(tmp_path / "run"), "n_point": 10})
    assert train_main(["--", "--config", str(path)]) == 2
    assert "unknown training config keys ['n_point']" in capsys.readouterr().err
    bad = tmp_path / "bad.yaml"
    bad.write_text("epochs: [1,\n")
    assert train_main(["--config", str(bad)]) == 2
    assert "not valid YAML" in capsys.readouterr().err


def test_training_curves_draw_every_series(tmp_path):
    history = [{"epoch": e, "train_loss": 2.0 / e, "val_loss": 2.2 / e, "val_mean_dice_organs": 0.1 * e,
                "val_mean_dice_all": 0.12 * e} for e in range(1, 6)]
    path = save_png(training_curves(history), tmp_path / "curves.png")
    image = sitk.GetArrayFromImage(sitk.ReadImage(str(path)))[..., :3].astype(int)
    assert image.shape == (400, 960, 3)
    for colour in CURVE_COLOURS.values():
        rgb = np.array([int(colour[i:i + 2], 16) for i in (1, 3, 5)])
        assert np.all(np.abs(image - rgb) <= 2, axis=2).sum() > 50, colour  # every curve is drawn
    assert not list(tmp_path.glob(".*tmp*"))


# ---------------------------------------------------------------- real runs on small phantoms

@pytest.fixture(scope="module")
def phantom_cache(tmp_path_factory):
    """A preprocessing cache holding the PHANTOMS dataset (4 train + 1 val), built once for this module."""
    cache = tmp_path_factory.mktemp("cache")
    splits, _ = dataset_splits(DataConfig(source="phantom", phantom=PHANTOMS), cache)
    result = prepare_cases(splits["train"] + splits["val"], cache, workers=2)
    assert len(result.entries) == 5, result.skipped
    return cache


def _run_config(out: Path, cache: Path, **overrides) -> dict:
    config = {"out_dir": str(out), "data": {"source": "phantom", "cache_dir": str(cache), "phantom": PHANTOMS},
              "model": {"grid_resolution": 16}, "epochs": 3, "n_points": 4000, "n_queries": 8000,
              "val_queries": 20000, "lr": 0.002, "checkpoint_every": 1, "threads": 1, "tensorboard": False}
    config.update(overrides)
    return config


def _csv_rows(path: Path) -> list:
    with open(path, newline="") as file:
        return list(csv.DictReader(file))


@pytest.mark.slow
def test_training_learns_to_segment_phantoms(phantom_cache, tmp_path):
    """The untrained network finds no organ (Dice ~0); after 160 steps on 4 phantoms the held-out phantom's
    validation organ Dice (0.5-thresholded softmax, mean of the 4 organs) exceeds 0.5: organs are localised and
    roughly delineated. A network that did not learn from the labels stays near 0."""
    config = TrainConfig.from_dict(_run_config(tmp_path / "run", phantom_cache, epochs=40, organ_fraction=0.5,
                                               threads=2, checkpoint_every=100))
    start = time.perf_counter()
    summary = train(config, command_line="pytest learning run")
    elapsed = time.perf_counter() - start
    rows = _csv_rows(tmp_path / "run" / "metrics.csv")
    first, best = float(rows[0]["val_mean_dice_organs"]), summary["best_metric"]
    print(f"learning run: {elapsed:.0f} s, organ Dice epoch 1 {first:.3f}, best {best:.3f} "
          f"(epoch {summary['best_epoch']}), last {float(rows[-1]['val_mean_dice_organs']):.3f}")
    assert first < 0.1
    assert best >= 0.5
    assert float(rows[-1]["train_loss"]) < 0.5 * float(rows[0]["train_loss"])
    model, metadata = load_checkpoint(tmp_path / "run" / "model_best.pt")
    assert model.config.grid_resolution == 16
    assert metadata["training_progress"]["best_metric"] == pytest.approx(best)
    assert metadata["training_command"] == "pytest learning run"
    assert metadata["training_data"]["used"]["train"] == ["Case_00001", "Case_00002", "Case_00003", "Case_00004"]
    assert metadata["training_config"]["organ_fraction"] == 0.5


def _wait_for(path: Path, text: str, process: subprocess.Popen, timeout: float = 240) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if path.exists() and text in path.read_text(encoding="utf-8"):
            return
        if process.poll() is not None:
            raise AssertionError(f"training ended (status {process.returncode}) before logging {text!r}")
        time.sleep(0.02)
    raise AssertionError(f"timeout waiting for {text!r} in {path}")


@pytest.mark.slow  # long: runs in .ci/run's second pass, not in the default suite
def test_resume_after_sigkill_mid_epoch_is_exact(phantom_cache, tmp_path):
    """Kill (SIGKILL) a run right after a mid-epoch checkpoint of epoch 2, resume it, and compare with an
    uninterrupted run: same 3 log rows, same steps, bit-identical weights; no temporary files left."""
    reference = TrainConfig.from_dict(_run_config(tmp_path / "reference", phantom_cache))
    train(reference)
    config_path = _write_yaml(tmp_path / "run.yaml", _run_config(tmp_path / "run", phantom_cache))
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    # first run as a script, as Slicer --python-script would start it
    process = subprocess.Popen([sys.executable, str(REPO / "SCONetLib" / "train.py"), "--", "--config",
                                str(config_path)], cwd=tmp_path, env=env, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    try:
        _wait_for(tmp_path / "run" / "train.log", "at epoch 2, step 1 of the epoch (mid-epoch)", process)
        process.send_signal(signal.SIGKILL)
    finally:
        process.wait(30)
    assert process.returncode == -signal.SIGKILL
    _, _, state = load_training_checkpoint(tmp_path / "run" / "model_last.pt")
    assert state["epoch"] == 1 and 1 <= state["step_in_epoch"] < 4, "the kill must land mid-epoch"
    assert len(_csv_rows(tmp_path / "run" / "metrics.csv")) == 1
    resumed = subprocess.run([sys.executable, "-m", "SCONetLib.train", "--config", str(config_path), "--resume"],
                             cwd=REPO, env=env, capture_output=True, encoding="utf-8", timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    rows = _csv_rows(tmp_path / "run" / "metrics.csv")
    reference_rows = _csv_rows(tmp_path / "reference" / "metrics.csv")
    assert [r["epoch"] for r in rows] == ["1", "2", "3"] and [r["step"] for r in rows] == ["4", "8", "12"]
    for row, expected in zip(rows, reference_rows):
        assert row["train_loss"] == expected["train_loss"] and row["val_loss"] == expected["val_loss"]
    model, _, state = load_training_checkpoint(tmp_path / "run" / "model_last.pt")
    expected_model, _, expected_state = load_training_checkpoint(tmp_path / "reference" / "model_last.pt")
    assert state["global_step"] == 12 and state["epoch"] == 3
    for (name, value), expected in zip(model.state_dict().items(), expected_model.state_dict().values()):
        assert torch.equal(value, expected), name
    load_checkpoint(tmp_path / "run" / "model_best.pt")
    assert not [p.name for p in (tmp_path / "run").iterdir() if ".tmp" in p.name]
    refused = subprocess.run([sys.executable, "-m", "SCONetLib.train", "--config", str(config_path)], cwd=REPO,
                             env=env, capture_output=True, encoding="utf-8", timeout=120)
    assert refused.returncode == 1 and "--resume" in refused.stderr


@pytest.mark.slow  # long: runs in .ci/run's second pass, not in the default suite
def test_ddp_with_two_gloo_processes(phantom_cache, tmp_path):
    config_path = _write_yaml(tmp_path / "ddp.yaml", _run_config(tmp_path / "run", phantom_cache, epochs=1,
                                                                  checkpoint_every=1))
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             "-m", "SCONetLib.train", "--config", str(config_path)],
                            cwd=REPO, env=env, capture_output=True, encoding="utf-8", timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "rank 1 of 2" in result.stderr
    rows = _csv_rows(tmp_path / "run" / "metrics.csv")
    assert len(rows) == 1 and rows[0]["step"] == "2"  # 4 cases shared by 2 ranks: 2 steps each
    assert math.isfinite(float(rows[0]["val_mean_dice_all"]))
    _, _, state = load_training_checkpoint(tmp_path / "run" / "model_last.pt")
    assert state["world_size"] == 2 and state["epoch"] == 1
    assert "mid-epoch" in (tmp_path / "run" / "train.log").read_text(encoding="utf-8")
    assert "[rank 1]" not in (tmp_path / "run" / "train.log").read_text(encoding="utf-8")  # only rank 0 writes the log


def test_script_mode_help_and_exit_status(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    result = subprocess.run([sys.executable, str(REPO / "SCONetLib" / "train.py"), "--", "--help"], cwd=tmp_path,
                            env=env, capture_output=True, encoding="utf-8", timeout=120)
    assert result.returncode == 0 and "--resume" in result.stdout
    result = subprocess.run([sys.executable, str(REPO / "SCONetLib" / "train.py"), "--source", "phantom"], cwd=tmp_path,
                            env=env, capture_output=True, encoding="utf-8", timeout=120)
    assert result.returncode == 2 and "out_dir" in result.stderr


class _FakeSummaryWriter:
    """Records what training sends to TensorBoard (the tensorboard package is optional and not installed here)."""

    scalars: list = []

    def __init__(self, folder):
        self.folder = folder

    def add_scalar(self, tag, value, step):
        self.scalars.append((tag, float(value), int(step)))

    def flush(self):
        pass

    def close(self):
        pass


def test_broken_cases_are_skipped_by_training_and_tensorboard_is_fed(tmp_path, monkeypatch):
    from types import ModuleType

    from test_data import _synthetic_case

    fake = ModuleType("torch.utils.tensorboard")
    fake.SummaryWriter = _FakeSummaryWriter
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", fake)
    _FakeSummaryWriter.scalars = []
    root = tmp_path / "ds"
    for k in range(1, 4):
        _synthetic_case(root, f"Case_{k:05d}", shift=k)
    (root / "volumes" / "Case_00004_0000.nii.gz").write_bytes(b"broken")
    (root / "segmentations" / "Case_00004.nii.gz").write_bytes(b"broken")
    (root / "train.lst").write_text("Case_00001\nCase_00002\nCase_00004\n")
    (root / "val.lst").write_text("Case_00003\n")
    config = TrainConfig.from_dict({"out_dir": str(tmp_path / "run"), "data": {"source": "abdomenct1k",
                                    "root": str(root)}, "model": {"grid_resolution": 8}, "epochs": 1,
                                    "n_points": 500, "n_queries": 500, "val_queries": 1000})
    summary = train(config)
    assert summary["global_step"] == 2
    skipped = json.loads((tmp_path / "run" / "skipped.json").read_text(encoding="utf-8"))
    assert [s["case_id"] for s in skipped] == ["Case_00004"]
    data = json.loads((tmp_path / "run" / "data.json").read_text(encoding="utf-8"))
    assert data["used"] == {"train": ["Case_00001", "Case_00002"], "val": ["Case_00003"]}
    tags = {tag for tag, _, _ in _FakeSummaryWriter.scalars}
    assert {"loss/train_step", "train/loss", "val/loss", "val/mean_dice_organs"} <= tags
