"""Configuration of a training run: :class:`TrainConfig` (a YAML file's keys, validated) and :func:`load_config`.

The training itself is :func:`SCONetLib.train_loop.train`; the command line ``python -m SCONetLib.train`` is in
:mod:`SCONetLib.cli`.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping


from .data import DataConfig
from .device import check_device_name
from .model import ModelConfig
from .validate import check_int, check_keys, check_number

#: Metric the best checkpoint is selected on, by ``select_on``.
SELECTION_KEYS = {"organs": "val_mean_dice_organs", "all": "val_mean_dice_all"}


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
        ``"auto"``, ``"cpu"``, ``"cuda"``, ``"cuda:N"`` (under torchrun with CUDA: the local rank's GPU). Only the
        name is checked here; whether the device exists is checked when training starts.
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
    init_weights : str or None
        Checkpoint whose weights start a new run (fine-tuning; same model settings); ``--resume`` ignores it.
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
    init_weights: str | None = None

    def __post_init__(self):
        if not self.out_dir:
            raise ValueError("out_dir (the run folder) is required: set it in the YAML or pass --out DIR")
        for name in ("epochs", "n_points", "n_queries", "val_queries", "checkpoint_every"):
            check_int(name, getattr(self, name))
        for name in ("threads", "val_points"):
            check_int(name, getattr(self, name), allow_none=True)
        check_int("seed", self.seed, 0)
        check_int("val_seed", self.val_seed, 0)
        check_number("lr", self.lr, 0.0, low_open=True)
        check_number("weight_decay", self.weight_decay, 0.0)
        check_number("augment_sigma", self.augment_sigma, 0.0, 1.0)
        check_number("organ_fraction", self.organ_fraction, 0.0, 1.0)
        milestones = tuple(self.lr_milestones)
        for milestone in milestones:
            check_int("lr_milestones entries", milestone)
        if list(milestones) != sorted(set(milestones)):
            raise ValueError(f"lr_milestones must be increasing epoch numbers, got {self.lr_milestones!r}")
        object.__setattr__(self, "lr_milestones", milestones)
        check_number("lr_gamma", self.lr_gamma, 0.0, 1.0, low_open=True)
        betas = tuple(self.betas)
        if len(betas) != 2:
            raise ValueError(f"betas must be two numbers in [0, 1), got {self.betas!r}")
        object.__setattr__(self, "betas", tuple(check_number("betas entries", b, 0.0, 1.0, high_open=True)
                                                for b in betas))
        if self.select_on not in SELECTION_KEYS:
            raise ValueError(f"select_on must be one of {sorted(SELECTION_KEYS)}, got {self.select_on!r}")
        if not isinstance(self.tensorboard, bool):
            raise ValueError(f"tensorboard must be true or false, got {self.tensorboard!r}")
        check_device_name(self.device)  # the name only: the device is looked for when training starts

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


def load_config(path) -> dict:
    """The mapping in a YAML file (not yet validated; see :meth:`TrainConfig.from_dict`).

    PyYAML is imported here, not at module level: only training reads YAML, and the Slicer module's inference
    path must not need it (3D Slicer does not bundle PyYAML)."""
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
