"""Device selection: real availability, explicit errors, logged fallback."""

from __future__ import annotations

import logging

import pytest
import torch

from kitseg import device as device_module
from kitseg.device import available_devices, describe_devices, get_device


@pytest.fixture()
def no_accelerators(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(device_module, "_mps_available", lambda: False)


def test_auto_falls_back_to_cpu_and_logs(no_accelerators: None, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="kitseg.device"):
        assert get_device("auto") == torch.device("cpu")
    assert "falling back to the CPU" in caplog.text
    assert available_devices() == ["cpu"]
    assert "auto selects: cpu" in describe_devices()


def test_explicit_unavailable_accelerator_raises(no_accelerators: None) -> None:
    with pytest.raises(RuntimeError, match="'cuda' was requested but CUDA is not available"):
        get_device("cuda")
    with pytest.raises(RuntimeError, match="MPS is not available"):
        get_device("MPS")


def test_cpu_and_bad_names() -> None:
    assert get_device("cpu") == torch.device("cpu")
    assert get_device(torch.device("cpu")) == torch.device("cpu")
    with pytest.raises(ValueError, match="unknown device 'gpu0'"):
        get_device("gpu0")


def test_auto_picks_the_first_available_device() -> None:
    chosen = get_device()
    assert available_devices()[0].split(":")[0] == chosen.type
    assert available_devices()[-1] == "cpu"



def test_mixed_precision_only_where_the_hardware_is_fast(monkeypatch: pytest.MonkeyPatch) -> None:
    cpu = torch.device("cpu")
    monkeypatch.setattr(device_module, "cpu_has_fast_bfloat16", lambda: False)
    assert device_module.mixed_precision_dtype(cpu) is None  # emulated bfloat16 is slower than float32
    monkeypatch.setattr(device_module, "cpu_has_fast_bfloat16", lambda: True)
    assert device_module.mixed_precision_dtype(cpu) is torch.bfloat16
    assert device_module.mixed_precision_dtype(torch.device("mps")) is None
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert device_module.mixed_precision_dtype(torch.device("cuda")) is torch.float16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert device_module.mixed_precision_dtype(torch.device("cuda")) is torch.bfloat16


def test_fast_bfloat16_is_read_from_the_cpu_capabilities(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: {"amx_bf16": True, "avx512_bf16": False})
    assert device_module.cpu_has_fast_bfloat16() is True
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: {"amx_bf16": False, "avx512_bf16": True})  # AMD Zen 4
    assert device_module.cpu_has_fast_bfloat16() is True
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: {"amx_bf16": False, "avx512_bf16": False, "avx512_f": True})
    assert device_module.cpu_has_fast_bfloat16() is False  # AVX-512 without BF16: emulated, slower than float32

    def unreadable():
        raise RuntimeError("cpuinfo failed")

    monkeypatch.setattr(torch.cpu, "get_capabilities", unreadable)
    assert device_module.cpu_has_fast_bfloat16() is False


def test_training_lays_activations_out_channels_last_on_cuda_only():
    assert device_module.training_memory_format(torch.device("cuda")) is torch.channels_last
    assert device_module.training_memory_format(torch.device("cpu")) is torch.contiguous_format


def test_a_device_checked_before_it_is_chosen_is_not_announced(caplog):
    with caplog.at_level("INFO", logger="kitseg.device"):
        assert get_device("cpu", announce=False) == torch.device("cpu")
        assert "Using device" not in caplog.text
        assert get_device("cpu") == torch.device("cpu")
    assert caplog.text.count("Using device cpu") == 1
