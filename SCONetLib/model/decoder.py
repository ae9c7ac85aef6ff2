"""Implicit decoder of SCONet: feature grid sampled at query points → per-class logits.

Reference quirks kept on purpose (the authors' ``github.com/maylis-j/SCONet``, ``src/sconet/models/decoder.py``,
from ConvONet's ``github.com/autonomousvision/convolutional_occupancy_networks``):

* The grid is sampled **trilinearly with corner-aligned indexing** (``grid_sample`` with ``align_corners=True``,
  ``padding_mode="border"``) at ``2u − 1``, i.e. at continuous index ``(R − 1)·u``, whereas the encoder filled
  cell ``floor(R·u)``: a half-cell mismatch inherited from convolutional occupancy networks.
* The sample coordinates are ordered (x, y, z) and index the grid's (W, H, D) = (x, y, z) axes.
* ``fc_p`` (Linear(3, hidden)) is **created but never used**: the query position reaches the decoder only through
  the interpolation. It stays so that reference state dicts load and parameter counts match (128 parameters that
  never receive a gradient).
* ``fc_1`` of every residual block is initialised to zero.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .encoder import ResnetBlockFC, normalize_to_unit_cube


class LocalDecoder(nn.Module):
    """Occupancy decoder: ``net = 0; net = block_i(net + fc_c_i(f))`` for each block, ``logits = fc_out(relu(net))``.

    Parameters
    ----------
    num_classes : int
        Output logits per query (reference 5).
    padding : float
        Unit-cube padding, the same as the encoder's.
    c_dim : int
        Channels of the feature grid (reference 32).
    hidden_size : int
        Width of the residual blocks (reference 32).
    n_blocks : int
        Number of residual blocks (reference 5).
    """

    def __init__(self, num_classes: int, padding: float, c_dim: int = 32, hidden_size: int = 32, n_blocks: int = 5):
        super().__init__()
        self.padding = padding
        self.fc_c = nn.ModuleList([nn.Linear(c_dim, hidden_size) for _ in range(n_blocks)])
        self.fc_p = nn.Linear(3, hidden_size)  # unused in forward, kept for reference parity (see module docstring)
        self.blocks = nn.ModuleList([ResnetBlockFC(hidden_size, hidden_size) for _ in range(n_blocks)])
        self.fc_out = nn.Linear(hidden_size, num_classes)

    def forward(self, queries: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
        """Logits at the query points.

        Parameters
        ----------
        queries : (B, M, 3) floating tensor
            Object-frame coordinates (x, y, z).
        grid : (B, c_dim, R, R, R) tensor
            Feature grid from the encoder, axes ``[z, y, x]``.

        Returns
        -------
        (B, M, num_classes) tensor, grid dtype
            Unnormalised class scores (no softmax).
        """
        features = self.sample_features(queries, grid)
        net = 0
        for fc_c, block in zip(self.fc_c, self.blocks):
            net = block(net + fc_c(features))
        return self.fc_out(torch.relu(net))

    def sample_features(self, queries: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
        """Trilinear interpolation of the feature grid at the queries.

        Parameters
        ----------
        queries : (B, M, 3) floating tensor
            Object-frame coordinates (x, y, z).
        grid : (B, C, R, R, R) tensor
            Feature grid, axes ``[z, y, x]``.

        Returns
        -------
        (B, M, C) tensor, grid dtype
            Features at continuous grid index ``(R − 1)·u`` (corner-aligned), border-clamped.

        Notes
        -----
        The reference casts the sample coordinates ``2u − 1`` to float32; here they are cast to the grid's dtype,
        which is float32 except when the whole model runs in another precision.
        """
        u = normalize_to_unit_cube(queries, self.padding).to(grid.dtype)
        sample_at = (2.0 * u - 1.0)[:, :, None, None, :]
        sampled = F.grid_sample(grid, sample_at, mode="bilinear", padding_mode="border", align_corners=True)
        return sampled[:, :, :, 0, 0].transpose(1, 2)
