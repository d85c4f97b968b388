"""Loss values against hand-computed ones."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from kitseg.losses import deep_supervision_loss, masked_cross_entropy, stage1_loss


def _tiny() -> tuple[torch.Tensor, torch.Tensor]:
    """N=1, C=3, H=1, W=2: pixel 0 logits (0,0,0) -> p=1/3 each; pixel 1 (0, ln 3, 0) -> (1/5, 3/5, 1/5)."""
    logits = torch.tensor([[[[0.0, 0.0]], [[0.0, math.log(3.0)]], [[0.0, 0.0]]]])
    target = torch.tensor([[[1, 1]]])
    return logits, target


def test_masked_ce_hand_computed() -> None:
    logits, target = _tiny()
    mask = torch.ones(1, 1, 2)
    # -(log 1/3 + log 3/5) / (N*H*W*C = 6) = log 5 / 6
    assert masked_cross_entropy(logits, target, mask).item() == pytest.approx(math.log(5.0) / 6.0, rel=1e-6)
    half = torch.tensor([[[1.0, 0.0]]])
    assert masked_cross_entropy(logits, target, half).item() == pytest.approx(math.log(3.0) / 6.0, rel=1e-6)
    # (N, 1, H, W) and bool masks give the same value
    assert masked_cross_entropy(logits, target, half.bool()[:, None]).item() == pytest.approx(math.log(3.0) / 6.0)


def test_masked_ce_class_weights_count_a_class_pixels_that_many_times() -> None:
    logits, _ = _tiny()
    target = torch.tensor([[[1, 2]]])  # pixel 0 kidney (p = 1/3), pixel 1 tumor (p = 1/5)
    mask = torch.ones(1, 1, 2)
    plain = (math.log(3.0) + math.log(5.0)) / 6.0
    assert masked_cross_entropy(logits, target, mask).item() == pytest.approx(plain, rel=1e-6)
    weighted = masked_cross_entropy(logits, target, mask, class_weights=(1.0, 1.0, 3.0))
    assert weighted.item() == pytest.approx((math.log(3.0) + 3 * math.log(5.0)) / 6.0, rel=1e-6)
    outside = masked_cross_entropy(logits, target, torch.tensor([[[1.0, 0.0]]]), class_weights=(1.0, 1.0, 3.0))
    assert outside.item() == pytest.approx(math.log(3.0) / 6.0, rel=1e-6)  # the mask still rules
    assert deep_supervision_loss([logits, logits], target, mask, class_weights=(1.0, 1.0, 3.0)).item() == pytest.approx(
        2 * weighted.item(), rel=1e-6)
    with pytest.raises(ValueError, match="2 class weights for 3 classes"):
        masked_cross_entropy(logits, target, mask, class_weights=(1.0, 3.0))


def test_masked_ce_hard_fraction_keeps_the_worst_pixels_inside_the_mask() -> None:
    logits, target = _tiny()  # pixel 0 loses log 3, pixel 1 log 5/3
    mask = torch.ones(1, 1, 2)
    assert masked_cross_entropy(logits, target, mask, hard_fraction=1.0).item() == masked_cross_entropy(
        logits, target, mask).item()
    # Half of the two pixels: the worse one, its loss divided by 0.5 * N*H*W*C.
    assert masked_cross_entropy(logits, target, mask, hard_fraction=0.5).item() == pytest.approx(
        math.log(3.0) / 3.0, rel=1e-6)
    # Ranked among the pixels inside the mask only: pixel 1 alone is the worst of its one.
    inside_one = torch.tensor([[[0.0, 1.0]]])
    assert masked_cross_entropy(logits, target, inside_one, hard_fraction=0.5).item() == pytest.approx(
        math.log(5.0 / 3.0) / 3.0, rel=1e-6)
    # Ranked after the class weights: pixel 0 (tumor) loses log 3, pixel 1 (kidney) log 5/3, less,
    # but at kidney weight 3 it loses 3 log 5/3, more, and is the one kept.
    mixed = torch.tensor([[[2, 1]]])
    assert masked_cross_entropy(logits, mixed, mask, (1.0, 3.0, 1.0), hard_fraction=0.5).item() == pytest.approx(
        3 * math.log(5.0 / 3.0) / 3.0, rel=1e-6)
    assert masked_cross_entropy(logits, target, torch.zeros(1, 1, 2), hard_fraction=0.1).item() == 0.0
    for bad in (0.0, 1.5):
        with pytest.raises(ValueError, match="hard_fraction must be in"):
            masked_cross_entropy(logits, target, mask, hard_fraction=bad)


def test_masked_ce_hard_fraction_gives_no_gradient_to_the_easy_pixels() -> None:
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 6, 6, requires_grad=True)
    target = torch.randint(0, 3, (2, 6, 6))
    masked_cross_entropy(logits, target, torch.ones(2, 6, 6), hard_fraction=0.25).backward()
    per_pixel = F.cross_entropy(logits.detach(), target, reduction="none").flatten()
    touched = logits.grad.abs().sum(dim=1).flatten() > 0
    assert touched.sum().item() == 18  # ceil(0.25 * 72) pixels
    assert per_pixel[touched].min() >= per_pixel[~touched].max()
    # Each deep-supervision head ranks its own pixels.
    heads = [logits.detach(), logits.detach().flip(-1)]
    torch.testing.assert_close(
        deep_supervision_loss(heads, target, torch.ones(2, 6, 6), hard_fraction=0.25),
        sum(masked_cross_entropy(h, target, torch.ones(2, 6, 6), hard_fraction=0.25) for h in heads))


def test_masked_ce_zero_mask_is_zero_and_full_mask_is_ce_over_c() -> None:
    torch.manual_seed(0)
    logits, target = torch.randn(2, 3, 5, 7), torch.randint(0, 3, (2, 5, 7))
    assert masked_cross_entropy(logits, target, torch.zeros(2, 5, 7)).item() == 0.0
    full = masked_cross_entropy(logits, target, torch.ones(2, 5, 7))
    torch.testing.assert_close(full, F.cross_entropy(logits, target) / 3)


def test_masked_ce_is_stable_for_extreme_logits_and_half_inputs() -> None:
    logits = torch.tensor([[[[1000.0]], [[-1000.0]], [[0.0]]]]).half()
    value = masked_cross_entropy(logits, torch.tensor([[[1]]]), torch.ones(1, 1, 1))
    assert value.dtype == torch.float32 and torch.isfinite(value)
    assert value.item() == pytest.approx(2000.0 / 3, rel=1e-4)  # -log p = 2000, divided by C = 3


def test_stage1_loss_equals_torch_cross_entropy() -> None:
    torch.manual_seed(1)
    logits, target = torch.randn(3, 2, 4, 5), torch.randint(0, 2, (3, 4, 5))
    torch.testing.assert_close(stage1_loss(logits, target), F.cross_entropy(logits, target))
    with pytest.raises(ValueError, match="target must be"):
        stage1_loss(logits, target[:, :3])


def test_deep_supervision_sums_heads_with_weights() -> None:
    logits, target = _tiny()
    mask = torch.ones(1, 1, 2)
    single = math.log(5.0) / 6.0
    assert deep_supervision_loss([logits, logits], target, mask).item() == pytest.approx(2 * single, rel=1e-6)
    weighted = deep_supervision_loss([logits, logits * 0], target, mask, weights=[0.5, 2.0])
    assert weighted.item() == pytest.approx(0.5 * single + 2.0 * math.log(3.0) / 3.0, rel=1e-6)
    with pytest.raises(ValueError, match="1 weights for 2 heads"):
        deep_supervision_loss([logits, logits], target, mask, weights=[1.0])


def test_losses_backpropagate() -> None:
    logits = torch.randn(1, 3, 4, 4, requires_grad=True)
    deep_supervision_loss([logits], torch.zeros(1, 4, 4, dtype=torch.int64), torch.ones(1, 4, 4)).backward()
    assert logits.grad is not None and logits.grad.abs().sum() > 0


def test_masked_soft_dice_on_a_hand_example():
    from kitseg.losses import masked_soft_dice_loss

    # Two pixels, both inside the mask; class 1 predicted with certainty where the target is 1.
    big = 50.0
    logits = torch.tensor([[[[-big, -big]], [[big, -big]], [[-big, big]]]])  # (1, 3, 1, 2)
    target = torch.tensor([[[1, 2]]])
    mask = torch.ones(1, 1, 2)
    assert masked_soft_dice_loss(logits, target, mask, smooth=0.0).item() == pytest.approx(0.0, abs=1e-6)
    wrong = torch.tensor([[[2, 1]]])
    assert masked_soft_dice_loss(logits, wrong, mask, smooth=0.0).item() == pytest.approx(1.0, abs=1e-6)
    # Outside the mask nothing counts: masking the wrong pixel leaves one right, one ignored.
    half = torch.tensor([[[1.0, 0.0]]])
    assert masked_soft_dice_loss(logits, torch.tensor([[[1, 1]]]), half, classes=(1,), smooth=0.0).item() == pytest.approx(0.0, abs=1e-6)


def test_deep_supervision_dice_weight_zero_is_the_paper_loss():
    from kitseg.losses import deep_supervision_loss, masked_cross_entropy, masked_soft_dice_loss

    torch.manual_seed(0)
    heads = [torch.randn(2, 3, 4, 5) for _ in range(3)]
    target = torch.randint(0, 3, (2, 4, 5))
    mask = torch.ones(2, 4, 5)
    plain = sum(masked_cross_entropy(h, target, mask) for h in heads)
    torch.testing.assert_close(deep_supervision_loss(heads, target, mask), plain)
    with_dice = plain + 0.5 * sum(masked_soft_dice_loss(h, target, mask) for h in heads)
    torch.testing.assert_close(deep_supervision_loss(heads, target, mask, dice_weight=0.5), with_dice)


def test_per_image_soft_dice_weighs_a_small_tumor_as_much_as_a_large_one():
    from kitseg.losses import masked_soft_dice_loss

    def certain(classes: list[int]) -> torch.Tensor:  # (3, 1, W) logits predicting these classes
        return torch.nn.functional.one_hot(torch.tensor([classes]), 3).permute(2, 0, 1).float() * 100.0

    # A: a 9-pixel tumor found exactly; B: a 1-pixel tumor called kidney; C: no tumor, all called tumor.
    target = torch.tensor([[[2] * 9 + [1]], [[2] + [1] * 9], [[1] * 10]])
    logits = torch.stack([certain([2] * 9 + [1]), certain([1] * 10), certain([2] * 10)])
    mask = torch.ones(3, 1, 10)
    only_ab = slice(0, 2)
    # Over the batch, A's 9 pixels drown B's miss: Dice 18/19.
    batch = masked_soft_dice_loss(logits[only_ab], target[only_ab], mask[only_ab], classes=(2,), smooth=0.0)
    assert batch.item() == pytest.approx(1 - 18 / 19, abs=1e-6)
    # Per image, A scores 1 and B 0; C shows no tumor and predicts 10 pixels of it: smooth/(10+smooth).
    smooth = 1e-3
    per_image = masked_soft_dice_loss(logits, target, mask, classes=(2,), smooth=smooth, per_image=True)
    a, b, c = (18 + smooth) / (18 + smooth), smooth / (1 + smooth), smooth / (10 + smooth)
    assert per_image.item() == pytest.approx(1 - (a + b + c) / 3, abs=1e-5)
    # A slice without tumor that predicts none scores 1: nothing to lose there.
    clean = certain([1] * 10).unsqueeze(0)
    empty = masked_soft_dice_loss(clean, target[2:], mask[2:], classes=(2,), smooth=smooth, per_image=True)
    assert empty.item() == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ValueError, match="per_image needs smooth > 0"):
        masked_soft_dice_loss(logits, target, mask, classes=(2,), smooth=0.0, per_image=True)


def test_deep_supervision_passes_per_image_dice_on():
    from kitseg.losses import deep_supervision_loss, masked_cross_entropy, masked_soft_dice_loss

    torch.manual_seed(1)
    heads = [torch.randn(4, 3, 6, 6) for _ in range(2)]
    target = torch.randint(0, 3, (4, 6, 6))
    mask = torch.ones(4, 6, 6)
    expected = sum(masked_cross_entropy(h, target, mask) + masked_soft_dice_loss(h, target, mask, per_image=True)
                   for h in heads)
    got = deep_supervision_loss(heads, target, mask, dice_weight=1.0, dice_per_image=True)
    torch.testing.assert_close(got, expected)
    assert not torch.allclose(got, deep_supervision_loss(heads, target, mask, dice_weight=1.0))
