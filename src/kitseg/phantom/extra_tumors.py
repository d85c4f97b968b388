"""Extra tumors grown into a real mask: more small tumors for a model to learn from.

The 120 KiTS19 training masks hold about 35 tumors under 10 mL, and these are what the
segmenter misses most (model card). Drawing each mask once more does not add tumors; growing
new ones into the kidneys of the training masks does: each mask then shows its real tumor and one
or more small ones, deep in the parenchyma or bulging out of the cortex, which the phantom then
paints with that case's tumor look. The label map changes with them, so image and segmentation
still agree voxel for voxel. For training data only: validation masks must stay as they are.

Arrays are (Z, Y, X); lengths are millimetres.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from ._grid import smooth_field
from .kidney import KIDNEY, TUMOR

# Axis ratios of the ellipsoid, about 1: small renal tumors are round.
_AXIS_RATIO = (0.75, 1.3)
# How far outside the kidney a tumor may reach, as a fraction of its radius: a tumor centred
# near the surface bulges out of the cortex (exophytic), as small renal tumors often do.
_BULGE_FRACTION = 0.6
# Amplitude of the outline's smooth irregularity (fraction of the radius).
_OUTLINE_WOBBLE = 0.12


def add_synthetic_tumors(
    labels: np.ndarray,
    spacing: tuple[float, float, float],
    rng: np.random.Generator,
    count: int,
    volume_ml: tuple[float, float],
) -> np.ndarray:
    """A copy of ``labels`` with ``count`` extra tumors (label 2) grown inside the kidneys.

    Each is an ellipsoid of a volume drawn log-uniformly in ``volume_ml``, with axis ratios in
    0.75-1.3, a random orientation and a smoothly irregular outline, centred on a random kidney
    voxel (label 1). It takes the kidney voxels it covers and, near the surface, background
    voxels within 0.6 of its radius of the kidney, so that it may bulge out of the cortex; it
    never reaches further out. Masks without kidney voxels are returned unchanged.

    Args:
        labels: (Z, Y, X) label map: 0 background, 1 kidney, 2 tumor.
        spacing: (sz, sy, sx) voxel size in mm.
        rng: the source of every random choice.
        count: how many tumors to add.
        volume_ml: (low, high) range of each tumor's volume before it is clipped to the kidney.
    """
    out = np.array(labels, dtype=np.uint8, copy=True)
    spacing_arr = np.asarray(spacing, dtype=float)
    for _ in range(count):
        kidney = np.argwhere(out == KIDNEY)
        if not len(kidney):
            break
        centre = kidney[rng.integers(len(kidney))]
        volume_mm3 = 1000.0 * float(np.exp(rng.uniform(np.log(volume_ml[0]), np.log(volume_ml[1]))))
        ratios = rng.uniform(*_AXIS_RATIO, size=3)
        radii = ratios * (3.0 * volume_mm3 / (4.0 * np.pi * ratios.prod())) ** (1.0 / 3.0)
        _grow_tumor(out, centre, radii, _random_rotation(rng), spacing_arr, rng)
    return out


def _grow_tumor(labels: np.ndarray, centre: np.ndarray, radii: np.ndarray, rotation: np.ndarray,
                spacing: np.ndarray, rng: np.random.Generator) -> None:
    """Paint one ellipsoidal tumor into ``labels`` in place (see :func:`add_synthetic_tumors`)."""
    reach = radii.max() * (1.0 + _OUTLINE_WOBBLE) + 2.0 * spacing.max()
    lo = np.maximum(centre - np.ceil(reach / spacing).astype(int), 0)
    hi = np.minimum(centre + np.ceil(reach / spacing).astype(int) + 1, labels.shape)
    box = tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))
    grids = np.meshgrid(*[(np.arange(a, b) - c) * d for a, b, c, d in zip(lo, hi, centre, spacing)], indexing="ij")
    offsets = np.stack(grids, axis=-1) @ rotation  # mm, in the ellipsoid's own axes
    radius_fraction = np.sqrt(((offsets / radii) ** 2).sum(axis=-1))
    outline = 1.0 + _OUTLINE_WOBBLE * smooth_field(rng, radius_fraction.shape, tuple(spacing), radii.mean())
    inside = radius_fraction < outline
    region = labels[box]
    near_kidney = ndimage.distance_transform_edt(region == 0, sampling=spacing) <= _BULGE_FRACTION * radii.mean()
    region[inside & ((region > 0) | near_kidney)] = TUMOR


def _random_rotation(rng: np.random.Generator) -> np.ndarray:
    """A uniformly random 3D rotation matrix (QR of a Gaussian matrix, signs fixed)."""
    q, r = np.linalg.qr(rng.standard_normal((3, 3)))
    q *= np.sign(np.diag(r))
    if np.linalg.det(q) < 0:
        q[:, 0] = -q[:, 0]
    return q
