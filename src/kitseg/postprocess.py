"""Anatomical clean-up of a label map: drop foreground pieces that cannot be a kidney, and
relabel as kidney the minor tumor calls beside a kidney's main tumor.

A person has at most two kidneys (one piece for a horseshoe kidney), and a renal tumor grows
from a kidney, so in the KiTS19 label map kidney and tumor voxels form one or two large
connected pieces. The networks see one 2D slice at a time and sometimes mark stray blobs
elsewhere (a muscle, a lesion of the liver): those pieces are removed here.

Six rules, each chosen on phantoms (the first five on validation draws, the first three also
on real CT, `scripts/postprocess_study.py`; the sixth on draws of training masks and measured
on validation draws, `scripts/tumor_piece_study.py`) and checked on the 150 real KiTS19 masks,
none of which they change beyond annotation crumbs:
- ``require_kidney``: a piece (label > 0) without a single kidney voxel is dropped: a tumor
  seen with no kidney next to it is almost always a false positive;
- ``min_fraction``: a piece smaller than this fraction of the largest piece is dropped
  (0 keeps all sizes);
- ``same_level``: the two kidneys lie side by side, so in every real mask each piece of at
  least a tenth of the largest shares slices with it. The pieces are grouped around the piece
  whose slice range gathers the most foreground, and a piece sharing no slice with it is
  dropped: a blob on a gluteal muscle or around the sacrum far below the kidneys, or beside
  the stomach above them;
- ``min_kidney_share``: a tumor grows from a kidney that is there, so a piece holding less
  kidney than this share of the kidney of the piece that holds most (among all pieces, before
  the other rules) is dropped: an organ above the kidneys labelled tumor, with a little kidney
  where it meets an upper pole. In the real masks every piece of at least a tenth of the
  largest holds at least 32% as much kidney as the piece with most (``case_00030``: a kidney
  remnant under a 1.46 L tumor). With a share no larger than ``min_fraction``, a piece of
  kidney alone that it drops is under ``min_fraction`` of the largest piece anyway, so the
  rule only decides on pieces that hold tumor;
- ``min_tumor_share``: a kidney seldom holds more than one tumor of its size, so within each
  kept piece (here pieces join at corners too: two kidneys bridged by a tumor, or a horseshoe
  kidney, are one), a tumor piece smaller than this share of the piece's largest tumor piece
  is relabelled kidney, not removed: the networks call bits of kidney tissue tumor away from
  the tumor (docs/model_studies.md, "Tumors counted one by one"). In the real masks every tumor of at
  least 1 mL holds at least 26.6% of the volume of its kidney's largest tumor (``case_00001``:
  satellites of 1.8 and 1.2 mL beside a 4.3 mL tumor, the one real kidney with more than one);
  tumors in the other kidney are not compared. On those masks the default 0.2 relabels only
  crumbs: under 0.04 mL in eight, 0.13 mL beside a 1.39 L tumor in ``case_00114``. Where the
  model's only call on a true tumor is a kidney's smaller call, it is made kidney too (6 of
  120 phantom draws, each a tumor otherwise missed);
- ``max_pieces``: a person has two kidneys at most, so of the pieces the first four rules keep,
  only the two largest stay (before the tumor relabelling): a bowel loop or a third
  kidney-like blob at the kidneys' level goes. No real mask holds a third piece of even 1% of
  its largest.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from .config import KITS_LABELS
from .morphology import bounding_box

KIDNEY = KITS_LABELS.value("kidney")
TUMOR = KITS_LABELS.value("tumor")
# Face-connected pieces: diagonal contacts on a 5 mm grid are too weak to join two organs.
_STRUCTURE = ndimage.generate_binary_structure(3, 1)
# The tumor rule joins at corners too, as kitseg.metrics counts tumors: a corner contact
# within a kidney is the same lesion, not a second one.
_CORNERS = ndimage.generate_binary_structure(3, 3)


@dataclass(frozen=True)
class CleanupRules:
    """Which pieces to drop (defaults chosen in `scripts/postprocess_study.py`, see MODEL_CARD.md).

    Attributes:
        require_kidney: drop pieces that hold no kidney voxel.
        min_fraction: drop pieces smaller than this fraction of the largest piece, in [0, 1].
        same_level: drop pieces that share no slice (axis 0, cranio-caudal) with the main group.
        min_kidney_share: drop pieces whose kidney voxels are fewer than this share of the most
            kidney voxels any piece holds, in [0, 1] (0 keeps them all; the default 0.1 is a
            third of the lowest share in the real masks and no more than ``min_fraction``).
        min_tumor_share: within each kept piece, relabel kidney the tumor pieces smaller than
            this share of the piece's largest tumor piece, in [0, 1] (0 keeps them all; the
            default 0.2 is below the lowest share of a real tumor of 1 mL or more, 0.266).
        max_pieces: of the pieces the rules above keep, keep only this many, the largest,
            before ``min_tumor_share`` relabels (0 keeps them all; the default 2: two kidneys
            at most).
    """

    require_kidney: bool = True
    min_fraction: float = 0.1
    same_level: bool = True
    min_kidney_share: float = 0.1
    min_tumor_share: float = 0.2
    max_pieces: int = 2

    def __post_init__(self) -> None:
        for name in ("min_fraction", "min_kidney_share", "min_tumor_share"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        try:
            whole = not isinstance(self.max_pieces, bool) and operator.index(self.max_pieces) >= 0
        except TypeError:
            whole = False
        if not whole:
            raise ValueError(f"max_pieces must be a whole number >= 0, got {self.max_pieces!r}")


@dataclass(frozen=True)
class CleanupReport:
    kept: int
    removed: int
    removed_voxels: int
    relabelled_voxels: int = 0  # minor tumor calls made kidney


def remove_stray_components(labels: np.ndarray, rules: CleanupRules = CleanupRules()) -> CleanupReport:
    """Apply the clean-up ``rules`` to ``labels`` in place: zero the foreground pieces they
    reject, then relabel kidney the minor tumor pieces within each kept piece.

    Args:
        labels: 3D integer label map (0 background, 1 kidney, 2 tumor), changed in place.
        rules: which pieces to drop, which tumor pieces to relabel.
    Returns:
        How many pieces were kept and removed, how many voxels were cleared and relabelled.
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
    kidney = np.bincount(pieces[region == KIDNEY], minlength=count + 1)
    if rules.require_kidney:
        keep &= kidney > 0
    if rules.min_kidney_share > 0:
        keep &= kidney >= rules.min_kidney_share * kidney[1:].max()
    if rules.min_fraction > 0:
        keep &= sizes >= rules.min_fraction * sizes[1:].max()
    if rules.same_level and keep[1:].sum() > 1:
        keep &= _main_level_group(pieces, sizes, keep)
    if rules.max_pieces and keep[1:].sum() > rules.max_pieces:
        kept = np.flatnonzero(keep)
        largest = kept[np.argsort(-sizes[kept], kind="stable")[: rules.max_pieces]]
        keep[:] = False
        keep[largest] = True
    if not keep[1:].any():
        # No piece passes (e.g. only tumor predicted): keeping the largest is safer than an
        # empty map, which would hide the finding from the user entirely.
        keep[int(np.argmax(sizes[1:])) + 1] = True
    removed_voxels = 0
    if not keep[1:].all():
        drop = ~keep[pieces]
        drop &= pieces > 0
        removed_voxels = int(drop.sum())
        region[drop] = 0
    relabelled = _relabel_minor_tumors(region, rules.min_tumor_share) if rules.min_tumor_share > 0 else 0
    kept = int(keep[1:].sum())
    return CleanupReport(kept, count - kept, removed_voxels, relabelled)


def _relabel_minor_tumors(region: np.ndarray, share: float) -> int:
    """Relabel kidney, in place, each tumor piece under ``share`` of its kidney's largest one.

    Kidneys and tumors are pieces joined at corners here, so that each tumor piece lies in one
    kidney piece.
    """
    tumors, count = ndimage.label(region == TUMOR, structure=_CORNERS)
    if count < 2:
        return 0
    kidneys, _ = ndimage.label(region > 0, structure=_CORNERS)
    sizes = np.bincount(tumors.ravel(), minlength=count + 1)
    sizes[0] = 0
    in_tumor = tumors > 0
    owner = np.zeros(count + 1, np.int64)  # each tumor piece's kidney piece (0: none, for index 0)
    owner[tumors[in_tumor]] = kidneys[in_tumor]  # any voxel will do: the whole piece lies in one kidney
    largest = np.zeros(int(owner.max()) + 1, np.int64)
    np.maximum.at(largest, owner, sizes)
    is_minor = sizes < share * largest[owner]  # index 0 (background): 0 < share * 0 is False
    if not is_minor.any():
        return 0
    relabel = is_minor[tumors]
    region[relabel] = KIDNEY
    return int(relabel.sum())


def _main_level_group(pieces: np.ndarray, sizes: np.ndarray, candidates: np.ndarray) -> np.ndarray:
    """Which pieces share slices with the anchor piece whose slice-sharing group is heaviest.

    Anchoring on the group rather than on the largest piece alone keeps the two kidneys when a
    single false piece (a gluteal muscle, say) outweighs either kidney but not both together.
    """
    slices = [box[0] for box in ndimage.find_objects(pieces)]
    labels = np.flatnonzero(candidates)
    starts = np.array([slices[i - 1].start for i in labels])
    stops = np.array([slices[i - 1].stop for i in labels])
    shares = (starts[:, None] < stops[None, :]) & (starts[None, :] < stops[:, None])  # ranges intersect
    weight = shares @ sizes[labels]
    anchor = int(np.argmax(weight))
    group = np.zeros_like(candidates)
    group[labels[shares[anchor]]] = True
    return group
