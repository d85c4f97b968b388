"""Writing phantom cases to disk in the KiTS19 folder layout.

Phantoms are generated directly in the internal orientation (axis codes I, P, L), which is
also how KiTS19 stores its files, so the arrays are written as they are, with the internal
affine: no axis handling happens here.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..io import KITS_IMAGE as IMAGING_NAME
from ..io import KITS_LABELS as SEGMENTATION_NAME
from ..io import save_nifti_atomic, write_kits_case

__all__ = ["IMAGING_NAME", "SEGMENTATION_NAME", "kits_affine", "save_case_folder", "save_nifti_atomic"]


def save_case_folder(folder: Path, ct: np.ndarray, labels: np.ndarray, affine: np.ndarray) -> Path:
    """Write ``folder/imaging.nii.gz`` (int16 HU) and ``folder/segmentation.nii.gz`` (uint8).

    Both arrays are (Z, Y, X) in the internal orientation, which is KiTS19's file orientation.
    """
    return write_kits_case(ct, labels, affine, folder)


def kits_affine(spacing: tuple[float, float, float], origin: tuple[float, float, float]) -> np.ndarray:
    """The KiTS19-style affine of an internal (Z, Y, X) array with ``spacing`` = (sz, sy, sx) mm.

    Column j maps array axis j to world (RAS+) mm: axis 0 -> -S (inferior), axis 1 -> -A
    (posterior), axis 2 -> -R (patient left). ``origin`` is the world position of voxel (0, 0, 0).
    """
    sz, sy, sx = (float(s) for s in spacing)
    affine = np.array(
        [[0.0, 0.0, -sx, 0.0], [0.0, -sy, 0.0, 0.0], [-sz, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 1.0]]
    )
    affine[:3, 3] = origin
    return affine
