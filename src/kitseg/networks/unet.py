"""A plain 2D U-Net (Ronneberger et al. 2015), the stage-1 network, and the blocks UNet++ reuses.

Tensors are ``(N, C, H, W)``: batch, channels, image rows, image columns. Any ``H, W`` is
accepted: the input is zero-padded at the bottom/right to a size the encoder can halve
``depth`` times and the logits are cropped back, so callers never see the padding.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

logger = logging.getLogger(__name__)

NORMS: tuple[str, ...] = ("instance", "batch", "group")


def make_norm(norm: str, channels: int) -> nn.Module:
    """A normalization layer for ``channels`` feature maps (``"instance"``, ``"batch"`` or ``"group"``)."""
    if norm == "instance":
        # affine=True: without a learned scale/shift, instance norm would erase per-channel contrast.
        return nn.InstanceNorm2d(channels, affine=True)
    if norm == "batch":
        return nn.BatchNorm2d(channels)
    if norm == "group":
        # The largest group count <= 8 that divides the channels, so tiny test networks work too.
        groups = max(g for g in range(1, 9) if channels % g == 0)
        return nn.GroupNorm(groups, channels)
    raise ValueError(f"norm must be one of {', '.join(NORMS)}; got {norm!r}")


class ConvBlock(nn.Sequential):
    """Two ``3x3 conv -> norm -> LeakyReLU`` layers; dropout (if any) between them.

    Shapes: ``(N, in_channels, H, W) -> (N, out_channels, H, W)``.
    """

    def __init__(self, in_channels: int, out_channels: int, norm: str, dropout: float) -> None:
        super().__init__(
            # No conv bias: the normalization that follows has its own shift.
            nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
            make_norm(norm, out_channels),
            nn.LeakyReLU(0.01, inplace=True),
            nn.Dropout2d(dropout) if dropout > 0 else nn.Identity(),
            nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False),
            make_norm(norm, out_channels),
            nn.LeakyReLU(0.01, inplace=True),
        )


def validate_common_kwargs(
    in_channels: int, num_classes: int, base_channels: int, depth: int, norm: str, dropout: float
) -> None:
    """Raise ``ValueError`` naming the first hyperparameter that is out of range."""
    for name, value, low in (
        ("in_channels", in_channels, 1),
        ("num_classes", num_classes, 1),
        ("base_channels", base_channels, 1),
        ("depth", depth, 1),
    ):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    if depth > 8:
        raise ValueError(f"depth must be <= 8, got {depth}")
    if norm not in NORMS:
        raise ValueError(f"norm must be one of {', '.join(NORMS)}; got {norm!r}")
    if not (isinstance(dropout, (int, float)) and 0.0 <= dropout < 1.0):
        raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")


def check_input(x: Tensor, in_channels: int, network: str) -> None:
    """Fail fast, with a message that says what was expected, on a wrongly shaped input."""
    if not isinstance(x, Tensor):
        raise TypeError(f"{network} expects a torch.Tensor, got {type(x).__name__}")
    if x.ndim != 4:
        hint = " (add a batch axis, e.g. x[None])" if x.ndim == 3 else ""
        raise ValueError(
            f"{network} expects input of shape (N, C, H, W) with C={in_channels}, "
            f"got a {x.ndim}-D tensor of shape {tuple(x.shape)}{hint}"
        )
    if x.shape[1] != in_channels:
        raise ValueError(
            f"{network} was built for {in_channels} input channel(s), got input of shape "
            f"{tuple(x.shape)} with C={x.shape[1]}"
        )
    if not x.is_floating_point():
        raise ValueError(f"{network} expects a floating-point input, got dtype {x.dtype}")


def pad_for_depth(x: Tensor, depth: int) -> tuple[Tensor, tuple[int, int]]:
    """Zero-pad ``(N, C, H, W)`` at the bottom/right so ``depth`` 2x poolings divide it evenly.

    The padded size is also at least ``2 * 2**depth`` so the coarsest feature map has >= 2x2
    pixels: instance norm (and batch norm with N=1) cannot normalize a single pixel in training.
    Zeros match what the convolutions already see past the image border, and the masked stage-2
    input is zero outside its region of interest anyway.

    Returns the padded tensor and the original ``(H, W)`` for :func:`crop_to`.
    """
    h, w = x.shape[-2:]
    multiple = 2**depth
    target_h = max(math.ceil(h / multiple) * multiple, 2 * multiple)
    target_w = max(math.ceil(w / multiple) * multiple, 2 * multiple)
    if (target_h, target_w) != (h, w):
        x = F.pad(x, (0, target_w - w, 0, target_h - h))
    return x, (h, w)


def crop_to(x: Tensor, size: tuple[int, int]) -> Tensor:
    """Undo :func:`pad_for_depth`: keep the top-left ``(H, W)`` of ``(N, C, H', W')``."""
    return x[..., : size[0], : size[1]]


class UNet2D(nn.Module):
    """2D U-Net: ``depth`` pooling steps, channels doubling from ``base_channels`` at each step.

    Args:
        in_channels: input channels (stage 1: ``2 * context_slices + 1`` neighbouring slices).
        num_classes: output channels (stage 1: 2, background and kidney+tumor).
        base_channels: feature maps at full resolution; level ``i`` has ``base_channels * 2**i``.
        depth: number of 2x downsamplings (the bottleneck works at ``1 / 2**depth`` resolution).
        norm: ``"instance"``, ``"batch"`` or ``"group"``.
        dropout: channel dropout probability inside every convolution block.

    Forward: ``(N, in_channels, H, W)`` float -> logits ``(N, num_classes, H, W)``, any ``H, W``.
    """

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        base_channels: int = 32,
        depth: int = 4,
        norm: str = "instance",
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        validate_common_kwargs(in_channels, num_classes, base_channels, depth, norm, dropout)
        self._init_kwargs: dict[str, Any] = {
            "in_channels": in_channels,
            "num_classes": num_classes,
            "base_channels": base_channels,
            "depth": depth,
            "norm": norm,
            "dropout": float(dropout),
        }
        self.in_channels = in_channels
        self.num_classes = num_classes
        self.depth = depth
        channels = [base_channels * 2**i for i in range(depth + 1)]

        self.encoder = nn.ModuleList(
            [ConvBlock(in_channels, channels[0], norm, dropout)]
            + [ConvBlock(channels[i - 1], channels[i], norm, dropout) for i in range(1, depth + 1)]
        )
        # up[i] / decoder[i] produce level i from level i+1 (index 0 = full resolution).
        self.up = nn.ModuleList(
            [nn.ConvTranspose2d(channels[i + 1], channels[i], 2, stride=2) for i in range(depth)]
        )
        self.decoder = nn.ModuleList([ConvBlock(2 * channels[i], channels[i], norm, dropout) for i in range(depth)])
        self.head = nn.Conv2d(channels[0], num_classes, 1)

    @property
    def init_kwargs(self) -> dict[str, Any]:
        """The constructor arguments (JSON-able), stored in checkpoints to rebuild the network."""
        return dict(self._init_kwargs)

    def forward(self, x: Tensor) -> Tensor:
        """``(N, in_channels, H, W)`` -> logits ``(N, num_classes, H, W)``."""
        check_input(x, self.in_channels, type(self).__name__)
        x, size = pad_for_depth(x, self.depth)
        skips: list[Tensor] = []
        for level, block in enumerate(self.encoder):
            x = block(F.max_pool2d(x, 2) if level > 0 else x)
            skips.append(x)
        for level in reversed(range(self.depth)):
            x = self.decoder[level](torch.cat([skips[level], self.up[level](x)], dim=1))
        return crop_to(self.head(x), size)
