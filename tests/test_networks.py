"""Shapes, pruning and error messages of the segmentation networks."""

from __future__ import annotations

import json

import pytest
import torch

from kitseg.networks import UNet2D, UNetPlusPlus2D, available_networks, build_network, predict_logits


@pytest.fixture(scope="module")
def unetpp() -> UNetPlusPlus2D:
    torch.manual_seed(0)
    return UNetPlusPlus2D(in_channels=3, num_classes=3, base_channels=4, depth=3).eval()


@pytest.mark.parametrize("norm", ["instance", "batch", "group"])
def test_unet_odd_size_output_shape(norm: str) -> None:
    model = UNet2D(in_channels=3, num_classes=2, base_channels=4, depth=3, norm=norm, dropout=0.1)
    out = model(torch.randn(2, 3, 37, 53))  # training mode: norms must cope with the padding
    assert out.shape == (2, 2, 37, 53)


def test_unet_tiny_input_trains_with_instance_norm() -> None:
    # A 1x1 image would leave the bottleneck with one pixel without the minimum padding.
    model = UNet2D(in_channels=1, num_classes=2, base_channels=4, depth=2)
    out = model(torch.randn(1, 1, 1, 3))
    out.sum().backward()
    assert out.shape == (1, 2, 1, 3)


def test_unet_rejects_wrong_channels_and_rank() -> None:
    model = UNet2D(in_channels=3, num_classes=2, base_channels=4, depth=2)
    with pytest.raises(ValueError, match=r"built for 3 input channel.*C=5"):
        model(torch.randn(1, 5, 16, 16))
    with pytest.raises(ValueError, match=r"\(N, C, H, W\).*add a batch axis"):
        model(torch.randn(3, 16, 16))


def test_unetpp_deep_supervision_list(unetpp: UNetPlusPlus2D) -> None:
    with torch.no_grad():
        outputs = unetpp(torch.randn(2, 3, 37, 53))
    assert isinstance(outputs, list) and len(outputs) == 3
    assert all(o.shape == (2, 3, 37, 53) for o in outputs)
    assert not torch.allclose(outputs[0], outputs[2])  # distinct heads


def test_unetpp_without_deep_supervision_returns_one_element_list() -> None:
    model = UNetPlusPlus2D(base_channels=4, depth=2, deep_supervision=False)
    outputs = model(torch.randn(1, 3, 20, 11))
    assert isinstance(outputs, list) and len(outputs) == 1 and outputs[0].shape == (1, 3, 20, 11)
    with pytest.raises(ValueError, match="deep_supervision=True"):
        model.set_inference_level(1)


@pytest.mark.parametrize("level", [1, 2, 3])
def test_pruned_level_equals_full_head(unetpp: UNetPlusPlus2D, level: int) -> None:
    x = torch.randn(1, 3, 37, 53)
    with torch.no_grad():
        full = unetpp(x)
        pruned = unetpp(x, level=level)
    assert len(pruned) == 1 and pruned[0].shape == (1, 3, 37, 53)
    torch.testing.assert_close(pruned[0], full[level - 1])


def test_set_inference_level_prunes_and_validates(unetpp: UNetPlusPlus2D) -> None:
    x = torch.randn(1, 3, 16, 16)
    try:
        unetpp.set_inference_level(2)
        with torch.no_grad():
            pruned = unetpp(x)
        assert len(pruned) == 1
        with pytest.raises(ValueError, match=r"1\.\.3"):
            unetpp.set_inference_level(4)
    finally:
        unetpp.set_inference_level(None)
    with torch.no_grad():
        torch.testing.assert_close(pruned[0], unetpp(x)[1])


def test_predict_logits_averages_heads() -> None:
    a, b = torch.zeros(1, 3, 2, 2), torch.full((1, 3, 2, 2), 4.0)
    torch.testing.assert_close(predict_logits([a, b]), torch.full((1, 3, 2, 2), 2.0))
    assert predict_logits([a]) is a
    with pytest.raises(ValueError, match="empty"):
        predict_logits([])


def test_registry_builds_and_lists_names() -> None:
    assert available_networks() == ["ensemble", "unet2d", "unetpp2d"]
    model = build_network("unet2d", in_channels=3, num_classes=2, base_channels=4, depth=2)
    assert isinstance(model, UNet2D)
    assert json.loads(json.dumps(model.init_kwargs)) == {
        "in_channels": 3, "num_classes": 2, "base_channels": 4, "depth": 2, "norm": "instance", "dropout": 0.0,
    }
    # init_kwargs rebuilds an identical architecture
    rebuilt = build_network("unet2d", **model.init_kwargs)
    assert rebuilt.state_dict().keys() == model.state_dict().keys()


def test_registry_unknown_name_lists_valid_names() -> None:
    with pytest.raises(ValueError, match=r"unknown network 'resnet'.*unet2d, unetpp2d"):
        build_network("resnet")


def test_registry_bad_kwargs_name_the_network() -> None:
    with pytest.raises(ValueError, match=r"network 'unetpp2d'.*widht"):
        build_network("unetpp2d", widht=3)
    with pytest.raises(ValueError, match=r"network 'unet2d'.*in_channels"):
        build_network("unet2d", num_classes=2)
    with pytest.raises(ValueError, match=r"network 'unet2d'.*norm must be one of"):
        build_network("unet2d", in_channels=1, num_classes=2, norm="layer")
