"""Shared fixtures: tiny synthetic volumes with non-trivial affines, and the shared data folder."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
KITS19 = SHARED_DATA / "kits19"
REALCT = SHARED_DATA / "realct"


def _rotation(axis: int, degrees: float) -> np.ndarray:
    t = np.deg2rad(degrees)
    c, s = np.cos(t), np.sin(t)
    i, j = [a for a in range(3) if a != axis]
    r = np.eye(3)
    r[i, i], r[i, j], r[j, i], r[j, j] = c, -s, s, c
    return r


def make_affine(orientation: str, spacing=(2.5, 0.8, 0.7), origin=(-120.0, 35.0, 410.0)) -> np.ndarray:
    """Affines for the orientations users meet: KiTS19's (I,P,L), RAS, LPS and an oblique one."""
    sz, sy, sx = spacing
    a = np.eye(4)
    if orientation == "kits":  # axis 0 = slices going inferior, as KiTS19 stores them
        a[:3, :3] = [[0, 0, -sx], [0, -sy, 0], [-sz, 0, 0]]
    elif orientation == "ras":  # (x, y, z) storage, slices last
        a[:3, :3] = np.diag([sx, sy, sz])
    elif orientation == "lps":  # DICOM-style
        a[:3, :3] = np.diag([-sx, -sy, sz])
    elif orientation == "oblique":
        a[:3, :3] = _rotation(2, 17.0) @ _rotation(0, -9.0) @ np.diag([sx, sy, sz])
    else:
        raise ValueError(orientation)
    a[:3, 3] = origin
    return a


ORIENTATIONS = ("kits", "ras", "lps", "oblique")


@pytest.fixture(scope="session")
def tiny_bundle():
    from kitseg.checkpoint import make_tiny_bundle

    return make_tiny_bundle(seed=0)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """Four small synthetic KiTS19-layout cases to train on."""
    from kitseg.phantom import make_synthetic_case

    root = tmp_path_factory.mktemp("data")
    for i in range(4):
        make_synthetic_case(shape=(20, 40, 44), spacing=(2.5, 1.5, 1.5), seed=10 + i).save_case_folder(
            root / f"case_{i:05d}"
        )
    return root


def load_script(name: str):
    """``scripts/NAME.py`` as a module, with scripts/ on the path as when it runs (studies import
    their siblings)."""
    folder = str(REPO / "scripts")
    sys.path.insert(0, folder)
    try:
        spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(folder)
    return module


def requires(path: Path):
    return pytest.mark.skipif(not path.exists(), reason=f"{path} is absent (shared development data)")


def straight_and_resumed_runs(dataset: Path, tmp_path: Path, device, prefetch: bool | None = None) -> tuple:
    """Stage 1 of the smoke preset, 4 steps with a checkpoint every 2, trained straight and again
    interrupted at step 3 (after the step-2 checkpoint) and then resumed.

    ``prefetch``: as ``train_network`` takes it (default: batches drawn ahead on a GPU only).
    Returns the straight run's module, the resumed run's module, the state file as the interruption
    left it (loaded on the CPU) and the steps the resumed run's log lists.
    """
    import torch

    from kitseg.training import preset
    from kitseg.training.data import load_cases
    from kitseg.training.loop import DistInfo, stage1_task, train_network

    config = preset("smoke").replace(steps_per_epoch=2, lr_schedule="poly")
    cases = load_cases(dataset, config.preprocessing, cache_dir=None, progress=False)

    def run(folder: Path, crash_at: int | None = None):
        task = stage1_task(cases, [], config, 4, "stage 1", device)
        if crash_at is not None:
            calls = {"n": 0}
            real = task.make_batch

            def crashing(arrays, rng, dev):
                calls["n"] += 1
                if calls["n"] == crash_at:
                    raise KeyboardInterrupt
                return real(arrays, rng, dev)

            task.make_batch = crashing
        return train_network(task, folder, config, device, DistInfo(), "1", {}, progress=False, prefetch=prefetch)

    straight = run(tmp_path / "straight")
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "resumed", crash_at=3)
    state = torch.load(tmp_path / "resumed" / "state.pt", map_location="cpu", weights_only=True)
    resumed = run(tmp_path / "resumed")
    steps = [line.split(",")[0] for line in (tmp_path / "resumed" / "log.csv").read_text().splitlines()[1:]]
    return straight, resumed, state, steps
