"""Training SCONet (reference §3): one case per step, CE + Dice loss, AdamW, validation Dice every epoch.

Run it as ``python -m SCONetLib.train --config SCONetLib/configs/phantom_A.yaml --out RUN_DIR`` (or the
``sconet-train`` console script), as a plain script ``python SCONetLib/train.py …``, inside 3D Slicer with
``Slicer --python-script SCONetLib/train.py -- …``, or on several processes/GPUs with
``torchrun --nproc_per_node=N -m SCONetLib.train …``. ``--help`` lists the flags; every flag overrides the YAML.

What one step does
------------------
1. Take the next training case of this epoch's seeded permutation (each DDP rank takes every ``world``-th case).
2. Draw ``n_points`` of its cached edge points and ``n_queries`` of its voxels, uniformly with replacement
   (:func:`SCONetLib.data.sample_training_example`), map them to the object frame and apply the same random
   linear transform ``p @ M + t`` (``M = I + N(0, σ²)``, ``t ~ N(0, σ²)``, σ = 0.1) to both.
3. ``loss = CE + Dice`` (:func:`ce_dice_loss`), one AdamW step (lr 1e-4, weight decay 0 by default, constant).

After each epoch: validation on the val cases (fixed points and a fixed seed-100 set of query voxels, no
augmentation): loss and per-class Dice of the 0.5-thresholded softmax (background included, the reference's
selection metric) and the organ-only mean Dice (what the best checkpoint is selected on by default).

Outputs in the run folder (only rank 0 writes): ``model_last.pt`` (every epoch and every ``checkpoint_every``
steps, with the full training state, so ``--resume`` continues exactly where the run stopped), ``model_best.pt``,
``metrics.csv``, ``curves.png``, ``config.json``, ``train.log``, ``skipped.json`` and, if TensorBoard is
installed, ``tensorboard/``. Every file is written atomically.
"""
from __future__ import annotations

import os
import sys

if __name__ == "__main__" and not __package__:
    # Run as a script (python SCONetLib/train.py, Slicer --python-script): the script's own folder is on sys.path
    # and would shadow top-level modules with SCONetLib's file names (io, data …); make the package importable.
    _HERE = os.path.dirname(os.path.abspath(__file__))
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _HERE]
    sys.path.insert(0, os.path.dirname(_HERE))

import argparse
import dataclasses
import datetime
import json
import logging
import math
import shlex
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

import numpy as np
import SimpleITK as sitk
import torch
import torch.nn.functional as F

from SCONetLib.checkpoint import (capture_rng_state, load_training_checkpoint, restore_rng_state,
                                  save_checkpoint)
from SCONetLib.data import (CaseStore, DataConfig, dataset_splits, prepare_cases, sample_input_points,
                            sample_queries, sample_training_example)
from SCONetLib.config import check_keys
from SCONetLib.infer import resolve_device
from SCONetLib.io import atomic_output, remove_partial_outputs, write_csv, write_json
from SCONetLib.labels import CLASS_NAMES
from SCONetLib.metrics import dice_of_masks
from SCONetLib.model import ModelConfig, build_model
from SCONetLib.progress import ProgressCallback, report

logger = logging.getLogger("SCONetLib.train")

#: File names in the run folder.
LAST, BEST, METRICS_CSV, CURVES_PNG = "model_last.pt", "model_best.pt", "metrics.csv", "curves.png"
#: Timeout of collective operations (rank 0 may preprocess a whole dataset while the others wait).
DIST_TIMEOUT_HOURS = 12
#: Seconds between progress lines in the log during an epoch.
PROGRESS_LOG_SECONDS = 60.0
#: Metric the best checkpoint is selected on, by ``select_on``.
SELECTION_KEYS = {"organs": "val_mean_dice_organs", "all": "val_mean_dice_all"}


# ============================================================================ configuration

@dataclass(frozen=True)
class TrainConfig:
    """Everything a training run depends on (a YAML file with these keys; unknown keys are rejected).

    Attributes
    ----------
    out_dir : str
        Run folder (checkpoints, logs, cache by default).
    data : DataConfig
        The ``data:`` section (see :class:`SCONetLib.data.DataConfig`).
    model : ModelConfig
        The ``model:`` section: a preset name (``"A"``: 32³ grid, ``"B"``: 64³) or ModelConfig fields.
    epochs : int
        Epochs to train (the reference's loop runs 301 for ``n_epoch: 300``; here ``epochs`` is exact).
    n_points : int
        Input points per step, drawn with replacement from all cached edge points (reference 50,000).
    n_queries : int
        Query voxels per step, drawn uniformly with replacement (reference 50,000).
    lr, weight_decay, betas
        AdamW settings (reference 1e-4, 0.0, (0.9, 0.999)).
    lr_milestones, lr_gamma
        Step decay (not in the reference, whose rate is constant): from each epoch number in ``lr_milestones``
        on (an epoch ``m`` milestone means epochs ``m + 1, m + 2, …``), the rate is multiplied by ``lr_gamma``.
        Empty (the default): constant rate.
    augment_sigma : float
        σ of the random linear transform in object units (reference 0.1 = 40 mm); 0 disables it.
    organ_fraction : float
        Share of the queries drawn in the box around the organs (not in the reference; 0 = uniform only).
    seed : int
        Seed of the weight initialisation, the epoch permutations and every step's sampling (reference 666).
    device : str
        ``"auto"``, ``"cpu"``, ``"cuda"``, ``"cuda:N"`` (under torchrun with CUDA: the local rank's GPU).
    threads : int or None
        ``torch.set_num_threads`` (None: torch's default).
    val_points : int or None
        Input points of a validation case (None: ``n_points``).
    val_queries : int
        Query voxels of a validation case (reference 524,288), drawn once with ``val_seed``.
    val_seed : int
        Seed of the validation draw (reference 100: the same voxels every epoch).
    select_on : str
        ``"organs"`` (mean Dice of the 4 organs) or ``"all"`` (the reference: 5 classes incl. background).
    checkpoint_every : int
        Steps between mid-epoch saves of ``model_last.pt`` (it is also saved at the end of every epoch).
    tensorboard : bool
        Write TensorBoard logs when ``torch.utils.tensorboard`` can be imported.
    """

    out_dir: str | None = None
    data: DataConfig = field(default_factory=lambda: DataConfig(source="phantom"))
    model: ModelConfig = field(default_factory=lambda: ModelConfig.preset("A"))
    epochs: int = 300
    n_points: int = 50_000
    n_queries: int = 50_000
    lr: float = 1e-4
    weight_decay: float = 0.0
    betas: tuple = (0.9, 0.999)
    lr_milestones: tuple = ()
    lr_gamma: float = 0.1
    augment_sigma: float = 0.1
    organ_fraction: float = 0.0
    seed: int = 666
    device: str = "auto"
    threads: int | None = None
    val_points: int | None = None
    val_queries: int = 524_288
    val_seed: int = 100
    select_on: str = "organs"
    checkpoint_every: int = 50
    tensorboard: bool = True

    def __post_init__(self):
        if not self.out_dir:
            raise ValueError("out_dir (the run folder) is required: set it in the YAML or pass --out DIR")
        for name in ("epochs", "n_points", "n_queries", "val_queries", "checkpoint_every"):
            _check_int(name, getattr(self, name), 1)
        for name in ("threads", "val_points"):
            if getattr(self, name) is not None:
                _check_int(name, getattr(self, name), 1)
        _check_int("seed", self.seed, 0)
        _check_int("val_seed", self.val_seed, 0)
        for name, low, high in (("lr", 0.0, math.inf), ("weight_decay", -1e-30, math.inf),
                                ("augment_sigma", -1e-30, 1.0), ("organ_fraction", -1e-30, 1.0 + 1e-12)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not low < value <= high:
                raise ValueError(f"{name} must be a number in ({max(low, 0)}, {high}], got {value!r}")
        milestones = tuple(self.lr_milestones)
        for milestone in milestones:
            _check_int("lr_milestones entries", milestone, 1)
        if list(milestones) != sorted(set(milestones)):
            raise ValueError(f"lr_milestones must be increasing epoch numbers, got {self.lr_milestones!r}")
        object.__setattr__(self, "lr_milestones", milestones)
        if isinstance(self.lr_gamma, bool) or not isinstance(self.lr_gamma, (int, float)) or \
                not 0 < self.lr_gamma <= 1:
            raise ValueError(f"lr_gamma must be a number in (0, 1], got {self.lr_gamma!r}")
        betas = tuple(self.betas)
        if len(betas) != 2 or not all(isinstance(b, (int, float)) and 0 <= b < 1 for b in betas):
            raise ValueError(f"betas must be two numbers in [0, 1), got {self.betas!r}")
        object.__setattr__(self, "betas", tuple(float(b) for b in betas))
        if self.select_on not in SELECTION_KEYS:
            raise ValueError(f"select_on must be one of {sorted(SELECTION_KEYS)}, got {self.select_on!r}")
        if not isinstance(self.tensorboard, bool):
            raise ValueError(f"tensorboard must be true or false, got {self.tensorboard!r}")
        resolve_device("cpu" if self.device == "auto" else self.device)  # validates the name

    @classmethod
    def from_dict(cls, values: Mapping) -> "TrainConfig":
        """Config from a mapping (a parsed YAML); unknown keys at any level raise ``ValueError``."""
        values = check_keys(values, (f.name for f in dataclasses.fields(cls)), "training config")
        values["data"] = DataConfig.from_dict(values.get("data") or {})
        model = values.get("model", "A")
        values["model"] = ModelConfig.preset(model) if isinstance(model, str) else ModelConfig.from_dict(model or {})
        return cls(**values)

    def to_dict(self) -> dict:
        """JSON-compatible dict (``from_dict(to_dict())`` gives the same config)."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        out.update(data=self.data.to_dict(), model=self.model.to_dict(), betas=list(self.betas),
                   lr_milestones=list(self.lr_milestones))
        return json.loads(json.dumps(out))

    def learning_rate(self, epoch: int) -> float:
        """Learning rate of the 0-based ``epoch``: ``lr · lr_gamma ** (milestones <= epoch)``."""
        return self.lr * self.lr_gamma ** sum(1 for milestone in self.lr_milestones if epoch >= milestone)


def _check_int(name: str, value, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


def load_config(path) -> dict:
    """The mapping in a YAML file (not yet validated; see :meth:`TrainConfig.from_dict`).

    PyYAML is imported here, not at module level: only training reads YAML, and 3D Slicer does not bundle it.
    """
    import yaml

    path = Path(path)
    try:
        values = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as error:
        raise ValueError(f"{path} is not valid YAML: {error}") from error
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise ValueError(f"{path} must hold a mapping of keys to values, got a {type(values).__name__}")
    return values


# ============================================================================ loss and validation metric

def ce_dice_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The reference's ``CEDiceLoss``: cross-entropy + soft Dice loss.

    Parameters
    ----------
    logits : (B, M, C) float tensor
    targets : (B, M) int64 tensor of class indices

    Returns
    -------
    scalar tensor
        ``CE (mean over points) + mean over the C classes (background included) of
        1 − 2·Σ(p·t) / max(Σp + Σt, 1e-5)``, ``p`` the softmax, sums over batch and points together.
    """
    num_classes = logits.shape[-1]
    flat_logits = logits.reshape(-1, num_classes)
    flat_targets = targets.reshape(-1)
    ce = F.cross_entropy(flat_logits, flat_targets)
    probs = torch.softmax(flat_logits, dim=1)
    onehot = F.one_hot(flat_targets, num_classes).to(probs.dtype)
    overlap = (probs * onehot).sum(dim=0)
    total = (probs.sum(dim=0) + onehot.sum(dim=0)).clamp_min(1e-5)
    return ce + (1.0 - 2.0 * overlap / total).mean()


def threshold_dice(probabilities: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """(C,) per-class Dice of ``probabilities > 0.5`` against the targets (the reference's validation metric).

    Parameters
    ----------
    probabilities : (M, C) float softmax probabilities
    targets : (M,) int class indices
    """
    return np.array([dice_of_masks(probabilities[:, c] > 0.5, targets == c) for c in range(probabilities.shape[1])])


# ============================================================================ distributed context

@dataclass(frozen=True)
class _Dist:
    """Rank information; ``enabled`` when launched by torchrun with WORLD_SIZE > 1."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    def sum(self, values) -> np.ndarray:
        """Element-wise sum over ranks of a float vector (identity when not distributed)."""
        array = np.asarray(values, dtype=np.float64)
        if not self.enabled:
            return array
        tensor = torch.from_numpy(array.copy())
        if torch.distributed.get_backend() == "nccl":
            tensor = tensor.cuda()
        torch.distributed.all_reduce(tensor)
        return tensor.cpu().numpy()

    def barrier(self) -> None:
        if self.enabled:
            torch.distributed.barrier()


def _init_distributed(device_name: str) -> tuple[_Dist, torch.device]:
    """Join the process group if torchrun set WORLD_SIZE > 1; pick this process's device."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    dist = _Dist(int(os.environ.get("RANK", "0")), world, int(os.environ.get("LOCAL_RANK", "0")))
    device = resolve_device(device_name)
    if dist.enabled:
        if device.type == "cuda":
            device = torch.device("cuda", dist.local_rank)
            torch.cuda.set_device(device)
        if not torch.distributed.is_initialized():
            # long timeout: the other ranks wait at a barrier while rank 0 preprocesses the dataset
            torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                                 timeout=datetime.timedelta(hours=DIST_TIMEOUT_HOURS))
        logger.info("distributed training: rank %d of %d on %s", dist.rank, dist.world, device)
    return dist, device


def _rank_cases(permutation: list, dist: _Dist) -> list:
    """This rank's share of an epoch: every ``world``-th case of the permutation, padded so all ranks get as many
    steps (like ``DistributedSampler``)."""
    steps = math.ceil(len(permutation) / dist.world)
    padded = (permutation * (1 + steps * dist.world // max(1, len(permutation))))[:steps * dist.world]
    return padded[dist.rank::dist.world]


# ============================================================================ training

def train(config: TrainConfig, resume: bool = False, command_line: str | None = None,
          progress: ProgressCallback | None = None) -> dict:
    """Train SCONet as configured; return a summary (epochs, best metric, checkpoint paths, timings).

    Parameters
    ----------
    config : TrainConfig
    resume : bool
        Continue the run in ``config.out_dir`` from its ``model_last.pt`` (exactly: same permutation position,
        optimizer and random states). Without it, a run folder that already holds a checkpoint is refused.
    command_line : str, optional
        Recorded in the checkpoints' metadata.
    progress : callable(fraction, message), optional
        Fraction of all training steps; may raise :class:`SCONetLib.progress.Cancelled` (the last checkpoint on
        disk stays valid: resume from it).

    Raises
    ------
    FileExistsError
        ``out_dir`` holds a checkpoint and ``resume`` is False.
    ValueError
        No usable training case, or a resumed checkpoint built for another model configuration.
    """
    dist, device = _init_distributed(config.device)
    try:
        return _Run(config, dist, device, command_line, progress).run(resume)
    finally:
        if dist.enabled and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


class _Run:
    """State of one training process (see :func:`train`)."""

    def __init__(self, config: TrainConfig, dist: _Dist, device: torch.device, command_line: str | None,
                 progress: ProgressCallback | None):
        self.config, self.dist, self.device, self.progress = config, dist, device, progress
        self.command_line = command_line
        self.out = Path(config.out_dir)
        self.cache_dir = Path(config.data.cache_dir) if config.data.cache_dir else self.out / "cache"
        self.writer = None

    # ------------------------------------------------------------------ set-up

    def run(self, resume: bool) -> dict:
        cfg = self.config
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        last_path = self.out / LAST
        if self.dist.main and last_path.exists() and not resume:
            raise FileExistsError(f"{self.out} already holds a training run ({LAST}); pass --resume to continue "
                                  f"it or choose another --out folder")
        if self.dist.main:
            self.out.mkdir(parents=True, exist_ok=True)
            remove_partial_outputs(self.out)
            write_json({"config": cfg.to_dict(), "command_line": self.command_line}, self.out / "config.json")
        train_store, val_store = self._prepare_data()
        torch.manual_seed(cfg.seed)
        model = build_model(cfg.model).to(self.device)
        optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay,
                                      betas=cfg.betas)
        if resume and not last_path.exists():
            logger.info("--resume: %s has no %s yet, starting a new run", self.out, LAST)
        state = self._initial_state(model, optimizer, last_path if resume and last_path.exists() else None)
        net = model
        if self.dist.enabled:
            net = torch.nn.parallel.DistributedDataParallel(
                model, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                find_unused_parameters=True)  # the decoder's fc_p is unused, as in the reference
        if self.dist.main:
            self.writer = _tensorboard_writer(self.out / "tensorboard") if cfg.tensorboard else None
        try:
            self._loop(model, net, optimizer, train_store, val_store, state)
        finally:
            if self.writer is not None:
                self.writer.close()
        best = state["best_metric"]
        summary = {"epochs": state["epoch"], "global_step": state["global_step"],
                   "best_epoch": state["best_epoch"], "best_metric": best, "selection": SELECTION_KEYS[cfg.select_on],
                   "last_checkpoint": str(last_path), "best_checkpoint": str(self.out / BEST),
                   "elapsed_seconds": round(state["elapsed_seconds"], 1),
                   "last_metrics": state["history"][-1] if state["history"] else None}
        logger.info("training finished: %s", json.dumps(summary))
        return summary

    def _prepare_data(self) -> tuple[CaseStore, CaseStore]:
        """Preprocess (rank 0 first, the others then find everything cached) and open the case stores."""
        cfg = self.config
        for turn in ("main", "others"):
            if (turn == "main") == self.dist.main:
                splits, description = dataset_splits(cfg.data, self.cache_dir)
                result = prepare_cases(splits["train"] + splits["val"], self.cache_dir, cfg.data.label_map,
                                       workers=cfg.data.workers, progress=self.progress)
            self.dist.barrier()
        ready = {entry.case_id: entry for entry in result.entries}
        used = {split: [ready[c.case_id] for c in splits[split] if c.case_id in ready] for split in ("train", "val")}
        logger.info("%d training and %d validation case(s) ready (%d preprocessed now), %d skipped",
                    len(used["train"]), len(used["val"]), result.computed, len(result.skipped))
        skipped = result.skipped + description["problems"]
        self.data_description = {**description, "skipped": skipped,
                                 "used": {split: [e.case_id for e in used[split]] for split in used}}
        if self.dist.main:
            write_json(skipped, self.out / "skipped.json")
            write_json(self.data_description, self.out / "data.json")
        if not used["train"]:
            raise ValueError(f"no usable training case (dataset {description['root']}, "
                             f"{len(skipped)} skipped: see {self.out / 'skipped.json'})")
        if not used["val"]:
            logger.warning("no validation case: the best checkpoint is selected on the training loss")
        scale = cfg.model.scale_mm
        return (CaseStore(used["train"], scale, cfg.data.memory_cache_mb),
                CaseStore(used["val"], scale, cfg.data.memory_cache_mb))

    def _initial_state(self, model, optimizer, checkpoint: Path | None) -> dict:
        state = {"epoch": 0, "step_in_epoch": 0, "permutation": None, "global_step": 0, "world_size": self.dist.world,
                 "epoch_loss_sum": 0.0, "epoch_loss_count": 0, "history": [], "best_metric": None,
                 "best_epoch": None, "elapsed_seconds": 0.0}
        if checkpoint is None:
            return state
        stored, _, saved = load_training_checkpoint(checkpoint, "cpu")
        if stored.config != self.config.model:
            raise ValueError(f"{checkpoint} holds a model with config {stored.config.to_dict()}, but this run is "
                             f"configured with {self.config.model.to_dict()}; resume with the same model settings")
        if not saved or "optimizer" not in saved:
            raise ValueError(f"{checkpoint} has no training state to resume from")
        model.load_state_dict(stored.state_dict())
        optimizer.load_state_dict(saved["optimizer"])
        for group in optimizer.param_groups:  # the current config's optimiser settings win
            group.update(weight_decay=self.config.weight_decay, betas=self.config.betas)
        restore_rng_state(saved["rng"])
        state.update({key: saved[key] for key in state if key in saved})
        if state["world_size"] != self.dist.world and state["step_in_epoch"]:
            logger.warning("resuming with %d processes instead of %d: epoch %d restarts from its first step",
                           self.dist.world, state["world_size"], state["epoch"] + 1)
            state.update(step_in_epoch=0, permutation=None, epoch_loss_sum=0.0, epoch_loss_count=0)
        state["world_size"] = self.dist.world
        if not self.dist.main:  # rank 0 carries the partial loss sum; the others add theirs
            state.update(epoch_loss_sum=0.0, epoch_loss_count=0)
        logger.info("resumed from %s: epoch %d, step %d of the epoch, %d steps done", checkpoint,
                    state["epoch"] + 1, state["step_in_epoch"], state["global_step"])
        return state

    # ------------------------------------------------------------------ loop

    def _loop(self, model, net, optimizer, train_store: CaseStore, val_store: CaseStore, state: dict) -> None:
        cfg, dist = self.config, self.dist
        in_features = model.encoder.in_features
        steps_per_epoch = math.ceil(len(train_store) / dist.world)
        total_steps = steps_per_epoch * cfg.epochs
        clock = last_note = time.perf_counter()
        while state["epoch"] < cfg.epochs:
            epoch = state["epoch"]
            if state["permutation"] is None:
                state["permutation"] = [int(i) for i in
                                        np.random.default_rng([cfg.seed, epoch]).permutation(len(train_store))]
            mine = _rank_cases(state["permutation"], dist)
            for group in optimizer.param_groups:
                group["lr"] = cfg.learning_rate(epoch)
            epoch_start = time.perf_counter()
            net.train()
            while state["step_in_epoch"] < steps_per_epoch:
                step = state["step_in_epoch"]
                rng = np.random.default_rng([cfg.seed, epoch, step, dist.rank])
                case = train_store[mine[step]]
                points, queries, targets = sample_training_example(
                    case, cfg.n_points, cfg.n_queries, rng, cfg.augment_sigma, cfg.organ_fraction)
                logits = net(torch.from_numpy(points[None, :, :in_features]).to(self.device),
                             torch.from_numpy(queries[None]).to(self.device))
                loss = ce_dice_loss(logits, torch.from_numpy(targets[None]).to(self.device))
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                value = float(loss.detach())
                if not math.isfinite(value):
                    raise FloatingPointError(f"the training loss became {value} at epoch {epoch + 1}, step "
                                             f"{step + 1} (case {case.case_id}); lower the learning rate")
                state["epoch_loss_sum"] += value
                state["epoch_loss_count"] += 1
                state["step_in_epoch"] += 1
                state["global_step"] += 1
                now = time.perf_counter()
                state["elapsed_seconds"] += now - clock
                clock = now
                if self.writer is not None:
                    self.writer.add_scalar("loss/train_step", value, state["global_step"])
                logger.debug("epoch %d step %d case %s loss %.4f", epoch + 1, step + 1, case.case_id, value)
                if now - last_note >= PROGRESS_LOG_SECONDS:
                    last_note = now
                    logger.info("epoch %d/%d, step %d/%d: mean training loss %.4f", epoch + 1, cfg.epochs,
                                step + 1, steps_per_epoch, state["epoch_loss_sum"] / state["epoch_loss_count"])
                report(self.progress, state["global_step"] / (total_steps or 1),
                       f"epoch {epoch + 1}/{cfg.epochs} step {step + 1}/{steps_per_epoch} loss {value:.3f}")
                if state["step_in_epoch"] % cfg.checkpoint_every == 0 and state["step_in_epoch"] < steps_per_epoch:
                    self._save_last(model, optimizer, state, mid_epoch=True)
            train_loss_sum, train_count = dist.sum([state["epoch_loss_sum"], state["epoch_loss_count"]])
            val = self._validate(model, val_store, in_features)
            now = time.perf_counter()
            state["elapsed_seconds"] += now - clock
            clock = now
            row = {"epoch": epoch + 1, "step": state["global_step"],
                   "train_loss": float(train_loss_sum / max(1, train_count)),
                   **val, "lr": optimizer.param_groups[0]["lr"],
                   "epoch_seconds": round(now - epoch_start, 2), "elapsed_seconds": round(state["elapsed_seconds"], 2)}
            state["history"].append(row)
            metric = row.get(SELECTION_KEYS[cfg.select_on])
            metric = -row["train_loss"] if metric is None else float(metric)
            improved = state["best_metric"] is None or metric > state["best_metric"]
            if improved:
                state.update(best_metric=metric, best_epoch=epoch + 1)
            state.update(epoch=epoch + 1, step_in_epoch=0, permutation=None, epoch_loss_sum=0.0,
                         epoch_loss_count=0)
            if dist.main:
                if improved:
                    save_checkpoint(self.out / BEST, model, self._metadata(state))
                self._save_last(model, optimizer, state, mid_epoch=False)
                self._write_logs(state["history"])
            logger.info("epoch %d/%d: %s%s", epoch + 1, cfg.epochs, _format_row(row), " (best)" if improved else "")
            dist.barrier()

    def _validate(self, model, store: CaseStore, in_features: int) -> dict:
        """Validation loss and Dice on this rank's share of the val cases, summed over ranks."""
        cfg, dist = self.config, self.dist
        num_classes = model.config.num_classes
        sums = np.zeros(2 + num_classes)  # loss, count, per-class Dice
        model.eval()
        with torch.no_grad():
            for index in range(dist.rank, len(store), dist.world):
                case = store[index]
                rng = np.random.default_rng([cfg.val_seed, index])
                points = sample_input_points(case, cfg.val_points or cfg.n_points, rng)
                queries, targets = sample_queries(case, cfg.val_queries, rng)
                grid = model.encode(torch.from_numpy(points[None, :, :in_features]).to(self.device))
                logits = torch.cat([model.decode(torch.from_numpy(chunk[None]).to(self.device), grid)[0]
                                    for chunk in np.array_split(queries, math.ceil(len(queries) / 131_072))])
                sums[0] += float(ce_dice_loss(logits[None], torch.from_numpy(targets[None]).to(self.device)))
                sums[1] += 1
                sums[2:] += threshold_dice(torch.softmax(logits, dim=1).cpu().numpy(), targets)
        model.train()
        sums = dist.sum(sums)
        if sums[1] == 0:
            return {}
        dice = sums[2:] / sums[1]
        row = {"val_loss": float(sums[0] / sums[1])}
        row.update({f"val_dice_{name}": float(d) for name, d in zip(CLASS_NAMES, dice)})
        row["val_mean_dice_all"] = float(dice.mean())
        row["val_mean_dice_organs"] = float(dice[1:].mean())
        return row

    # ------------------------------------------------------------------ outputs

    def _metadata(self, state: dict) -> dict:
        cfg = self.config
        return {
            "training_command": self.command_line,
            "training_config": cfg.to_dict(),
            "training_data": self.data_description,
            "training_progress": {"epochs_done": state["epoch"], "global_step": state["global_step"],
                                  "best_epoch": state["best_epoch"], "best_metric": state["best_metric"],
                                  "selection": SELECTION_KEYS[cfg.select_on],
                                  "metrics": state["history"][-1] if state["history"] else None,
                                  "elapsed_seconds": round(state["elapsed_seconds"], 1)},
            "points": {"n_points": cfg.n_points, "sampling": "uniform with replacement from all Canny edge points",
                       "surf": "int8 per column, per volume (reference)"},
        }

    def _save_last(self, model, optimizer, state: dict, mid_epoch: bool) -> None:
        if self.dist.enabled and mid_epoch:
            # rank 0 stores the loss accumulated by every rank so far in this epoch
            loss_sum, count = self.dist.sum([state["epoch_loss_sum"], state["epoch_loss_count"]])
        else:
            loss_sum, count = state["epoch_loss_sum"], state["epoch_loss_count"]
        if not self.dist.main:
            return
        training_state = {**state, "epoch_loss_sum": float(loss_sum), "epoch_loss_count": int(count),
                          "optimizer": optimizer.state_dict(), "rng": capture_rng_state()}
        save_checkpoint(self.out / LAST, model, self._metadata(state), training_state)
        logger.info("saved %s at epoch %d, step %d of the epoch%s", LAST, state["epoch"] + (1 if mid_epoch else 0),
                    state["step_in_epoch"], " (mid-epoch)" if mid_epoch else "")

    def _write_logs(self, history: list) -> None:
        write_csv(history, self.out / METRICS_CSV)
        plot_curves(history, self.out / CURVES_PNG)
        if self.writer is not None:
            row = history[-1]
            for key, value in row.items():
                if key not in ("epoch", "step") and isinstance(value, (int, float)):
                    self.writer.add_scalar(key.replace("val_", "val/").replace("train_", "train/"), value, row["epoch"])
            self.writer.flush()


def _format_row(row: dict) -> str:
    parts = [f"train loss {row['train_loss']:.4f}"]
    if "val_loss" in row:
        parts.append(f"val loss {row['val_loss']:.4f}")
        parts.append("val Dice " + " ".join(f"{name} {row[f'val_dice_{name}']:.3f}" for name in CLASS_NAMES[1:]))
        parts.append(f"organ mean {row['val_mean_dice_organs']:.3f}")
    parts.append(f"{row['epoch_seconds']:.0f} s")
    return ", ".join(parts)


def _tensorboard_writer(folder: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        logger.info("TensorBoard is not installed: logging to metrics.csv and curves.png only")
        return None
    return SummaryWriter(str(folder))


# ============================================================================ curves (no matplotlib)

#: RGB colours of the curves: train loss, val loss / organ-mean Dice, all-class Dice.
_COLOURS = {"train": (31, 119, 180), "val": (255, 127, 14), "organs": (44, 160, 44), "all": (120, 120, 120)}


def plot_curves(history: list, path, width: int = 960, height: int = 400) -> Path:
    """Write a PNG with the loss curves (left) and the validation Dice curves (right) per epoch.

    Drawn with numpy (axes boxes, polylines) and VTK's FreeType text renderer when available; written with
    SimpleITK, atomically. Returns ``path``.
    """
    canvas = np.full((height, width, 3), 255, dtype=np.uint8)
    epochs = np.array([row["epoch"] for row in history], dtype=float)
    panel_w = width // 2
    loss_series = [("train loss", _COLOURS["train"], [row.get("train_loss") for row in history]),
                   ("val loss", _COLOURS["val"], [row.get("val_loss") for row in history])]
    dice_series = [("organ mean Dice", _COLOURS["organs"], [row.get("val_mean_dice_organs") for row in history]),
                   ("all-class Dice", _COLOURS["all"], [row.get("val_mean_dice_all") for row in history])]
    finite = [v for _, _, values in loss_series for v in values if v is not None and math.isfinite(v)]
    loss_top = max(finite) * 1.05 if finite else 1.0
    _panel(canvas, (0, panel_w), epochs, loss_series, (0.0, loss_top), "loss")
    _panel(canvas, (panel_w, width), epochs, dice_series, (0.0, 1.0), "validation Dice")
    path = Path(path)
    with atomic_output(path, ".png") as tmp:
        sitk.WriteImage(sitk.GetImageFromArray(canvas, isVector=True), str(tmp))
    return path


def _panel(canvas, columns, epochs, series, y_range, title) -> None:
    """Draw one panel (box, ticks, curves, legend) into ``canvas[:, columns[0]:columns[1]]``."""
    height = canvas.shape[0]
    left, right = columns[0] + 70, columns[1] - 20
    top, bottom = 40, height - 45
    canvas[top:bottom + 1, [left, right]] = 0
    canvas[[top, bottom], left:right + 1] = 0
    x_low, x_high = (float(epochs.min()), float(epochs.max())) if len(epochs) else (0.0, 1.0)
    if x_high <= x_low:
        x_high = x_low + 1.0
    y_low, y_high = y_range

    def to_pixel(x, y):
        return (left + (x - x_low) / (x_high - x_low) * (right - left),
                bottom - (y - y_low) / (y_high - y_low) * (bottom - top))

    for fraction in (0.0, 0.5, 1.0):
        value = y_low + fraction * (y_high - y_low)
        _, py = to_pixel(x_low, value)
        canvas[int(py), left - 5:left] = 0
        _text(canvas, f"{value:.3g}", left - 8, int(py), align="right")
    for value in sorted({x_low, x_high}):
        px, _ = to_pixel(value, y_low)
        canvas[bottom:bottom + 5, int(px)] = 0
        _text(canvas, f"{value:g}", int(px), bottom + 16, align="centre")
    _text(canvas, "epoch", (left + right) // 2, bottom + 34, align="centre")
    _text(canvas, title, (left + right) // 2, 16, align="centre", bold=True)
    ends = []
    for name, colour, values in series:
        points = [to_pixel(x, y) for x, y in zip(epochs, values) if y is not None and math.isfinite(y)]
        _polyline(canvas, points, colour)
        ends += [py for _, py in points[-3:]]
    # legend in the upper right corner, or the lower one when the curves end in the upper half
    legend_top = bottom - 14 - 18 * len(series) if ends and np.mean(ends) < (top + bottom) / 2 else top + 4
    canvas[legend_top:legend_top + 18 * len(series) + 6, max(left + 1, right - 150):right - 2] = 255
    for rank, (name, colour, _) in enumerate(series):
        _text(canvas, name, right - 10, legend_top + 12 + 18 * rank, align="right", colour=colour)


def _polyline(canvas, points, colour, radius: int = 1) -> None:
    """Draw connected segments (and a dot per vertex) through pixel ``points`` (x, y)."""
    height, width = canvas.shape[:2]
    samples = list(points[:1])
    for (x0, y0), (x1, y1) in zip(points, points[1:]):
        count = int(max(abs(x1 - x0), abs(y1 - y0))) + 2
        samples += list(zip(np.linspace(x0, x1, count), np.linspace(y0, y1, count)))
    for x, y in samples:
        xi, yi = int(round(x)), int(round(y))
        rows = slice(max(0, yi - radius), min(height, yi + radius + 1))
        canvas[rows, max(0, xi - radius):min(width, xi + radius + 1)] = colour
    for x, y in points:
        xi, yi = int(round(x)), int(round(y))
        canvas[max(0, yi - 3):min(height, yi + 4), max(0, xi - 3):min(width, xi + 4)] = colour


def _text(canvas, text: str, x: int, y: int, align: str = "left", colour=(0, 0, 0), bold: bool = False) -> None:
    """Blend ``text`` (vertically centred on row ``y``) into the canvas; skipped if VTK cannot render text."""
    try:
        import vtk
        from vtk.util.numpy_support import vtk_to_numpy
    except ImportError:
        return
    prop = vtk.vtkTextProperty()
    prop.SetFontSize(13)
    prop.SetFontFamilyToArial()
    prop.SetBold(bold)
    prop.SetColor(*(c / 255.0 for c in colour))
    image = vtk.vtkImageData()
    dims = [0, 0]
    if not vtk.vtkTextRenderer().RenderString(prop, text, image, dims, 72):
        return
    nx, ny, _ = image.GetDimensions()
    rgba = vtk_to_numpy(image.GetPointData().GetScalars()).reshape(ny, nx, 4)[::-1][-dims[1]:, :dims[0]]
    h, w = rgba.shape[:2]
    x0 = x - (w if align == "right" else w // 2 if align == "centre" else 0)
    y0 = y - h // 2
    ys, xs = slice(max(0, y0), min(canvas.shape[0], y0 + h)), slice(max(0, x0), min(canvas.shape[1], x0 + w))
    patch = rgba[ys.start - y0:ys.stop - y0, xs.start - x0:xs.stop - x0]
    alpha = patch[..., 3:4].astype(np.float32) / 255.0
    canvas[ys, xs] = (canvas[ys, xs] * (1 - alpha) + patch[..., :3] * alpha).astype(np.uint8)


# ============================================================================ command line

#: Flags that override configuration keys: flag destination → dotted key.
_FLAG_KEYS = {
    "out": "out_dir", "source": "data.source", "data": "data.root", "image_pattern": "data.image_pattern",
    "label_pattern": "data.label_pattern", "label_map": "data.label_map", "split_seed": "data.split_seed",
    "cache_dir": "data.cache_dir", "workers": "data.workers", "grid": "model.grid_resolution",
    "epochs": "epochs", "points": "n_points", "queries": "n_queries", "lr": "lr", "weight_decay": "weight_decay",
    "augment_sigma": "augment_sigma", "organ_fraction": "organ_fraction", "seed": "seed", "device": "device",
    "threads": "threads", "val_queries": "val_queries", "checkpoint_every": "checkpoint_every",
    "select_on": "select_on",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m SCONetLib.train",
        description="Train SCONet (see the SCONetLib.train module and TrainConfig for every setting). A YAML "
                    "--config gives the settings; each flag overrides the YAML key named in its help.")
    parser.add_argument("--config", type=Path, help="YAML file with TrainConfig keys (unknown keys are errors)")
    parser.add_argument("--resume", action="store_true", help="continue the run in --out from its model_last.pt")
    parser.add_argument("--preprocess-only", action="store_true", help="build the preprocessing cache and stop")
    add = parser.add_argument
    add("--out", help="run folder [out_dir]")
    add("--source", choices=["abdomenct1k", "folder", "phantom"], help="dataset kind [data.source]")
    add("--data", help="dataset folder [data.root]")
    add("--image-pattern", help="image path pattern with {id}, for --source folder [data.image_pattern]")
    add("--label-pattern", help="label path pattern with {id}, for --source folder [data.label_pattern]")
    add("--label-map", help="preset (totalsegmentator, btcv, ...) or 'src:dst,...' [data.label_map]")
    add("--split-seed", type=int, help="seed of the split when there are no .lst files [data.split_seed]")
    add("--cache-dir", help="preprocessing cache folder [data.cache_dir]")
    add("--workers", type=int, help="preprocessing worker processes [data.workers]")
    add("--grid", type=int, help="feature grid resolution, 32 (A) or 64 (B) [model.grid_resolution]")
    add("--epochs", type=int, help="[epochs]")
    add("--points", type=int, help="input points per step [n_points]")
    add("--queries", type=int, help="query voxels per step [n_queries]")
    add("--lr", type=float, help="AdamW learning rate [lr]")
    add("--weight-decay", type=float, help="[weight_decay]")
    add("--augment-sigma", type=float, help="random linear transform sigma, object units [augment_sigma]")
    add("--organ-fraction", type=float, help="share of queries near the organs [organ_fraction]")
    add("--seed", type=int, help="[seed]")
    add("--device", help="auto, cpu, cuda or cuda:N [device]")
    add("--threads", type=int, help="torch threads [threads]")
    add("--val-queries", type=int, help="query voxels per validation case [val_queries]")
    add("--checkpoint-every", type=int, help="steps between mid-epoch checkpoints [checkpoint_every]")
    add("--select-on", choices=sorted(SELECTION_KEYS), help="best-checkpoint metric [select_on]")
    return parser


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """The YAML of ``--config`` (if any) with every given flag written over its key, validated."""
    values = load_config(args.config) if args.config else {}
    for dest, key in _FLAG_KEYS.items():
        value = getattr(args, dest)
        if value is None:
            continue
        section, _, name = key.rpartition(".")
        target = values
        if section:
            current = target.get(section)
            if isinstance(current, str) and section == "model":
                current = ModelConfig.preset(current).to_dict()
            target[section] = target = dict(current or {})
        target[name] = value
    return TrainConfig.from_dict(values)


def main(argv=None) -> int:
    """Command line (see :func:`build_parser`); returns the exit status (0 success, 1 error, 2 bad usage)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--"]:
        argv = argv[1:]
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        config = config_from_args(args)
    except (ValueError, TypeError, OSError) as error:
        parser.print_usage(sys.stderr)
        print(f"error: {error}", file=sys.stderr)
        return 2
    rank = int(os.environ.get("RANK", "0"))
    _setup_logging(Path(config.out_dir), rank)
    command = " ".join(["python -m SCONetLib.train"] + [shlex.quote(a) for a in argv])
    try:
        if args.preprocess_only:
            run = _Run(config, _Dist(), resolve_device(config.device), command, None)
            Path(config.out_dir).mkdir(parents=True, exist_ok=True)
            run._prepare_data()
            return 0
        train(config, resume=args.resume, command_line=command,
              progress=_terminal_progress() if rank == 0 else None)
        return 0
    except KeyboardInterrupt:
        logger.error("interrupted; resume with --resume")
        return 130
    except Exception as error:  # the command line reports every failure as one message and a status
        logger.error("training failed: %s: %s", type(error).__name__, error,
                     exc_info=logger.isEnabledFor(logging.DEBUG))
        return 1


_LOG_HANDLERS: list = []


def _setup_logging(out_dir: Path, rank: int) -> None:
    """Log INFO to stderr and (rank 0) to ``out_dir/train.log``; replaces the handlers of a previous call."""
    root = logging.getLogger()
    for handler in _LOG_HANDLERS:
        root.removeHandler(handler)
        handler.close()
    _LOG_HANDLERS.clear()
    root.setLevel(logging.INFO)
    fmt = logging.Formatter(f"%(asctime)s {'[rank %d] ' % rank if rank else ''}%(levelname)s %(message)s",
                            "%H:%M:%S")
    _LOG_HANDLERS.append(logging.StreamHandler(sys.stderr))
    if rank == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
        _LOG_HANDLERS.append(logging.FileHandler(out_dir / "train.log", encoding="utf-8"))
    for handler in _LOG_HANDLERS:
        handler.setFormatter(fmt)
        root.addHandler(handler)


def _terminal_progress() -> ProgressCallback | None:
    """A one-line progress bar on stderr when it is a terminal (logging covers the other cases)."""
    if not sys.stderr.isatty():
        return None

    def show(fraction: float, message: str) -> None:
        filled = int(30 * fraction)
        sys.stderr.write(f"\r[{'#' * filled}{' ' * (30 - filled)}] {100 * fraction:5.1f}% {message[:60]:<60}")
        sys.stderr.flush()

    return show


def _script_entry() -> None:
    """Entry when run as a file (python, Slicer --python-script): always exit with a status (Slicer would
    otherwise keep running)."""
    try:
        status = main()
    except SystemExit as exit_request:  # argparse --help / usage errors
        status = exit_request.code if isinstance(exit_request.code, int) else 2
    except BaseException as error:  # never leave a headless Slicer hanging
        print(f"error: {type(error).__name__}: {error}", file=sys.stderr)
        status = 1
    sys.exit(status)


if __name__ == "__main__":
    _script_entry()
