"""Anatomical clean-up of a label map: drop foreground pieces that cannot be a kidney.

A person has at most two kidneys (one piece for a horseshoe kidney), and a renal tumor grows
from a kidney, so in the KiTS19 label map kidney and tumor voxels form one or two large
connected pieces. The networks see one 2D slice at a time and sometimes mark stray blobs
elsewhere (a muscle, a lesion of the liver): those pieces are removed here.

Two rules, each chosen on validation phantoms and real CT (`scripts/postprocess_study.py`):
- ``require_kidney``: a piece (label > 0) without a single kidney voxel is dropped: a tumor
  seen with no kidney next to it is almost always a false positive;
- ``min_fraction``: a piece smaller than this fraction of the largest piece is dropped
  (0 keeps all sizes).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from .config import KITS_LABELS
from .morphology import bounding_box

KIDNEY = KITS_LABELS.value("kidney")
# Face-connected pieces: diagonal contacts on a 5 mm grid are too weak to join two organs.
_STRUCTURE = ndimage.generate_binary_structure(3, 1)


@dataclass(frozen=True)
class CleanupRules:
    """Which pieces to drop (defaults chosen in `scripts/postprocess_study.py`, see MODEL_CARD.md).

    Attributes:
        require_kidney: drop pieces that hold no kidney voxel.
        min_fraction: drop pieces smaller than this fraction of the largest piece, in [0, 1].
    """

    require_kidney: bool = True
    min_fraction: float = 0.1

    def __post_init__(self) -> None:
        if not 0.0 <= self.min_fraction <= 1.0:
            raise ValueError(f"min_fraction must be in [0, 1], got {self.min_fraction}")


@dataclass(frozen=True)
class CleanupReport:
    kept: int
    removed: int
    removed_voxels: int


def remove_stray_components(labels: np.ndarray, rules: CleanupRules = CleanupRules()) -> CleanupReport:
    """Zero, in place, the foreground pieces of ``labels`` that ``rules`` reject.

    Args:
        labels: 3D integer label map (0 background, 1 kidney, 2 tumor), changed in place.
        rules: which pieces to drop.
    Returns:
        How many pieces were kept and removed, and how many voxels were cleared.
    """
    if labels.ndim != 3:
        raise ValueError(f"labels must be 3D, got shape {labels.shape}")
    box = bounding_box(labels > 0)
    if box is None:
        return CleanupReport(0, 0, 0)
    region = labels[box]  # a view: clearing it clears ``labels``
    pieces, count = ndimage.label(region > 0, structure=_STRUCTURE)
    sizes = np.bincount(pieces.ravel(), minlength=count + 1)
    keep = np.ones(count + 1, bool)
    keep[0] = False
    if rules.require_kidney:
        with_kidney = np.bincount(pieces[region == KIDNEY], minlength=count + 1) > 0
        keep &= with_kidney
    if rules.min_fraction > 0:
        keep &= sizes >= rules.min_fraction * sizes[1:].max()
    if keep[1:].all():
        return CleanupReport(count, 0, 0)
    if not keep[1:].any():
        # No piece passes (e.g. only tumor predicted): keeping the largest is safer than an
        # empty map, which would hide the finding from the user entirely.
        keep[int(np.argmax(sizes[1:])) + 1] = True
    drop = ~keep[pieces]
    drop &= pieces > 0
    removed_voxels = int(drop.sum())
    region[drop] = 0
    kept = int(keep[1:].sum())
    return CleanupReport(kept, count - kept, removed_voxels)
