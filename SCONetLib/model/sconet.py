"""SCONet: point encoder + 3D U-Net feature grid + implicit decoder, with its configuration and weight loading.

``SCONet.encode(points)`` runs once per volume and gives the feature grid; ``SCONet.decode(queries, grid)`` can
then run on any number of query chunks (any output spacing) with the same grid. Parameter names equal the
reference's (``decoder.*``, ``encoder.*``, ``encoder.unet3d.*``), so reference weights load with
:func:`load_reference_state_dict` without renaming.
"""
from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import Mapping

import numpy as np
import torch
from torch import nn

from ..validate import check_int, check_keys, check_number
from ..geometry import DEFAULT_PADDING, DEFAULT_SCALE_MM
from .decoder import LocalDecoder
from .encoder import SURF_FEATURES, PointNetEncoder
from .unet3d import UNet3D

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelConfig:
    """Everything needed to rebuild a SCONet network (stored in every checkpoint).

    Attributes
    ----------
    grid_resolution : int
        Feature-grid cells per axis R (preset "A": 32, "B": 64). Must be a multiple of ``2**(num_levels - 1)``.
    num_classes : int
        Output classes (5: background, liver, kidneys, spleen, pancreas).
    use_surf : bool
        Whether each input point carries 48 SURF values after its 3 coordinates.
    scale_mm : float
        Millimetres per object-frame unit used to build the inputs (reference 400). The network itself never
        uses it; it travels with the weights so that inputs are built as during training.
    padding : float
        Unit-cube padding (reference 0.1): the grid covers ``|p| ≤ 0.5·(1 + padding + 0.001)``.
    c_dim, hidden_dim, n_blocks, f_maps, num_levels, num_groups, decoder_hidden : int
        Layer sizes, fixed by the reference (32, 32, 5, 32, 3, 1, 32): feature-grid channels, PointNet block
        width, residual blocks in the PointNet and in the decoder, U-Net top width, U-Net levels, GroupNorm
        groups, decoder block width.
    """

    grid_resolution: int = 32
    num_classes: int = 5
    use_surf: bool = True
    scale_mm: float = DEFAULT_SCALE_MM
    padding: float = DEFAULT_PADDING
    c_dim: int = 32
    hidden_dim: int = 32
    n_blocks: int = 5
    f_maps: int = 32
    num_levels: int = 3
    num_groups: int = 1
    decoder_hidden: int = 32

    def __post_init__(self):
        for field in dataclasses.fields(self):
            if field.type == "int":
                check_int(f"ModelConfig.{field.name}", getattr(self, field.name))
            if field.type == "float":
                check_number(f"ModelConfig.{field.name}", getattr(self, field.name))
        if not isinstance(self.use_surf, bool):
            raise ValueError(f"ModelConfig.use_surf must be True or False, got {self.use_surf!r}")
        if self.num_classes < 2:
            raise ValueError(f"ModelConfig.num_classes must be at least 2, got {self.num_classes}")
        if self.scale_mm <= 0 or self.padding < 0:
            raise ValueError(f"ModelConfig needs scale_mm > 0 and padding >= 0, got scale_mm={self.scale_mm!r}, "
                             f"padding={self.padding!r}")
        step = 2 ** (self.num_levels - 1)
        if self.grid_resolution % step:
            raise ValueError(f"ModelConfig.grid_resolution must be a multiple of {step} for a {self.num_levels}-level "
                             f"U-Net, got {self.grid_resolution}")
        if self.c_dim % self.num_groups or self.f_maps % self.num_groups:
            raise ValueError(f"ModelConfig.num_groups ({self.num_groups}) must divide c_dim ({self.c_dim}) and "
                             f"f_maps ({self.f_maps})")

    def to_dict(self) -> dict:
        """Plain ``{field: value}`` dict (ints, floats, bools), JSON-serialisable."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: Mapping) -> "ModelConfig":
        """Config from a dict such as :meth:`to_dict` produced; missing keys take the defaults.

        Raises
        ------
        ValueError
            If ``values`` has a key that is not a field (a typo must not be silently ignored), or a bad value.
        """
        return cls(**check_keys(values, (field.name for field in dataclasses.fields(cls)), "ModelConfig"))

    @classmethod
    def preset(cls, name: str) -> "ModelConfig":
        """Named configuration: "A" (32³ grid, the paper's model) or "B" (64³ grid)."""
        try:
            return MODEL_PRESETS[name]
        except KeyError:
            raise ValueError(f"unknown model preset {name!r}; expected one of {sorted(MODEL_PRESETS)}") from None


#: Named configurations. Both have 1,255,493 parameters (the convolutions do not depend on the grid size).
MODEL_PRESETS = {"A": ModelConfig(grid_resolution=32), "B": ModelConfig(grid_resolution=64)}


class SCONet(nn.Module):
    """The SCONet network.

    Parameters
    ----------
    grid_resolution, num_classes, use_surf, scale_mm, padding, **sizes
        Fields of :class:`ModelConfig` (``sizes``: the fixed layer sizes, normally left at their defaults).

    Attributes
    ----------
    config : ModelConfig
        The configuration the network was built from.
    encoder : PointNetEncoder
        Points → feature grid (its ``unet3d`` attribute is the U-Net).
    decoder : LocalDecoder
        Feature grid + queries → logits.

    Notes
    -----
    There is no dropout or batch norm, so train and eval modes compute the same thing. All inputs and outputs are
    tensors on the model's device; nothing here assumes CPU.
    """

    def __init__(self, grid_resolution: int = 32, num_classes: int = 5, use_surf: bool = True,
                 scale_mm: float = DEFAULT_SCALE_MM, padding: float = DEFAULT_PADDING, **sizes):
        super().__init__()
        cfg = ModelConfig.from_dict(dict(grid_resolution=grid_resolution, num_classes=num_classes,
                                         use_surf=use_surf, scale_mm=scale_mm, padding=padding, **sizes))
        self.config = cfg
        # decoder first: same state-dict order as the reference
        self.decoder = LocalDecoder(cfg.num_classes, cfg.padding, c_dim=cfg.c_dim, hidden_size=cfg.decoder_hidden,
                                    n_blocks=cfg.n_blocks)
        grid_channels = cfg.c_dim + (SURF_FEATURES if cfg.use_surf else 0)
        unet3d = UNet3D(grid_channels, cfg.c_dim, f_maps=cfg.f_maps, num_levels=cfg.num_levels,
                        num_groups=cfg.num_groups)
        self.encoder = PointNetEncoder(unet3d, cfg.grid_resolution, cfg.padding, cfg.use_surf, c_dim=cfg.c_dim,
                                       hidden_dim=cfg.hidden_dim, n_blocks=cfg.n_blocks)

    def forward(self, points: torch.Tensor, queries: torch.Tensor) -> torch.Tensor:
        """``decode(queries, encode(points))``: (B, N, in_features), (B, M, 3) → (B, M, num_classes) logits."""
        return self.decode(queries, self.encode(points))

    def encode(self, points: torch.Tensor) -> torch.Tensor:
        """Feature grid of a batch of point clouds.

        Parameters
        ----------
        points : (B, N, 51) tensor, the model's dtype (float32), N ≥ 1
            Columns 0–2: coordinates in the object frame; columns 3–50: the 48 SURF values. ``(B, N, 3)`` when
            the model was built with ``use_surf=False``.

        Returns
        -------
        (B, c_dim, R, R, R) tensor
            Feature grid, axes ``[z, y, x]`` of the unit cube.
        """
        _check_points("points", points, self.encoder.in_features, self.decoder.fc_out.weight.dtype)
        return self.encoder(points)

    def decode(self, queries: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
        """Class logits at query points, for a grid from :meth:`encode`.

        Call it repeatedly on chunks of queries with the same grid to bound memory; each call is independent
        (nothing is cached) and works under ``torch.inference_mode()``.

        Parameters
        ----------
        queries : (B, M, 3) floating tensor
            Object-frame coordinates (x, y, z). Points outside the grid's cube get the border features.
        grid : (B, c_dim, R, R, R) tensor
            Output of :meth:`encode` (same B).

        Returns
        -------
        (B, M, num_classes) tensor
            Unnormalised class scores.
        """
        _check_points("queries", queries, 3, None)
        cfg = self.config
        expected = (queries.shape[0], cfg.c_dim) + (cfg.grid_resolution,) * 3
        if not isinstance(grid, torch.Tensor) or tuple(grid.shape) != expected:
            shape = tuple(grid.shape) if isinstance(grid, torch.Tensor) else type(grid).__name__
            raise ValueError(f"grid must have shape {expected} (batch of queries, c_dim, R, R, R), got {shape}")
        return self.decoder(queries, grid)


def _check_points(name: str, points, columns: int, dtype: torch.dtype | None) -> None:
    """Raise ``TypeError``/``ValueError`` unless ``points`` is a finite (B, N, columns) floating tensor."""
    if not isinstance(points, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(points).__name__}")
    if points.ndim != 3 or points.shape[2] != columns or points.shape[0] < 1 or points.shape[1] < 1:
        raise ValueError(f"{name} must have shape (B, N, {columns}) with B, N >= 1, got {tuple(points.shape)}")
    if not points.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {points.dtype}")
    if dtype is not None and points.dtype != dtype:
        raise TypeError(f"{name} must have the model's dtype {dtype}, got {points.dtype}")
    if not bool(torch.isfinite(points[..., :3]).all()):
        raise ValueError(f"{name} has NaN or infinite coordinates")


def build_model(config: ModelConfig | str) -> SCONet:
    """The one place that turns a configuration (a :class:`ModelConfig` or a preset name "A"/"B") into a SCONet."""
    if isinstance(config, str):
        config = ModelConfig.preset(config)
    if not isinstance(config, ModelConfig):
        raise TypeError(f"config must be a ModelConfig or a preset name, got {type(config).__name__}")
    return SCONet(**config.to_dict())


def load_reference_state_dict(model: nn.Module, tensors: Mapping) -> None:
    """Load weights given under the reference's parameter names, after checking they fit exactly.

    Parameters
    ----------
    model : SCONet (or any module)
        Receives the weights in place (values are copied and cast to the model's dtype and device).
    tensors : mapping of str to numpy array or tensor
        Reference parameter names (``decoder.fc_c.0.weight``, ``encoder.unet3d.final_conv.bias`` …), e.g. a
        reference checkpoint's ``"model"`` entry, or the ``param/*`` arrays of the golden file without the prefix.

    Raises
    ------
    ValueError
        Listing every missing key, unexpected key, shape mismatch and non-finite tensor, if any.
    TypeError
        If a value is not an array or tensor.
    """
    expected = model.state_dict()
    problems = []
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing:
        problems.append(f"missing keys {missing}")
    if unexpected:
        problems.append(f"unexpected keys {unexpected}")
    converted = {}
    for key in sorted(set(expected) & set(tensors)):
        value = tensors[key]
        if isinstance(value, np.ndarray):
            value = torch.tensor(value)  # a copy: works for read-only arrays too
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"weight {key!r} must be a numpy array or tensor, got {type(value).__name__}")
        if tuple(value.shape) != tuple(expected[key].shape):
            problems.append(f"{key}: shape {tuple(value.shape)}, expected {tuple(expected[key].shape)}")
        elif value.is_floating_point() and not bool(torch.isfinite(value).all()):
            problems.append(f"{key}: contains NaN or infinite values")
        converted[key] = value
    if problems:
        raise ValueError("weights do not fit this model: " + "; ".join(problems))
    model.load_state_dict(converted, strict=True)
    logger.debug("loaded %d weight tensors", len(converted))
