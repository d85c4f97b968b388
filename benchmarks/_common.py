"""Helpers shared by the benchmarks: naming the machine, making KiTS-sized test CTs."""

from __future__ import annotations

import os
import platform
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
SHARED_KITS = REPO.parent / "shared" / "data" / "kits19"


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            cpu = next(line.split(":", 1)[1].strip() for line in fh if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{cpu}, {os.cpu_count()} CPUs, {platform.system()} {platform.release()}, Python {platform.python_version()}"


def write_synthetic_ct(path: Path, shape: tuple[int, int, int], spacing: tuple[float, float, float], seed: int = 0) -> Path:
    """A KiTS-layout CT of the given geometry: the sample phantom resampled onto it (fast at any size)."""
    import nibabel as nib

    from kitseg.phantom import make_sample_case
    from kitseg.phantom._nifti import kits_affine

    case = make_sample_case(seed=seed)
    # Nearest-neighbour index maps: cheap, and the size of the grid is what the benchmark is about.
    idx = [np.minimum((np.arange(n) * case.ct.shape[a] / n).astype(int), case.ct.shape[a] - 1) for a, n in enumerate(shape)]
    ct = np.empty(shape, np.int16)
    for z in range(shape[0]):
        ct[z] = case.ct[idx[0][z]][np.ix_(idx[1], idx[2])]
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(ct, kits_affine(spacing, (0.0, 0.0, 0.0))), str(path))
    return path


def timed_steps(task, stage: str, config, device, steps: int, prefetch: bool | None = None) -> tuple:
    """Seconds per training step, the mean of ``steps`` steps after 3 warm-up steps; and the module.

    Timed between calls of the task's batch maker, which the loop makes once per step: the
    interval holds the steps' batches (drawn in line, or waited for when ``prefetch``ed), their
    augmentation and the steps themselves. The GPU is waited for at both ends, since the loop
    reads the loss back only every few steps. The checkpoint writes at a run's end, as long as
    many GPU steps, are left out.
    """
    import dataclasses
    import tempfile
    import time

    import torch

    from kitseg.training.loop import DistInfo, train_network

    warm_up = 3
    stamps: list[float] = []

    def stamped_batch(arrays, rng, batch_device):
        if len(stamps) in (warm_up, warm_up + steps) and batch_device.type == "cuda":
            torch.cuda.synchronize(batch_device)
        stamps.append(time.perf_counter())
        return task.make_batch(arrays, rng, batch_device)

    timed = dataclasses.replace(task, steps=warm_up + steps + 1, make_batch=stamped_batch)
    with tempfile.TemporaryDirectory() as tmp:
        module = train_network(timed, Path(tmp) / "run", config, device, DistInfo(), stage, {}, progress=False,
                               prefetch=prefetch)
    return (stamps[warm_up + steps] - stamps[warm_up]) / steps, module
