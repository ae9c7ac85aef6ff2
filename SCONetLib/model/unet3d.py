"""3D U-Net that turns the sparse point grid into SCONet's feature grid.

Written from the layer structure of the reference (the authors' ``github.com/maylis-j/SCONet``,
``src/encoder/unet3d.py``: a 3-level U-Net in the style of Wolny et al.'s ``github.com/wolny/pytorch-3dunet``).
Module and parameter names follow the reference state dict (``encoders.0.basic_module.SingleConv1.groupnorm.weight``
…) so reference weights load directly.

Reference quirks kept on purpose:

* Every convolution is preceded by a GroupNorm with **one group** (eps 1e-5, affine) and followed by a ReLU
  (layer order "gcr"); the 3×3×3 convolutions have **no bias**. With one group the norm mixes all channels, so
  the raw SURF channels (~10³) dominate the PointNet channels (~0.1) at the first layer.
* The encoder stages' first convolution widens to ``max(out // 2, in)`` channels (80→80→32 at the top level).
* Decoder stages upsample by **nearest** interpolation to the skip tensor's size and concatenate
  ``[skip, upsampled]`` (skip first).
* ``final_conv`` is a 1×1×1 convolution **with bias and no activation**. The reference also creates a Sigmoid
  ``final_activation`` that its forward pass never applies; it has no parameters and is not created here.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

#: GroupNorm epsilon of the reference.
GROUPNORM_EPS = 1e-5


class SingleConv(nn.Sequential):
    """GroupNorm(1 group) → Conv3d 3×3×3 (padding 1, no bias) → ReLU: (B, in, D, H, W) → (B, out, D, H, W)."""

    def __init__(self, in_channels: int, out_channels: int, num_groups: int = 1):
        super().__init__()
        self.add_module("groupnorm", nn.GroupNorm(num_groups, in_channels, eps=GROUPNORM_EPS))
        self.add_module("conv", nn.Conv3d(in_channels, out_channels, kernel_size=3, padding=1, bias=False))
        self.add_module("ReLU", nn.ReLU(inplace=True))


class DoubleConv(nn.Sequential):
    """Two :class:`SingleConv` named ``SingleConv1`` and ``SingleConv2``: in → mid → out channels."""

    def __init__(self, in_channels: int, mid_channels: int, out_channels: int, num_groups: int = 1):
        super().__init__()
        self.add_module("SingleConv1", SingleConv(in_channels, mid_channels, num_groups))
        self.add_module("SingleConv2", SingleConv(mid_channels, out_channels, num_groups))


class EncoderStage(nn.Module):
    """Optional 2× max pooling, then a :class:`DoubleConv` whose middle width is ``max(out // 2, in)``."""

    def __init__(self, in_channels: int, out_channels: int, pool: bool, num_groups: int = 1):
        super().__init__()
        self.pooling = nn.MaxPool3d(kernel_size=2) if pool else None
        self.basic_module = DoubleConv(in_channels, max(out_channels // 2, in_channels), out_channels, num_groups)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, in, D, H, W) → (B, out, D', H', W'), halved when pooling."""
        if self.pooling is not None:
            x = self.pooling(x)
        return self.basic_module(x)


class DecoderStage(nn.Module):
    """Nearest upsampling to the skip's size, ``concat[skip, up]``, then a :class:`DoubleConv` in → out → out."""

    def __init__(self, in_channels: int, out_channels: int, num_groups: int = 1):
        super().__init__()
        self.basic_module = DoubleConv(in_channels, out_channels, out_channels, num_groups)

    def forward(self, skip: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """skip (B, Cs, D, H, W) and coarser x (B, Cx, d, h, w) → (B, out, D, H, W)."""
        up = F.interpolate(x, size=skip.shape[2:], mode="nearest")
        return self.basic_module(torch.cat([skip, up], dim=1))


class UNet3D(nn.Module):
    """3-level (by default) 3D U-Net with feature widths ``f_maps · 2**level``.

    Parameters
    ----------
    in_channels : int
        Channels of the input grid (80 with SURF, 32 without).
    out_channels : int
        Channels of the feature grid (reference 32).
    f_maps : int
        Width of the top level (reference 32, giving 32/64/128).
    num_levels : int
        Number of resolution levels (reference 3); the grid side should be divisible by ``2**(num_levels - 1)``.
    num_groups : int
        GroupNorm groups (reference 1).

    Notes
    -----
    For the reference sizes the stages are ``encoders.0`` 80→80→32 (R³), ``encoders.1`` pool, 32→32→64
    ((R/2)³), ``encoders.2`` pool, 64→64→128 ((R/4)³), ``decoders.0`` 192→64→64 ((R/2)³), ``decoders.1``
    96→32→32 (R³), ``final_conv`` 32→32 (1×1×1, bias).
    """

    def __init__(self, in_channels: int, out_channels: int, f_maps: int = 32, num_levels: int = 3,
                 num_groups: int = 1):
        super().__init__()
        widths = [f_maps * 2 ** level for level in range(num_levels)]
        self.encoders = nn.ModuleList(
            EncoderStage(c_in, c_out, pool=level > 0, num_groups=num_groups)
            for level, (c_in, c_out) in enumerate(zip([in_channels] + widths[:-1], widths)))
        self.decoders = nn.ModuleList(
            DecoderStage(skip + coarse, skip, num_groups=num_groups)
            for coarse, skip in zip(widths[:0:-1], widths[-2::-1]))
        self.final_conv = nn.Conv3d(f_maps, out_channels, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, in_channels, R, R, R) → (B, out_channels, R, R, R); no final activation."""
        skips = []
        for encoder in self.encoders:
            x = encoder(x)
            skips.append(x)
        for decoder, skip in zip(self.decoders, reversed(skips[:-1])):
            x = decoder(skip, x)
        return self.final_conv(x)
