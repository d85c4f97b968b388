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


@pytest.mark.parametrize("norm", ["batch", "instance"])
def test_widened_unetpp_computes_what_the_narrow_one_did_then_grows(norm: str) -> None:
    from kitseg.networks.unetpp import widened_state_dict

    torch.manual_seed(0)
    narrow = UNetPlusPlus2D(3, 3, base_channels=4, depth=3, norm=norm)
    with torch.no_grad():
        for _ in range(2):  # batch-norm statistics that are not the defaults
            narrow(torch.randn(4, 3, 24, 24))
    wide = UNetPlusPlus2D(3, 3, base_channels=6, depth=3, norm=norm)
    wide.load_state_dict(widened_state_dict(narrow, wide))
    x = torch.randn(2, 3, 20, 28)
    for mode in ("eval", "train"):
        getattr(narrow, mode)(), getattr(wide, mode)()
        with torch.no_grad():
            for a, b in zip(narrow(x), wide(x), strict=True):
                torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-5)
    # The added channels' zero weights into the kept ones get gradient: training grows them.
    wide.train()
    sum(out.square().mean() for out in wide(x)).backward()
    grad = wide.nodes["x0_1"][0].weight.grad  # (4 + 2 out, 2 maps x (4 + 2) in)
    assert grad[:4, [4, 5, 10, 11]].abs().sum() > 0


def test_widening_refuses_what_would_change_the_function() -> None:
    from kitseg.networks.unetpp import widened_state_dict

    narrow = UNetPlusPlus2D(3, 3, base_channels=4, depth=2, norm="batch")
    for wide, why in ((UNetPlusPlus2D(3, 3, base_channels=8, depth=2, norm="group"), "base_channels only"),
                      (UNetPlusPlus2D(3, 3, base_channels=8, depth=3, norm="batch"), "base_channels only"),
                      (UNetPlusPlus2D(3, 3, base_channels=2, depth=2, norm="batch"), "cannot narrow")):
        with pytest.raises(ValueError, match=why):
            widened_state_dict(narrow, wide)
    grouped = UNetPlusPlus2D(3, 3, base_channels=4, depth=2, norm="group")
    with pytest.raises(ValueError, match="group norm"):
        widened_state_dict(grouped, UNetPlusPlus2D(3, 3, base_channels=8, depth=2, norm="group"))
