"""Point encoder of SCONet: a PointNet with local max pooling whose per-point features are averaged into a grid.

The encoder turns a point cloud in the model's object frame into the 80-channel (32 with ``use_surf=False``)
sparse grid that the 3D U-Net (:mod:`SCONetLib.model.unet3d`) turns into the feature grid. It also defines the
unit-cube mapping and the cell indexing shared by the encoder and the decoder.

Reference quirks kept on purpose (they are part of the trained model's definition):

* The local pooling inside the PointNet is a **max** over the points of a grid cell, but the final point → grid
  aggregation is a **mean** (inherited from convolutional occupancy networks; a paper's "max pooling" refers only
  to the former).
* Coordinates outside the unit cube are **clamped** into the border cells (u ≥ 1 → 0.999, u < 0 → 0), i.e. at
  the reference scale everything beyond ±220.2 mm from the volume centre lands in the outer cells.
* The descriptor columns (48 raw, unnormalised SURF values, magnitudes up to ~10³) bypass the PointNet and are
  concatenated to its 32 features before the grid mean; only the coordinates enter the PointNet.
* ``fc_1`` of every residual block is initialised to zero.

References
----------
Peng et al., "Convolutional Occupancy Networks", ECCV 2020. Jouvencel, Kéchichian, Digne, Valette, "SCONet: Convolutional Occupancy Networks for Multi-Organ Segmentation", ISBI 2025; the authors' repository
``github.com/maylis-j/SCONet`` (``src/encoder/pointnet.py``, ``src/common.py``) and ConvONet's
``github.com/autonomousvision/convolutional_occupancy_networks``.
"""
from __future__ import annotations

import torch
from torch import nn

#: Constant added to ``1 + padding`` in the unit-cube mapping (reference value, keeps u strictly below 1 at ±0.5).
UNIT_CUBE_EPS = 0.001
#: Value given to unit coordinates ≥ 1 so that ``floor(R·u)`` stays a valid cell (reference value).
UNIT_CUBE_MAX = 0.999
#: Number of SURF descriptor values per point.
SURF_FEATURES = 48


def normalize_to_unit_cube(p: torch.Tensor, padding: float) -> torch.Tensor:
    """Map object-frame coordinates to the model's unit cube, clamping points outside it.

    Parameters
    ----------
    p : (..., 3) floating tensor
        Coordinates in the model's object frame (``(xyz_ras - centre) / scale_mm``).
    padding : float
        Unit-cube padding of the model (reference 0.1).

    Returns
    -------
    (..., 3) tensor, same dtype and device as ``p``
        ``u = p / (1 + padding + 0.001) + 0.5``, then ``u ≥ 1 → 0.999`` and ``u < 0 → 0``. A new tensor; ``p`` is
        not modified.

    Notes
    -----
    The encoder fills cell ``floor(R·u)`` while the decoder samples the grid at continuous index ``(R − 1)·u``
    (corner-aligned ``grid_sample``), half a cell apart on average. This mismatch belongs to the reference model
    and is kept.
    """
    u = p / (1.0 + padding + UNIT_CUBE_EPS) + 0.5
    u = torch.where(u >= 1.0, torch.full_like(u, UNIT_CUBE_MAX), u)
    return u.clamp_min_(0.0)


def cell_index(p: torch.Tensor, grid_resolution: int, padding: float) -> torch.Tensor:
    """Flat index of the grid cell holding each point.

    Parameters
    ----------
    p : (B, N, 3) floating tensor
        Object-frame coordinates (x, y, z).
    grid_resolution : int
        Cells per axis ``R``.
    padding : float
        Unit-cube padding (see :func:`normalize_to_unit_cube`).

    Returns
    -------
    (B, N) int64 tensor
        ``ix + R·(iy + R·iz)`` with ``i = floor(R·u)`` per axis, in ``[0, R³)``. This is the C-order flat index
        of a ``[z, y, x]`` grid.
    """
    ijk = (normalize_to_unit_cube(p, padding) * grid_resolution).long()
    return ijk[..., 0] + grid_resolution * (ijk[..., 1] + grid_resolution * ijk[..., 2])


class ResnetBlockFC(nn.Module):
    """Fully connected residual block: ``shortcut(x) + fc_1(relu(fc_0(relu(x))))``.

    Parameters
    ----------
    size_in, size_out : int
        Input and output widths. The hidden width is ``min(size_in, size_out)``. When they differ, ``shortcut`` is
        a linear layer without bias; otherwise it is the identity and the block has no ``shortcut`` parameters.

    Notes
    -----
    ``fc_1.weight`` starts at zero (reference initialisation), so a fresh block is ``shortcut(x) + fc_1.bias``.
    """

    def __init__(self, size_in: int, size_out: int):
        super().__init__()
        size_hidden = min(size_in, size_out)
        self.fc_0 = nn.Linear(size_in, size_hidden)
        self.fc_1 = nn.Linear(size_hidden, size_out)
        self.shortcut = nn.Linear(size_in, size_out, bias=False) if size_in != size_out else None
        nn.init.zeros_(self.fc_1.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(..., size_in) → (..., size_out)."""
        dx = self.fc_1(torch.relu(self.fc_0(torch.relu(x))))
        x_s = x if self.shortcut is None else self.shortcut(x)
        return x_s + dx


class PointNetEncoder(nn.Module):
    """PointNet with per-cell max pooling, mean-aggregated into a grid and refined by a 3D U-Net.

    Parameters
    ----------
    unet3d : nn.Module
        Network mapping the (B, ``grid_channels``, R, R, R) sparse grid to the (B, C, R, R, R) feature grid.
    grid_resolution : int
        Cells per axis ``R``.
    padding : float
        Unit-cube padding.
    use_surf : bool
        Whether each point carries 48 SURF values after its coordinates.
    c_dim : int
        Width of the per-point features (reference 32).
    hidden_dim : int
        Width of the residual blocks (reference 32; ``fc_pos`` outputs ``2·hidden_dim``).
    n_blocks : int
        Number of residual blocks (reference 5); every block after the first sees ``[h, cellmax(h)]``.

    Notes
    -----
    Forward pass, for points ``(B, N, 3 + F)``:

    1. ``h = blocks[0](fc_pos(xyz))``; for each later block, ``h = block(concat[h, pooled])`` where ``pooled``
       is the channel-wise max of ``h`` over the points in the same cell, gathered back to each point.
    2. ``f = concat[fc_c(h), descriptors]``, ``c_dim + F`` channels.
    3. Each cell of the R³ grid gets the mean of ``f`` over its points (empty cells 0), layout ``[B, C, z, y, x]``.
    4. ``unet3d`` turns that grid into the feature grid.
    """

    def __init__(self, unet3d: nn.Module, grid_resolution: int, padding: float, use_surf: bool,
                 c_dim: int = 32, hidden_dim: int = 32, n_blocks: int = 5):
        super().__init__()
        self.grid_resolution = grid_resolution
        self.padding = padding
        self.n_descriptors = SURF_FEATURES if use_surf else 0
        self.unet3d = unet3d  # registered first: same state-dict order as the reference
        self.fc_pos = nn.Linear(3, 2 * hidden_dim)
        self.blocks = nn.ModuleList([ResnetBlockFC(2 * hidden_dim, hidden_dim) for _ in range(n_blocks)])
        self.fc_c = nn.Linear(hidden_dim, c_dim)

    @property
    def in_features(self) -> int:
        """Columns per input point: 3 coordinates plus the descriptors."""
        return 3 + self.n_descriptors

    @property
    def grid_channels(self) -> int:
        """Channels of the sparse grid fed to the U-Net (``c_dim`` + descriptors)."""
        return self.fc_c.out_features + self.n_descriptors

    def forward(self, points: torch.Tensor) -> torch.Tensor:
        """Feature grid of a point cloud.

        Parameters
        ----------
        points : (B, N, in_features) tensor, model dtype
            Columns 0–2: object-frame coordinates; then the descriptors.

        Returns
        -------
        (B, C, R, R, R) tensor
            Feature grid, axes ``[z, y, x]``.
        """
        index = self.cell_index(points)
        features = self.point_features(points, index)
        if self.n_descriptors:
            features = torch.cat([features, points[..., 3:]], dim=2)
        return self.unet3d(self.scatter_to_grid(features, index))

    def cell_index(self, points: torch.Tensor) -> torch.Tensor:
        """(B, N, ≥3) points → (B, N) int64 flat cell index (see :func:`cell_index`); reads columns 0–2 only."""
        return cell_index(points[..., :3], self.grid_resolution, self.padding)

    def point_features(self, points: torch.Tensor, index: torch.Tensor | None = None) -> torch.Tensor:
        """Per-point PointNet features (the output of ``fc_c``), before the descriptors are appended.

        Parameters
        ----------
        points : (B, N, ≥3) tensor
            Only columns 0–2 (object-frame coordinates) are read.
        index : (B, N) int64 tensor, optional
            Flat cell of each point; computed with :meth:`cell_index` when omitted.

        Returns
        -------
        (B, N, c_dim) tensor
        """
        if index is None:
            index = self.cell_index(points)
        h = self.blocks[0](self.fc_pos(points[..., :3]))
        for block in self.blocks[1:]:
            h = block(torch.cat([h, self._cell_max(h, index)], dim=2))
        return self.fc_c(h)

    def _cell_max(self, h: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """(B, N, C) features → (B, N, C) channel-wise max over the points of each point's cell."""
        expanded = index.unsqueeze(2).expand_as(h)
        per_cell = h.new_zeros(h.shape[0], self.grid_resolution ** 3, h.shape[2])
        per_cell.scatter_reduce_(1, expanded, h, reduce="amax", include_self=False)
        return per_cell.gather(1, expanded)

    def scatter_to_grid(self, features: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """Average per-point features into the R³ grid.

        Parameters
        ----------
        features : (B, N, C) tensor
            Per-point vectors (PointNet features followed by the descriptors).
        index : (B, N) int64 tensor
            Flat cell of each point (:meth:`cell_index`).

        Returns
        -------
        (B, C, R, R, R) tensor
            Mean of the vectors of each cell's points (sum / count), 0 in empty cells; axes ``[z, y, x]``.
        """
        batch, _, channels = features.shape
        cells = self.grid_resolution ** 3
        sums = features.new_zeros(batch, cells, channels)
        sums.scatter_add_(1, index.unsqueeze(2).expand_as(features), features)
        counts = features.new_zeros(batch, cells)
        counts.scatter_add_(1, index, torch.ones_like(index, dtype=features.dtype))
        mean = sums / counts.clamp(min=1.0).unsqueeze(2)
        r = self.grid_resolution
        return mean.transpose(1, 2).reshape(batch, channels, r, r, r)
