"""Choosing the torch device: one place that checks what is really available.

``"auto"`` prefers CUDA, then Apple's MPS, then the CPU, and logs which it took (and that it fell
back to the CPU when it did). An explicitly requested accelerator that is not there is an error,
not a silent fallback: a user who asked for the GPU should learn it is missing.
"""

from __future__ import annotations

import logging

import torch

logger = logging.getLogger(__name__)

_NAMES = ("auto", "cuda", "cuda:<index>", "mps", "cpu")


def _mps_available() -> bool:
    mps = getattr(torch.backends, "mps", None)
    return bool(mps is not None and mps.is_available())


def available_devices() -> list[str]:
    """Usable devices in the order ``"auto"`` prefers them, e.g. ``["cuda:0", "cpu"]`` or ``["cpu"]``."""
    devices = [f"cuda:{i}" for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []
    if _mps_available():
        devices.append("mps")
    devices.append("cpu")
    return devices


def get_device(name: str | torch.device = "auto", announce: bool = True) -> torch.device:
    """The device to run on.

    Args:
        name: ``"auto"`` (CUDA > MPS > CPU), ``"cuda"``, ``"cuda:<index>"``, ``"mps"`` or ``"cpu"``
            (case-insensitive), or a ``torch.device``.
        announce: log the device chosen (off for a check made before the command chooses it).

    Raises:
        RuntimeError: an explicit ``"cuda"``/``"mps"`` device is not available.
        ValueError: ``name`` is not a device name.
    """
    device, description = _device(str(name).strip().lower(), name)
    if announce:
        logger.info("%s", description)
    return device


def _device(text: str, name: str | torch.device) -> tuple[torch.device, str]:
    """The device ``text`` names, and how to announce it."""
    if text == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda"), f"Using CUDA device {torch.cuda.get_device_name(0)}"
        if _mps_available():
            return torch.device("mps"), "Using Apple MPS device"
        return torch.device("cpu"), "No GPU available (neither CUDA nor MPS); falling back to the CPU"

    try:
        device = torch.device(text)
    except RuntimeError:
        raise ValueError(f"unknown device {name!r}; use one of {', '.join(_NAMES)}") from None

    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError(
                f"device {text!r} was requested but CUDA is not available (torch {torch.__version__}, "
                f"built with CUDA {torch.version.cuda or 'none'}); use 'auto' or 'cpu'"
            )
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise RuntimeError(f"device {text!r} was requested but only {count} CUDA device(s) exist")
    elif device.type == "mps":
        if not _mps_available():
            raise RuntimeError(f"device {text!r} was requested but Apple MPS is not available; use 'auto' or 'cpu'")
    elif device.type != "cpu":
        raise ValueError(f"unsupported device {name!r}; use one of {', '.join(_NAMES)}")
    return device, f"Using device {device}"


def cpu_has_fast_bfloat16() -> bool:
    """Whether this CPU multiplies bfloat16 in hardware: Intel AMX (Xeon 4th generation and later)
    or the AVX-512 BF16 dot product (AMD Zen 4 and later, Intel Cooper Lake).

    Without either, bfloat16 convolutions on a CPU are emulated and slower than float32. With
    AVX-512 BF16 alone (AMD EPYC, 2 cores) the `cpu` preset's training steps ran 1.59-1.67x (stage 1)
    and 1.45-1.69x (stage 2) faster (``benchmarks/bench_train_precision.py``, 2026-12-06).
    """
    capabilities = getattr(torch.cpu, "get_capabilities", None)  # torch >= 2.8
    try:
        found = capabilities() if capabilities else {}
    except RuntimeError:
        return False
    return bool(found.get("amx_bf16", False) or found.get("avx512_bf16", False))


def mixed_precision_dtype(device: torch.device) -> torch.dtype | None:
    """The autocast dtype training uses on ``device`` with mixed precision on, or None (float32).

    CUDA: bfloat16 where supported, else float16 (with gradient scaling); a CPU with bfloat16 in
    hardware: bfloat16 (1.5-2x the float32 training speed on 2 cores, ``benchmarks/bench_train_precision.py``);
    any other CPU, and MPS: None.
    """
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "cpu" and cpu_has_fast_bfloat16():
        return torch.bfloat16
    return None


def training_memory_format(device: torch.device) -> torch.memory_format:
    """How training lays out activations: channels-last on CUDA, where cuDNN's tensor-core convolutions
    work in NHWC and NCHW costs a transpose around each layer (the `paper` preset's training step 2.0-2.4x
    faster on an H200, ``benchmarks/bench_gpu_kernels.py``); the default layout elsewhere.
    """
    return torch.channels_last if device.type == "cuda" else torch.contiguous_format


def describe_devices() -> str:
    """A multi-line, human-readable summary of the devices torch can use (for ``kits-seg info``)."""
    lines = [f"torch {torch.__version__} (CUDA build: {torch.version.cuda or 'none'})"]
    if torch.cuda.is_available():
        for index in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(index)
            lines.append(f"cuda:{index}: {props.name}, {props.total_memory / 2**30:.1f} GiB")
    else:
        lines.append("cuda: not available")
    lines.append(f"mps: {'available' if _mps_available() else 'not available'}")
    lines.append(f"cpu: {torch.get_num_threads()} thread(s), bfloat16 in hardware (AMX or AVX-512 BF16): "
                 f"{'yes' if cpu_has_fast_bfloat16() else 'no'}")
    lines.append(f"auto selects: {available_devices()[0]}")
    return "\n".join(lines)
