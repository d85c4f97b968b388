"""A quick procedural abdomen phantom: a CT in Hounsfield units with kidney/tumor labels.

This is the *simple* tier, for tests, demos and smoke runs: every structure is an analytic
shape (ellipses, ellipsoids, a bean), sized relative to the field of view, so any grid shape
and spacing gives a recognisable abdomen in a fraction of a second. For training data that
transfers to real CT, see :mod:`kitseg.phantom.realistic`.

Arrays are (Z, Y, X) in the internal orientation (axis codes I, P, L): axis 0 runs superior
-> inferior, axis 1 anterior -> posterior (rows; anterior at the top), axis 2 patient right
-> left (columns; the patient's right is on the image's left).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage

from ._nifti import kits_affine, save_case_folder

#: Label values, as in KiTS19.
BACKGROUND, KIDNEY, TUMOR = 0, 1, 2

# Tissue values (HU) of the simple phantom: a portal-venous-like contrast phase.
_HU_AIR = -1000.0
_HU_FAT = -100.0
_HU_SOFT_TISSUE = 40.0
_HU_LIVER = 60.0
_HU_BONE_CORTEX = 650.0
_HU_BONE_CANCELLOUS = 420.0
_HU_KIDNEY_CORTEX = 185.0
_HU_KIDNEY_MEDULLA = 150.0
_HU_TUMOR = 90.0


@dataclass(frozen=True)
class SyntheticCase:
    """A synthetic CT case in the internal orientation.

    Attributes:
        ct: (Z, Y, X) int16, Hounsfield units.
        labels: (Z, Y, X) uint8: 0 background, 1 kidney, 2 tumor.
        affine: 4x4 float64 voxel -> world (RAS+ mm), KiTS19 style
            ``[[0,0,-sx,ox],[0,-sy,0,oy],[-sz,0,0,oz],[0,0,0,1]]``.
    """

    ct: np.ndarray
    labels: np.ndarray
    affine: np.ndarray

    @property
    def spacing(self) -> tuple[float, float, float]:
        """Voxel size in mm along (Z, Y, X)."""
        return tuple(float(v) for v in np.linalg.norm(self.affine[:3, :3], axis=0))

    def save_case_folder(self, folder: Path) -> Path:
        """Write KiTS19 layout: ``folder/imaging.nii.gz`` (int16) and ``folder/segmentation.nii.gz`` (uint8)."""
        return save_case_folder(Path(folder), self.ct, self.labels, self.affine)


def _validate(shape: tuple[int, ...], spacing: tuple[float, ...]) -> tuple[tuple[int, int, int], tuple[float, float, float]]:
    if len(shape) != 3 or any(int(n) < 1 for n in shape):
        raise ValueError(f"shape must be three positive integers (Z, Y, X), got {shape}")
    if len(spacing) != 3 or not all(np.isfinite(s) and s > 0 for s in spacing):
        raise ValueError(f"spacing must be three positive numbers in mm (sz, sy, sx), got {spacing}")
    return tuple(int(n) for n in shape), tuple(float(s) for s in spacing)


def make_synthetic_case(
    shape: tuple[int, int, int] = (40, 96, 112),
    spacing: tuple[float, float, float] = (2.5, 1.5, 1.5),
    seed: int = 0,
    tumor: bool = True,
) -> SyntheticCase:
    """Build a procedural abdomen CT with two kidneys and, optionally, one tumor.

    Anatomy scales with the physical extent ``shape * spacing``: the body ellipse fills most of
    the axial field of view, the kidneys occupy the middle of the slice range (posterior, either
    side of the spine), the liver sits on the patient's right in the upper slices.

    Args:
        shape: (Z, Y, X) voxels; any positive sizes, odd ones included.
        spacing: (sz, sy, sx) voxel size in mm.
        seed: the same seed gives the same case (positions, sizes, tumor side, noise).
        tumor: add a heterogeneous tumor (label 2) on one kidney.

    Returns:
        A :class:`SyntheticCase` (int16 HU, uint8 labels, KiTS19-style affine).
    """
    shape, spacing = _validate(shape, spacing)
    rng = np.random.default_rng(seed)
    nz, ny, nx = shape
    sz, sy, sx = spacing

    def jitter(scale: float = 0.05) -> float:
        return 1.0 + float(rng.uniform(-scale, scale))

    # Physical coordinates (mm) as open grids: z from the top slice, y and x from the centre.
    z = (np.arange(nz, dtype=np.float32) * sz)[:, None, None]
    y = ((np.arange(ny, dtype=np.float32) - (ny - 1) / 2) * sy)[None, :, None]
    x = ((np.arange(nx, dtype=np.float32) - (nx - 1) / 2) * sx)[None, None, :]
    extent_z = max(nz * sz, 1e-3)
    body_y = 0.40 * ny * sy * jitter()  # body semi-axes (mm)
    body_x = 0.45 * nx * sx * jitter()

    def ellipsoid(cz: float, cy: float, cx: float, rz: float, ry: float, rx: float) -> np.ndarray:
        """Normalised radius (< 1 inside) of an axis-aligned ellipsoid."""
        return ((z - cz) / rz) ** 2 + ((y - cy) / ry) ** 2 + ((x - cx) / rx) ** 2

    body2d = (y / body_y) ** 2 + (x / body_x) ** 2
    inner2d = (y / (0.88 * body_y)) ** 2 + (x / (0.90 * body_x)) ** 2
    full = (nz, ny, nx)
    ct = np.full(full, _HU_AIR, dtype=np.float32)
    ct[np.broadcast_to(body2d < 1, full)] = _HU_FAT
    ct[np.broadcast_to(inner2d < 1, full)] = _HU_SOFT_TISSUE
    inside = np.broadcast_to(inner2d < 1, full)

    # Liver: patient right (negative x: columns run right -> left), anterior-upper abdomen.
    liver = ellipsoid(0.15 * extent_z, -0.10 * body_y, -0.40 * body_x,
                      0.45 * extent_z * jitter(), 0.55 * body_y, 0.42 * body_x) < 1
    ct[liver & inside] = _HU_LIVER

    # Spine: vertebral body (cortical shell, cancellous core) and a posterior process.
    spine_y, spine_r = 0.42 * body_y, 0.13 * body_x
    spine_d2 = ((y - spine_y) / spine_r) ** 2 + (x / spine_r) ** 2
    ct[np.broadcast_to(spine_d2 < 1, full)] = _HU_BONE_CORTEX
    ct[np.broadcast_to(spine_d2 < 0.6, full)] = _HU_BONE_CANCELLOUS
    process = (np.abs(x) < 0.25 * spine_r) & (y > spine_y + spine_r) & (y < spine_y + 2.3 * spine_r)
    ct[np.broadcast_to(process, full)] = _HU_BONE_CORTEX

    # Kidneys: bean shapes (an ellipsoid with a medial notch at the hilum), posterior, either
    # side of the spine, over the middle of the slice range; the right one slightly lower.
    labels = np.zeros(full, dtype=np.uint8)
    kidney_centres = []
    for side in (-1.0, 1.0):  # -1: patient right, +1: patient left
        cz = (0.55 + (0.04 if side < 0 else -0.02)) * extent_z * jitter(0.03)
        cy = 0.22 * body_y * jitter()
        cx = side * 0.45 * body_x * jitter()
        rz, ry, rx = 0.25 * extent_z * jitter(), 0.21 * body_y * jitter(), 0.15 * body_x * jitter()
        shell = ellipsoid(cz, cy, cx, rz, ry, rx)
        notch = ellipsoid(cz, cy, cx - side * 1.05 * rx, 0.45 * rz, 0.45 * ry, 0.55 * rx)
        kidney = (shell < 1) & (notch >= 1)
        labels[kidney] = KIDNEY
        ct[kidney] = _HU_KIDNEY_CORTEX
        ct[kidney & (shell < 0.45)] = _HU_KIDNEY_MEDULLA
        kidney_centres.append((side, cz, cy, cx, rz, ry, rx))

    if tumor:
        side, cz, cy, cx, rz, ry, rx = kidney_centres[int(rng.integers(2))]
        radius = min(rz, ry, rx) * float(rng.uniform(0.7, 1.0))
        # Centred near the kidney's lateral, slightly polar surface: partly exophytic.
        tz = cz + float(rng.uniform(-0.4, 0.4)) * rz
        ty = cy + float(rng.uniform(-0.3, 0.3)) * ry
        tx = cx + side * 0.7 * rx
        lesion = (ellipsoid(tz, ty, tx, radius, radius, radius) < 1) & inside
        texture = ndimage.gaussian_filter(rng.standard_normal(full).astype(np.float32), sigma=1.5)
        texture /= max(float(texture.std()), 1e-6)
        ct[lesion] = np.clip(_HU_TUMOR + 18.0 * texture[lesion], 55.0, 125.0)
        labels[lesion] = TUMOR

    ct += rng.normal(0.0, 12.0, size=full).astype(np.float32)
    ct_hu = np.clip(np.rint(ct), -1024, 3071).astype(np.int16)
    origin = (0.5 * nx * sx + 10.0, 0.5 * ny * sy + 20.0, 0.5 * extent_z - 30.0)
    return SyntheticCase(ct=ct_hu, labels=labels, affine=kits_affine(spacing, origin))
