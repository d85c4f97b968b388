"""Writing phantom cases to disk in the KiTS19 folder layout.

Phantoms are generated directly in the internal orientation (axis codes I, P, L), which is
also how KiTS19 stores its files, so the arrays are written as they are, with the internal
affine: no axis handling happens here.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import nibabel as nib
import numpy as np

IMAGING_NAME = "imaging.nii.gz"
SEGMENTATION_NAME = "segmentation.nii.gz"


def save_nifti_atomic(array: np.ndarray, affine: np.ndarray, path: Path) -> None:
    """Write ``array`` with ``affine`` to ``path`` through a temporary file and ``os.replace``.

    A reader (or a crashed run) never sees a half-written file. The header's qform and
    sform both carry the affine (code 1, scanner), like the KiTS19 files.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    img = nib.Nifti1Image(array, np.asarray(affine, dtype=np.float64))
    img.header.set_data_dtype(array.dtype)
    img.set_qform(img.affine, code=1)
    img.set_sform(img.affine, code=1)
    # The suffix must stay ".nii.gz" so nibabel compresses the temporary file.
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp.nii.gz", dir=path.parent)
    os.close(fd)
    try:
        nib.save(img, tmp_name)
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise


def save_case_folder(folder: Path, ct: np.ndarray, labels: np.ndarray, affine: np.ndarray) -> Path:
    """Write ``folder/imaging.nii.gz`` (int16 HU) and ``folder/segmentation.nii.gz`` (uint8).

    Both arrays are (Z, Y, X) in the internal orientation and share ``affine``.
    Returns ``folder``.
    """
    if ct.shape != labels.shape:
        raise ValueError(f"ct {ct.shape} and labels {labels.shape} must have the same shape")
    folder = Path(folder)
    save_nifti_atomic(np.asarray(labels, dtype=np.uint8), affine, folder / SEGMENTATION_NAME)
    # The image last: a folder holding imaging.nii.gz is a complete case.
    save_nifti_atomic(np.asarray(ct, dtype=np.int16), affine, folder / IMAGING_NAME)
    return folder


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
