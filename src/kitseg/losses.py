"""Training losses of the two stages.

Shapes: logits ``(N, C, H, W)``, integer targets ``(N, H, W)``, masks ``(N, H, W)`` or
``(N, 1, H, W)``. Every loss is computed in float32 with ``log_softmax`` (never
``log(softmax(.))``), with autocast switched off, so it is stable under mixed precision.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor


def _check_logits_target(logits: Tensor, target: Tensor, what: str) -> None:
    if logits.ndim != 4:
        raise ValueError(f"{what}: logits must be (N, C, H, W), got shape {tuple(logits.shape)}")
    n, _, h, w = logits.shape
    if tuple(target.shape) != (n, h, w):
        raise ValueError(f"{what}: target must be (N, H, W) = {(n, h, w)}, got shape {tuple(target.shape)}")
    if target.dtype != torch.int64:
        raise ValueError(f"{what}: target must be int64 class indices, got dtype {target.dtype}")


def _float32_log_softmax(logits: Tensor) -> Tensor:
    # Autocast would otherwise be free to run the reduction in half precision.
    with torch.autocast(device_type=logits.device.type, enabled=False):
        return F.log_softmax(logits.float(), dim=1)


def stage1_loss(logits: Tensor, target: Tensor) -> Tensor:
    """Stage-1 cross-entropy, mean over pixels.

    Args:
        logits: ``(N, 2, H, W)``, background / kidney+tumor.
        target: ``(N, H, W)`` int64 in {0, 1}.

    Returns:
        A float32 scalar, equal to ``F.cross_entropy(logits, target)``.
    """
    _check_logits_target(logits, target, "stage1_loss")
    return F.nll_loss(_float32_log_softmax(logits), target)


def masked_cross_entropy(
    logits: Tensor, target: Tensor, mask: Tensor, class_weights: Sequence[float] | None = None,
    hard_fraction: float = 1.0,
) -> Tensor:
    """Stage-2 masked cross-entropy, as the paper writes it: ``-mean(mask * L * log y2)``.

    The mean runs over pixels **and** channels: with ``L`` the one-hot target,

        loss = -1 / (N*H*W*C) * sum_{n,h,w,c} mask[n,h,w] * L[n,c,h,w] * log_softmax(logits)[n,c,h,w]

    i.e. the cross-entropy of the pixels inside the mask, summed, divided by *all* ``N*H*W``
    pixels and scaled by ``1/C`` (only the target channel of each pixel is non-zero). Pixels
    outside the mask contribute nothing, and an all-zero mask gives exactly 0.

    Args:
        logits: ``(N, C, H, W)`` (stage 2: C = 3, background / kidney / tumor).
        target: ``(N, H, W)`` int64 in ``0..C-1``.
        mask: ``(N, H, W)`` or ``(N, 1, H, W)``, bool or float (soft weights allowed).
        class_weights: one weight per class, multiplying the mask at the pixels of that class
            (not in the paper; ``None``: every class 1, the paper's loss).
        hard_fraction: keep only this fraction of the pixels inside the mask, those with the
            largest (weighted) loss, and divide by it, so that the value keeps the full loss's
            size where all pixels are equally hard (not in the paper; 1 is the paper's loss). The
            "TopK" cross-entropy (Wu et al., 2016): a converged network's easy pixels stop
            diluting the few it still gets wrong (nnU-Net's TopK10 trainer keeps 0.1; Dice +
            TopK ranks among the best compound losses in Ma et al., Med. Image Anal. 2021).

    Returns:
        A float32 scalar.
    """
    _check_logits_target(logits, target, "masked_cross_entropy")
    if not 0 < hard_fraction <= 1:
        raise ValueError(f"masked_cross_entropy: hard_fraction must be in (0, 1], got {hard_fraction}")
    if class_weights is not None and len(class_weights) != logits.shape[1]:
        raise ValueError(f"masked_cross_entropy: {len(class_weights)} class weights for {logits.shape[1]} classes")
    n, c, h, w = logits.shape
    if mask.ndim == 4:
        if mask.shape[1] != 1:
            raise ValueError(f"masked_cross_entropy: a 4-D mask must be (N, 1, H, W), got shape {tuple(mask.shape)}")
        mask = mask[:, 0]
    if tuple(mask.shape) != (n, h, w):
        raise ValueError(
            f"masked_cross_entropy: mask must be (N, H, W) or (N, 1, H, W) with (N, H, W) = {(n, h, w)}, "
            f"got shape {tuple(mask.shape)}"
        )
    log_probs = _float32_log_softmax(logits)
    # Gathering the target channel is the one-hot product without materializing the one-hot tensor.
    target_log_probs = log_probs.gather(1, target.unsqueeze(1)).squeeze(1)
    weight = mask.float()
    if class_weights is not None:
        weight = weight * torch.tensor(class_weights, dtype=torch.float32, device=logits.device)[target]
    pixel_losses = -(weight * target_log_probs)
    if hard_fraction < 1:
        inside = pixel_losses[weight > 0]
        kept = math.ceil(hard_fraction * inside.numel())
        return inside.topk(kept, sorted=False).values.sum() / (hard_fraction * n * h * w * c)
    return pixel_losses.sum() / (n * h * w * c)


def masked_soft_dice_loss(
    logits: Tensor, target: Tensor, mask: Tensor, classes: Sequence[int] = (1, 2), smooth: float = 1.0,
    per_image: bool = False,
) -> Tensor:
    """``1 - mean Dice`` of the softmax probabilities inside the mask (not in the paper).

    By default Dice is computed per class over the whole batch, so slices without a class do
    not produce 0/0. It weighs a small tumor as much as a large kidney, which cross-entropy does
    not: nnU-Net trains with CE + Dice for that reason. Within a batch, though, a large tumor
    still outweighs a small one. ``per_image=True`` averages the Dice of every (image, class)
    pair, as nnU-Net's Dice without ``batch_dice`` does: a slice through a 2 mL tumor counts as
    much as one through a 500 mL tumor, as KiTS19's per-case mean Dice counts the cases, and a
    slice without the class scores ``smooth / (predicted + smooth)``, 1 when nothing is
    predicted, so false positives there cost Dice. (Leaving those pairs out rewarded
    over-prediction: a model trained so labelled 260 mL of a tumor-free real CT tumor.)

    Args:
        logits: ``(N, C, H, W)``; target: ``(N, H, W)`` int64; mask: ``(N, H, W)`` or ``(N, 1, H, W)``.
        classes: the class indices whose Dice is averaged (foreground classes).
        smooth: added to numerator and denominator; must be > 0 with ``per_image`` (absent pairs
            would be 0/0).
    """
    _check_logits_target(logits, target, "masked_soft_dice_loss")
    if per_image and smooth <= 0:
        raise ValueError(f"masked_soft_dice_loss: per_image needs smooth > 0, got {smooth}")
    mask = (mask[:, 0] if mask.ndim == 4 else mask).float()
    probs = torch.softmax(logits.float(), dim=1)
    sum_over = (1, 2) if per_image else (0, 1, 2)
    dices = []
    for c in classes:
        p = probs[:, c] * mask
        t = (target == c).float() * mask
        dices.append((2 * (p * t).sum(dim=sum_over) + smooth) / (p.sum(dim=sum_over) + t.sum(dim=sum_over) + smooth))
    return 1 - torch.stack(dices).mean()


def deep_supervision_loss(
    outputs: Sequence[Tensor] | Tensor,
    target: Tensor,
    mask: Tensor,
    weights: Sequence[float] | None = None,
    dice_weight: float = 0.0,
    dice_per_image: bool = False,
    class_weights: Sequence[float] | None = None,
    hard_fraction: float = 1.0,
) -> Tensor:
    """Sum of :func:`masked_cross_entropy` over the UNet++ heads, each optionally weighted.

    ``dice_weight > 0`` adds that multiple of :func:`masked_soft_dice_loss` per head (an
    option beyond the paper, for small tumors); 0 is the paper's loss exactly. ``dice_per_image``
    is passed on to :func:`masked_soft_dice_loss` as ``per_image``, ``class_weights`` and
    ``hard_fraction`` to :func:`masked_cross_entropy` (each head ranks its own pixels).

    Args:
        outputs: the network's list of logits, each ``(N, C, H, W)`` (a bare tensor counts as one head).
        target: ``(N, H, W)`` int64.
        mask: ``(N, H, W)`` or ``(N, 1, H, W)``.
        weights: one weight per head; ``None`` weights every head 1 (the paper's plain sum).

    Returns:
        A float32 scalar.
    """
    heads = [outputs] if isinstance(outputs, Tensor) else list(outputs)
    if not heads:
        raise ValueError("deep_supervision_loss: no outputs given")
    if weights is None:
        weights = [1.0] * len(heads)
    if len(weights) != len(heads):
        raise ValueError(f"deep_supervision_loss: {len(weights)} weights for {len(heads)} heads")
    total = torch.zeros((), device=heads[0].device)
    for head, weight in zip(heads, weights):
        loss = masked_cross_entropy(head, target, mask, class_weights, hard_fraction)
        if dice_weight:
            loss = loss + dice_weight * masked_soft_dice_loss(head, target, mask, per_image=dice_per_image)
        total = total + loss * float(weight)
    return total
