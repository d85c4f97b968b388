"""Shared fixtures: tiny synthetic volumes with non-trivial affines, and the shared data folder."""

from __future__ import annotations

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


def requires(path: Path):
    return pytest.mark.skipif(not path.exists(), reason=f"{path} is absent (shared development data)")
