"""Training SCONet (reference §3): one case per step, CE + Dice loss, AdamW, validation Dice every epoch.

:func:`train` runs a :class:`TrainConfig` (see :mod:`SCONetLib.train_config`); the command line
``python -m SCONetLib.train`` (also ``sconet-train``, ``Slicer --python-script SCONetLib/train.py -- …`` and
``torchrun --nproc_per_node=N -m SCONetLib.train …``) is in :mod:`SCONetLib.cli`.

What one step does (:meth:`Trainer._train_step`)
------------------------------------------------
1. Take the next training case of this epoch's seeded permutation (each DDP rank takes every ``world``-th case).
2. Draw ``n_points`` of its cached edge points and ``n_queries`` of its voxels, uniformly with replacement
   (:func:`SCONetLib.data.sample_training_example`), map them to the object frame and apply the same random
   linear transform ``p @ M + t`` (``M = I + N(0, σ²)``, ``t ~ N(0, σ²)``, σ = 0.1) to both.
3. ``loss = CE + Dice`` (:func:`ce_dice_loss`), one AdamW step (lr 1e-4, weight decay 0 by default, constant).

After each epoch (:meth:`Trainer._end_epoch`): validation on the val cases (fixed points and a fixed seed-100 set
of query voxels, no augmentation): loss and per-class Dice of the 0.5-thresholded softmax (background included,
the reference's selection metric) and the organ-only mean Dice (what the best checkpoint is selected on by
default).

Outputs in the run folder (only rank 0 writes): ``model_last.pt`` (every epoch and every ``checkpoint_every``
steps, with the full training state, so ``--resume`` continues exactly where the run stopped), ``model_best.pt``,
``metrics.csv``, ``curves.png``, ``config.json``, ``train.log``, ``skipped.json`` and, if TensorBoard is
installed, ``tensorboard/``. Every file is written atomically.
"""
from __future__ import annotations

import dataclasses
import datetime
import json
import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F

from .checkpoint import (capture_rng_state, load_checkpoint, load_training_checkpoint, restore_rng_state,
                         save_checkpoint)
from .data import (CaseStore, PhantomStream, dataset_splits, prepare_cases, sample_input_points, sample_queries,
                   sample_training_example)
from .device import resolve_device
from .figures import png_output, training_curves
from .infer import CPU_CHUNK
from .io import csv_text, remove_partial_outputs, text_output, write_json, write_outputs
from .labels import CLASS_NAMES
from .metrics import threshold_dice
from .model import build_model
from .progress import ProgressCallback, report
from .train_config import SELECTION_KEYS, TrainConfig

logger = logging.getLogger("SCONetLib.train")

#: File names in the run folder.
LAST, BEST, METRICS_CSV, CURVES_PNG = "model_last.pt", "model_best.pt", "metrics.csv", "curves.png"
#: Timeout of collective operations (rank 0 may preprocess a whole dataset while the others wait).
DIST_TIMEOUT_HOURS = 12
#: Seconds between progress lines in the log during an epoch.
PROGRESS_LOG_SECONDS = 60.0


# ============================================================================ loss

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


# ============================================================================ distributed context

@dataclass(frozen=True)
class Dist:
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


def init_distributed(device_name: str) -> tuple[Dist, torch.device]:
    """Join the process group if torchrun set WORLD_SIZE > 1; pick this process's device."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    dist = Dist(int(os.environ.get("RANK", "0")), world, int(os.environ.get("LOCAL_RANK", "0")))
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


def _rank_cases(permutation: list, dist: Dist) -> list:
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
        No usable training case, a resumed checkpoint built for another model configuration, or a device that
        this machine does not have (checked here, not when the configuration is validated).
    """
    dist, device = init_distributed(config.device)
    try:
        return Trainer(config, dist, device, command_line, progress).run(resume)
    finally:
        if dist.enabled and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


@dataclass
class TrainState:
    """Where a training run stands; saved in ``model_last.pt`` (as plain data) so that a resumed run continues
    exactly.

    Attributes
    ----------
    epoch : int, epochs completed (0-based index of the current epoch).
    step_in_epoch : int, steps of the current epoch done by this rank.
    permutation : list of int or None, the current epoch's order of the training cases (None: not drawn yet).
    global_step : int, steps done in all.
    world_size : int, processes of the run that saved the state.
    epoch_loss_sum, epoch_loss_count : float, int, training loss summed over the current epoch's steps so far.
    history : list of dict, one ``metrics.csv`` row per completed epoch.
    best_metric : float or None, best selection metric so far; best_epoch : int or None, its 1-based epoch.
    elapsed_seconds : float, training time so far (steps and validation, not preprocessing).
    """

    epoch: int = 0
    step_in_epoch: int = 0
    permutation: Optional[list] = None
    global_step: int = 0
    world_size: int = 1
    epoch_loss_sum: float = 0.0
    epoch_loss_count: int = 0
    history: list = field(default_factory=list)
    best_metric: Optional[float] = None
    best_epoch: Optional[int] = None
    elapsed_seconds: float = 0.0

    def start_epoch_accumulation(self) -> None:
        """Forget the current epoch's position and loss sum (a new epoch, or a resumed one started afresh)."""
        self.step_in_epoch, self.permutation, self.epoch_loss_sum, self.epoch_loss_count = 0, None, 0.0, 0

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_saved(cls, saved: dict) -> "TrainState":
        """The state stored in a checkpoint's training state (other entries of ``saved`` are ignored)."""
        return cls(**{f.name: saved[f.name] for f in dataclasses.fields(cls) if f.name in saved})


class Trainer:
    """One training process (see :func:`train`): data, model, optimizer, and the loop over a :class:`TrainState`."""

    def __init__(self, config: TrainConfig, dist: Dist, device: torch.device, command_line: str | None,
                 progress: ProgressCallback | None):
        self.config, self.dist, self.device, self.progress = config, dist, device, progress
        self.command_line = command_line
        self.out = Path(config.out_dir)
        self.cache_dir = Path(config.data.cache_dir) if config.data.cache_dir else self.out / "cache"
        self.writer = None
        self._clock = self._last_note = 0.0

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
        train_store, val_store = self.prepare_data()
        torch.manual_seed(cfg.seed)
        model = build_model(cfg.model).to(self.device)
        optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay,
                                      betas=cfg.betas)
        if resume and not last_path.exists():
            logger.info("--resume: %s has no %s yet, starting a new run", self.out, LAST)
        state = self._initial_state(model, optimizer, last_path if resume and last_path.exists() else None)
        if cfg.init_weights and state.global_step == 0:
            self._load_initial_weights(model)
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
            if self.stream is not None:
                self.stream.close()
        summary = {"epochs": state.epoch, "global_step": state.global_step,
                   "best_epoch": state.best_epoch, "best_metric": state.best_metric,
                   "selection": SELECTION_KEYS[cfg.select_on],
                   "last_checkpoint": str(last_path), "best_checkpoint": str(self.out / BEST),
                   "elapsed_seconds": round(state.elapsed_seconds, 1),
                   "last_metrics": state.history[-1] if state.history else None}
        logger.info("training finished: %s", json.dumps(summary))
        return summary

    def prepare_data(self) -> tuple[CaseStore, CaseStore]:
        """Preprocess (rank 0 first, the others then find everything cached) and open the case stores."""
        cfg = self.config
        for turn in ("main", "others"):
            if (turn == "main") == self.dist.main:
                splits, description = dataset_splits(cfg.data, self.cache_dir)
                result = prepare_cases(splits["train"] + splits["val"], self.cache_dir, cfg.data.label_map,
                                       workers=cfg.data.workers, progress=self.progress)
            self.dist.barrier()
        self.stream = None
        if cfg.data.stream is not None:
            self.stream = PhantomStream(cfg.data.stream, cfg.model.scale_mm, cfg.data.workers)
            logger.info("training on a stream of phantoms: %s", json.dumps(self.stream.section))
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
        if not used["train"] and self.stream is None:
            raise ValueError(f"no usable training case (dataset {description['root']}, "
                             f"{len(skipped)} skipped: see {self.out / 'skipped.json'})")
        if not used["val"]:
            logger.warning("no validation case: the best checkpoint is selected on the training loss")
        scale = cfg.model.scale_mm
        train_store = self.stream or CaseStore(used["train"], scale, cfg.data.memory_cache_mb)
        return train_store, CaseStore(used["val"], scale, cfg.data.memory_cache_mb)

    def _load_initial_weights(self, model) -> None:
        """Start a new run from ``init_weights`` (same model settings)."""
        start, _ = load_checkpoint(self.config.init_weights, "cpu")
        if start.config != self.config.model:
            raise ValueError(f"init_weights {self.config.init_weights} holds a model with config "
                             f"{start.config.to_dict()}, not {self.config.model.to_dict()}")
        model.load_state_dict(start.state_dict())
        logger.info("initial weights from %s", self.config.init_weights)

    def _initial_state(self, model, optimizer, checkpoint: Path | None) -> TrainState:
        state = TrainState(world_size=self.dist.world)
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
        state = TrainState.from_saved(saved)
        if state.world_size != self.dist.world and state.step_in_epoch:
            logger.warning("resuming with %d processes instead of %d: epoch %d restarts from its first step",
                           self.dist.world, state.world_size, state.epoch + 1)
            state.start_epoch_accumulation()
        state.world_size = self.dist.world
        if not self.dist.main:  # rank 0 carries the partial loss sum; the others add theirs
            state.epoch_loss_sum, state.epoch_loss_count = 0.0, 0
        logger.info("resumed from %s: epoch %d, step %d of the epoch, %d steps done", checkpoint,
                    state.epoch + 1, state.step_in_epoch, state.global_step)
        return state

    # ------------------------------------------------------------------ loop

    def _loop(self, model, net, optimizer, train_store: CaseStore, val_store: CaseStore, state: TrainState) -> None:
        cfg, dist = self.config, self.dist
        steps_per_epoch = math.ceil(len(train_store) / dist.world)
        self._clock = self._last_note = time.perf_counter()
        while state.epoch < cfg.epochs:
            if state.permutation is None:
                state.permutation = [int(i) for i in
                                     np.random.default_rng([cfg.seed, state.epoch]).permutation(len(train_store))]
            mine = _rank_cases(state.permutation, dist)
            if isinstance(train_store, PhantomStream):
                train_store.set_epoch(state.epoch)
            for group in optimizer.param_groups:
                group["lr"] = cfg.learning_rate(state.epoch)
            epoch_start = time.perf_counter()
            net.train()
            while state.step_in_epoch < steps_per_epoch:
                self._train_step(model, net, optimizer, train_store[mine[state.step_in_epoch]], state,
                                 steps_per_epoch)
            self._end_epoch(model, optimizer, val_store, state, epoch_start)

    def _train_step(self, model, net, optimizer, case, state: TrainState, steps_per_epoch: int) -> None:
        """One optimisation step on ``case``; advances ``state`` and saves ``model_last.pt`` every
        ``checkpoint_every`` steps of an epoch."""
        cfg = self.config
        epoch, step = state.epoch, state.step_in_epoch
        rng = np.random.default_rng([cfg.seed, epoch, step, self.dist.rank])
        points, queries, targets = sample_training_example(
            case, cfg.n_points, cfg.n_queries, rng, cfg.augment_sigma, cfg.organ_fraction)
        logits = net(torch.from_numpy(points[None, :, :model.encoder.in_features]).to(self.device),
                     torch.from_numpy(queries[None]).to(self.device))
        loss = ce_dice_loss(logits, torch.from_numpy(targets[None]).to(self.device))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        value = float(loss.detach())
        if not math.isfinite(value):
            raise FloatingPointError(f"the training loss became {value} at epoch {epoch + 1}, step "
                                     f"{step + 1} (case {case.case_id}); lower the learning rate")
        state.epoch_loss_sum += value
        state.epoch_loss_count += 1
        state.step_in_epoch += 1
        state.global_step += 1
        now = time.perf_counter()
        state.elapsed_seconds += now - self._clock
        self._clock = now
        if self.writer is not None:
            self.writer.add_scalar("loss/train_step", value, state.global_step)
        logger.debug("epoch %d step %d case %s loss %.4f", epoch + 1, step + 1, case.case_id, value)
        if now - self._last_note >= PROGRESS_LOG_SECONDS:
            self._last_note = now
            logger.info("epoch %d/%d, step %d/%d: mean training loss %.4f", epoch + 1, cfg.epochs,
                        step + 1, steps_per_epoch, state.epoch_loss_sum / state.epoch_loss_count)
        report(self.progress, state.global_step / (steps_per_epoch * cfg.epochs or 1),
               f"epoch {epoch + 1}/{cfg.epochs} step {step + 1}/{steps_per_epoch} loss {value:.3f}")
        if state.step_in_epoch % cfg.checkpoint_every == 0 and state.step_in_epoch < steps_per_epoch:
            self._save_last(model, optimizer, state, mid_epoch=True)

    def _end_epoch(self, model, optimizer, val_store: CaseStore, state: TrainState, epoch_start: float) -> None:
        """Validate, log the epoch's row, keep the best checkpoint, save ``model_last.pt``, start the next epoch."""
        cfg, dist = self.config, self.dist
        epoch = state.epoch
        train_loss_sum, train_count = dist.sum([state.epoch_loss_sum, state.epoch_loss_count])
        val = self._validate(model, val_store)
        now = time.perf_counter()
        state.elapsed_seconds += now - self._clock
        self._clock = now
        row = {"epoch": epoch + 1, "step": state.global_step,
               "train_loss": float(train_loss_sum / max(1, train_count)),
               **val, "lr": optimizer.param_groups[0]["lr"],
               "epoch_seconds": round(now - epoch_start, 2), "elapsed_seconds": round(state.elapsed_seconds, 2)}
        state.history.append(row)
        metric = row.get(SELECTION_KEYS[cfg.select_on])
        metric = -row["train_loss"] if metric is None else float(metric)
        improved = state.best_metric is None or metric > state.best_metric
        if improved:
            state.best_metric, state.best_epoch = metric, epoch + 1
        state.epoch = epoch + 1
        state.start_epoch_accumulation()
        if dist.main:
            if improved:
                save_checkpoint(self.out / BEST, model, self._metadata(state))
            self._save_last(model, optimizer, state, mid_epoch=False)
            self._write_logs(state.history)
        logger.info("epoch %d/%d: %s%s", epoch + 1, cfg.epochs, _format_row(row), " (best)" if improved else "")
        if self.stream is not None:
            logger.info("phantom stream: %s", json.dumps(self.stream.throughput))
        dist.barrier()

    def _validate(self, model, store: CaseStore) -> dict:
        """Validation loss and Dice on this rank's share of the val cases, summed over ranks."""
        cfg, dist = self.config, self.dist
        in_features = model.encoder.in_features
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
                                    for chunk in np.array_split(queries, math.ceil(len(queries) / CPU_CHUNK))])
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

    def _metadata(self, state: TrainState) -> dict:
        cfg = self.config
        return {
            "training_command": self.command_line,
            "training_config": cfg.to_dict(),
            "training_data": self.data_description,
            "training_progress": {"epochs_done": state.epoch, "global_step": state.global_step,
                                  "best_epoch": state.best_epoch, "best_metric": state.best_metric,
                                  "selection": SELECTION_KEYS[cfg.select_on],
                                  "metrics": state.history[-1] if state.history else None,
                                  "elapsed_seconds": round(state.elapsed_seconds, 1)},
            "training_stream": self.stream.describe(state.epoch) if self.stream is not None else None,
            "points": {"n_points": cfg.n_points, "sampling": "uniform with replacement from all Canny edge points",
                       "surf": "int8 per column, per volume (reference)"},
        }

    def _save_last(self, model, optimizer, state: TrainState, mid_epoch: bool) -> None:
        if self.dist.enabled and mid_epoch:
            # rank 0 stores the loss accumulated by every rank so far in this epoch
            loss_sum, count = self.dist.sum([state.epoch_loss_sum, state.epoch_loss_count])
        else:
            loss_sum, count = state.epoch_loss_sum, state.epoch_loss_count
        if not self.dist.main:
            return
        training_state = {**state.to_dict(), "epoch_loss_sum": float(loss_sum), "epoch_loss_count": int(count),
                          "optimizer": optimizer.state_dict(), "rng": capture_rng_state()}
        save_checkpoint(self.out / LAST, model, self._metadata(state), training_state)
        logger.info("saved %s at epoch %d, step %d of the epoch%s", LAST, state.epoch + (1 if mid_epoch else 0),
                    state.step_in_epoch, " (mid-epoch)" if mid_epoch else "")

    def _write_logs(self, history: list) -> None:
        write_outputs([text_output(csv_text(history), self.out / METRICS_CSV),
                       png_output(training_curves(history), self.out / CURVES_PNG)])
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
