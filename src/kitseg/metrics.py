"""KiTS19 scores: Dice per case, volumes, per-slice Dice, aggregation and a CSV report.

The KiTS19 definitions (Heller et al. 2019; the challenge's ``evaluation.py``):

* **kidney Dice** compares ``label > 0`` with ``label > 0`` (kidney and tumor together);
* **tumor Dice** compares ``label == 2`` with ``label == 2``;
* the **composite** is their mean.

Beside Dice, which a small tumor drags down even when it is found, each case counts tumors as a
reader does (:func:`tumor_detection`): the reference tumors, as 3D connected pieces, of which the
prediction labels at least a given share tumor ("found"), and the predicted tumor pieces that
share no voxel with a reference tumor ("false"); specks under :data:`MIN_TUMOR_ML` are not counted.

One deliberate difference: when prediction and reference are both empty, the official
``evaluation.py`` divides 0 by 0 and returns NaN without saying so (a tumor-free case scored
against a correct tumor-free prediction). Here that case returns ``empty_value``, 1.0 by
default -- perfect agreement on absence -- and NaN only when asked for. Per-case values are
kept (:class:`CaseScores`) and aggregated separately (:func:`aggregate`), so a NaN is counted,
not silently averaged away.

Label maps are integer arrays, shape (Z, Y, X) = (slices, rows, cols); ``spacing_mm`` is the
voxel size along those axes.
"""

from __future__ import annotations

import csv
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from scipy import ndimage

from .atomic import atomic_path

Region = Literal["kidney", "tumor"]

#: Column order of :func:`write_scores_csv`, and the keys of :meth:`CaseScores.to_row`.
CSV_COLUMNS: tuple[str, ...] = (
    "case",
    "kidney_dice",
    "tumor_dice",
    "composite_dice",
    "kidney_ml",
    "tumor_ml",
    "ref_kidney_ml",
    "ref_tumor_ml",
    "ref_tumors",
    "tumors_found",
    "false_tumors",
    "false_tumor_ml",
)

#: A reference tumor is "found" when at least this share of its voxels is labelled tumor.
DEFAULT_FOUND_SHARE = 0.5
#: Tumor pieces smaller than this (mL) are specks, counted neither as tumors nor as false ones:
#: 18 of the 175 tumor pieces of the 150 KiTS19 masks are under 0.05 mL, the next smallest 0.13.
MIN_TUMOR_ML = 0.1

# Slices per chunk when counting: bounds the boolean temporaries to a few tens of MB on a
# 512x512 grid instead of several full-volume copies.
_CHUNK_SLICES = 64


def _check_same_shape(pred: np.ndarray, ref: np.ndarray) -> None:
    if pred.shape != ref.shape:
        raise ValueError(
            f"prediction and reference shapes differ: pred {tuple(pred.shape)} vs ref {tuple(ref.shape)}"
        )


def _dice_from_counts(intersection: float, n_pred: float, n_ref: float, empty_value: float) -> float:
    total = n_pred + n_ref
    if total == 0:
        return float(empty_value)
    return 2.0 * intersection / total


def dice(pred: np.ndarray, ref: np.ndarray, empty_value: float = 1.0) -> float:
    """Dice coefficient ``2 |A & B| / (|A| + |B|)`` of two masks of the same shape (any shape).

    Args:
        pred, ref: boolean masks (nonzero = inside).
        empty_value: returned when both masks are empty (default 1.0: agreement on absence;
            the official KiTS19 ``evaluation.py`` gives NaN there). ``float("nan")`` is allowed.

    Returns:
        a float in [0, 1], or ``empty_value``. One empty and one non-empty mask give 0.0.
    """
    pred, ref = np.asarray(pred), np.asarray(ref)
    _check_same_shape(pred, ref)
    if pred.dtype != np.bool_:
        pred = pred != 0
    if ref.dtype != np.bool_:
        ref = ref != 0
    return _dice_from_counts(
        np.count_nonzero(pred & ref), np.count_nonzero(pred), np.count_nonzero(ref), empty_value
    )


@dataclass(frozen=True)
class CaseScores:
    """The KiTS19 scores of one case.

    Attributes:
        case: the case identifier.
        kidney_dice: Dice of ``label > 0`` (kidney + tumor, the KiTS19 "kidney" region).
        tumor_dice: Dice of ``label == 2``.
        composite_dice: mean of the two (NaN if either is NaN).
        kidney_ml, tumor_ml: predicted volumes of those same regions, in mL.
        ref_kidney_ml, ref_tumor_ml: reference volumes, in mL.
        ref_tumors: reference tumors (3D connected pieces of ``label == 2`` of at least
            :data:`MIN_TUMOR_ML`).
        tumors_found: of those, how many the prediction labels tumor for at least the
            found share of their voxels (:func:`tumor_detection`).
        false_tumors, false_tumor_ml: predicted tumor pieces (of at least :data:`MIN_TUMOR_ML`)
            sharing no voxel with a reference tumor, and their volume in mL.

    Where tumor is not scored (a reference with no tumor class; :func:`kits_scores`), every
    figure but the kidney's and the predicted volumes is NaN, the counts too.
    """

    case: str
    kidney_dice: float
    tumor_dice: float
    composite_dice: float
    kidney_ml: float
    tumor_ml: float
    ref_kidney_ml: float
    ref_tumor_ml: float
    ref_tumors: int | float
    tumors_found: int | float
    false_tumors: int | float
    false_tumor_ml: float

    def to_row(self) -> dict[str, str | float]:
        """A flat mapping in :data:`CSV_COLUMNS` order."""
        return {name: getattr(self, name) for name in CSV_COLUMNS}


def _check_spacing(spacing_mm: Sequence[float], ndim: int) -> tuple[float, ...]:
    values = tuple(float(s) for s in spacing_mm)
    if len(values) != ndim or not all(math.isfinite(s) and s > 0 for s in values):
        raise ValueError(f"spacing_mm must be {ndim} finite positive numbers, got {tuple(spacing_mm)!r}")
    return values


def _ml_per_voxel(spacing_mm: Sequence[float]) -> float:
    return math.prod(spacing_mm) / 1000.0  # mm^3 -> mL


def kits_scores(
    pred_labels: np.ndarray,
    ref_labels: np.ndarray,
    spacing_mm: Sequence[float],
    case: str = "",
    empty_value: float = 1.0,
    found_share: float = DEFAULT_FOUND_SHARE,
    detection: "TumorDetection | None" = None,
    tumor_scored: bool = True,
) -> CaseScores:
    """Score a predicted label map against the reference with the KiTS19 definitions.

    Args:
        pred_labels, ref_labels: integer label maps (0 background, 1 kidney, 2 tumor) of the
            same shape, (Z, Y, X); any other nonzero label counts as "kidney" (``label > 0``).
        spacing_mm: voxel size along each axis, in mm (volumes only; Dice is unitless).
        case: identifier stored in the result.
        empty_value: Dice when prediction and reference are both empty (see :func:`dice`).
        found_share: share of a reference tumor's voxels that must be labelled tumor for it
            to count as found (:func:`tumor_detection`).
        detection: the same maps' :func:`tumor_detection`, when the caller has it already
            (``found_share`` is then its own).
        tumor_scored: False where the reference's convention has no tumor class (a map of kidneys
            only; :func:`kitseg.config.tumor_left_unlabelled`): the tumor Dice, the composite and
            every figure of the reference's tumors are NaN (not scored), not a 0 for each tumor
            call; the predicted tumor volume is still given.

    Raises:
        ValueError: the shapes differ (both are named) or the spacing is invalid.
    """
    pred_labels, ref_labels = np.asarray(pred_labels), np.asarray(ref_labels)
    _check_same_shape(pred_labels, ref_labels)
    if pred_labels.ndim == 0:
        raise ValueError("label maps must have at least one axis")
    spacing = _check_spacing(spacing_mm, pred_labels.ndim)

    # Count in chunks of slices: boolean temporaries stay small on 600x512x512 volumes.
    counts = np.zeros(6, dtype=np.int64)  # pred_k, ref_k, both_k, pred_t, ref_t, both_t
    for start in range(0, pred_labels.shape[0], _CHUNK_SLICES):
        p = pred_labels[start : start + _CHUNK_SLICES]
        r = ref_labels[start : start + _CHUNK_SLICES]
        for offset, (pm, rm) in ((0, (p > 0, r > 0)), (3, (p == 2, r == 2))):
            counts[offset] += np.count_nonzero(pm)
            counts[offset + 1] += np.count_nonzero(rm)
            counts[offset + 2] += np.count_nonzero(np.logical_and(pm, rm, out=pm))
    pred_k, ref_k, both_k, pred_t, ref_t, both_t = (int(c) for c in counts)

    kidney = _dice_from_counts(both_k, pred_k, ref_k, empty_value)
    tumor = _dice_from_counts(both_t, pred_t, ref_t, empty_value)
    ml_per_voxel = _ml_per_voxel(spacing)
    if not tumor_scored:
        unscored = dict.fromkeys(("tumor_dice", "composite_dice", "ref_tumor_ml", "ref_tumors", "tumors_found",
                                  "false_tumors", "false_tumor_ml"), math.nan)
        return CaseScores(case=str(case), kidney_dice=kidney, kidney_ml=pred_k * ml_per_voxel,
                          tumor_ml=pred_t * ml_per_voxel, ref_kidney_ml=ref_k * ml_per_voxel, **unscored)
    if detection is None:
        detection = tumor_detection(pred_labels, ref_labels, spacing, found_share)
    return CaseScores(
        case=str(case),
        kidney_dice=kidney,
        tumor_dice=tumor,
        composite_dice=(kidney + tumor) / 2.0,
        kidney_ml=pred_k * ml_per_voxel,
        tumor_ml=pred_t * ml_per_voxel,
        ref_kidney_ml=ref_k * ml_per_voxel,
        ref_tumor_ml=ref_t * ml_per_voxel,
        ref_tumors=len(detection.ref_ml),
        tumors_found=detection.found,
        false_tumors=len(detection.false_ml),
        false_tumor_ml=float(sum(detection.false_ml)),
    )


@dataclass(frozen=True)
class TumorDetection:
    """Tumors counted piece by piece (3D connected pieces, corners included; specks left out).

    Attributes:
        ref_ml: volume of each reference tumor (specks left out), in mL.
        labelled_share: for each of them, the share of its voxels labelled tumor.
        false_ml: volume of each predicted tumor piece (specks left out) that shares no voxel
            with a reference tumor.
        found_share: the share at which a reference tumor counts as found.
    """

    ref_ml: tuple[float, ...]
    labelled_share: tuple[float, ...]
    false_ml: tuple[float, ...]
    found_share: float

    @property
    def found(self) -> int:
        return sum(share >= self.found_share for share in self.labelled_share)


def _tumor_box(labels: np.ndarray) -> tuple[slice, ...] | None:
    """The box holding every tumor voxel of a label map, found slice chunk by slice chunk."""
    if labels.size == 0:
        return None
    rows: list[np.ndarray] = []
    plane = np.zeros(labels.shape[1:], dtype=bool)
    for start in range(0, labels.shape[0], _CHUNK_SLICES):
        tumor = labels[start : start + _CHUNK_SLICES] == 2
        rows.append(tumor.reshape(tumor.shape[0], -1).any(axis=1))
        plane |= tumor.any(axis=0)
    occupied = np.flatnonzero(np.concatenate(rows))
    if occupied.size == 0:
        return None
    box = [slice(int(occupied[0]), int(occupied[-1]) + 1)]
    for axis in range(plane.ndim):
        hits = np.flatnonzero(plane.any(axis=tuple(a for a in range(plane.ndim) if a != axis)))
        box.append(slice(int(hits[0]), int(hits[-1]) + 1))
    return tuple(box)


def _pieces_and_overlap(labels: np.ndarray, other: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Voxels of each tumor piece of ``labels``, and how many of them are tumor in ``other``.

    Labelled inside the map's own tumor box, so that one map's far-off piece does not make
    the other's labelling cover the whole volume.
    """
    box = _tumor_box(labels)
    if box is None:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    tumor = labels[box] == 2
    pieces, n = ndimage.label(tumor, structure=ndimage.generate_binary_structure(tumor.ndim, tumor.ndim))
    size = np.bincount(pieces.ravel(), minlength=n + 1)[1:]
    overlap = np.bincount(pieces[other[box] == 2], minlength=n + 1)[1:]
    return size, overlap


def tumor_detection(
    pred_labels: np.ndarray,
    ref_labels: np.ndarray,
    spacing_mm: Sequence[float],
    found_share: float = DEFAULT_FOUND_SHARE,
    min_ml: float = MIN_TUMOR_ML,
) -> TumorDetection:
    """Which reference tumors the prediction finds, and which predicted tumors are false.

    A reference tumor (a 3D connected piece of ``label == 2``, corners included: a tumor drawn
    slice by slice may join its next slice at an edge) is found when the prediction labels at
    least ``found_share`` of its voxels tumor. A predicted tumor piece is false when it shares
    no voxel with a reference tumor; false tumor joined to a piece that overlaps a reference
    tumor is part of that piece, whatever its size, and not counted. Pieces under ``min_ml`` of
    either map are specks (annotation crumbs, voxels at a boundary) and not counted; a
    predicted piece that overlaps only a reference speck is neither found nor false. Dice alone
    hides both counts: a missed 2 mL tumor and a half-found one both score near 0.

    Args:
        pred_labels, ref_labels: label maps of the same shape, at least 1D (KiTS19 labels).
        spacing_mm: voxel size along each axis, in mm.
        found_share: in (0, 1].
        min_ml: >= 0.

    Raises:
        ValueError: the shapes differ, the maps have no axis, or an argument is out of range.
    """
    pred_labels, ref_labels = np.asarray(pred_labels), np.asarray(ref_labels)
    _check_same_shape(pred_labels, ref_labels)
    if pred_labels.ndim == 0:
        raise ValueError("label maps must have at least one axis")
    spacing = _check_spacing(spacing_mm, pred_labels.ndim)
    if not 0.0 < found_share <= 1.0:
        raise ValueError(f"found_share must be in (0, 1], got {found_share!r}")
    if not min_ml >= 0.0:
        raise ValueError(f"min_ml must be >= 0, got {min_ml!r}")
    ml_per_voxel = _ml_per_voxel(spacing)
    ref_size, ref_labelled = _pieces_and_overlap(ref_labels, pred_labels)
    pred_size, pred_on_ref = _pieces_and_overlap(pred_labels, ref_labels)
    counted = ref_size * ml_per_voxel >= min_ml
    false = (pred_on_ref == 0) & (pred_size * ml_per_voxel >= min_ml)
    return TumorDetection(
        ref_ml=tuple(float(n) * ml_per_voxel for n in ref_size[counted]),
        labelled_share=tuple(float(a) / float(b) for a, b in zip(ref_labelled[counted], ref_size[counted])),
        false_ml=tuple(float(n) * ml_per_voxel for n in pred_size[false]),
        found_share=found_share,
    )


_NUMERIC_FIELDS: tuple[str, ...] = CSV_COLUMNS[1:]


def aggregate(scores: Sequence[CaseScores]) -> dict[str, float]:
    """Means over cases, each ignoring NaN, with how many values were NaN.

    Returns:
        ``{"n_cases": N, "<field>": mean, "<field>_n_nan": count, ...}`` for every numeric
        field of :class:`CaseScores` (counts too: tumors per case); a mean is NaN when all its
        values are NaN (or no cases). ``"tumors_found_rate"``: tumors found over all reference
        tumors (NaN without any).
    """
    result: dict[str, float] = {"n_cases": len(scores)}
    for name in _NUMERIC_FIELDS:
        values = np.array([getattr(s, name) for s in scores], dtype=np.float64)
        finite = values[~np.isnan(values)]
        result[name] = float(finite.mean()) if finite.size else math.nan
        result[f"{name}_n_nan"] = int(values.size - finite.size)
    # Over all tumors, not a mean of per-case rates: a case with three tumors counts three times.
    # Cases whose tumor is not scored (NaN counts: a reference without a tumor class) count for nothing.
    total = np.nansum([s.ref_tumors for s in scores])
    result["tumors_found_rate"] = float(np.nansum([s.tumors_found for s in scores]) / total) if total else math.nan
    return result


def _region(labels: np.ndarray, region: Region) -> np.ndarray:
    if region == "kidney":
        return labels > 0
    if region == "tumor":
        return labels == 2
    raise ValueError(f"region must be 'kidney' or 'tumor', got {region!r}")


def per_slice_dice(
    pred_labels: np.ndarray,
    ref_labels: np.ndarray,
    label: Region,
    axis: int = 0,
    empty_value: float = math.nan,
) -> np.ndarray:
    """Dice of one KiTS19 region in each slice along ``axis``.

    Args:
        pred_labels, ref_labels: label maps of the same shape, (Z, Y, X).
        label: ``"kidney"`` (``label > 0``) or ``"tumor"`` (``label == 2``).
        axis: the slice axis (0 = axial slices in the internal orientation).
        empty_value: for slices where both are empty; NaN by default so that a plot or an
            ``argsort`` of the worst slices skips slices with nothing to segment.

    Returns:
        float64 array of shape ``(pred_labels.shape[axis],)``.
    """
    pred_labels, ref_labels = np.asarray(pred_labels), np.asarray(ref_labels)
    _check_same_shape(pred_labels, ref_labels)
    axis = axis % pred_labels.ndim
    others = tuple(a for a in range(pred_labels.ndim) if a != axis)
    pred, ref = _region(pred_labels, label), _region(ref_labels, label)
    n_pred = np.count_nonzero(pred, axis=others)
    n_ref = np.count_nonzero(ref, axis=others)
    n_both = np.count_nonzero(np.logical_and(pred, ref, out=pred), axis=others)
    total = (n_pred + n_ref).astype(np.float64)
    result = np.full(total.shape, float(empty_value), dtype=np.float64)
    filled = total > 0
    result[filled] = 2.0 * n_both[filled] / total[filled]
    return result


def labelled_ml(labels: np.ndarray, spacing_mm: Sequence[float]) -> tuple[float, float]:
    """Volumes in mL of KiTS19's regions, as :class:`CaseScores` gives them: kidney (label > 0,
    the tumor within it) and tumor (label 2)."""
    labels = np.asarray(labels)
    # Counted in place: bincount would first copy a CT-sized map as 8-byte integers (226 MB for
    # 108 x 512 x 512), which took up to 3.6 s of a 10-15 s predict on a loaded machine.
    ml_per_voxel = _ml_per_voxel(spacing_mm)
    return float(np.count_nonzero(labels) * ml_per_voxel), float(np.count_nonzero(labels == 2) * ml_per_voxel)


def describe_found(labels: np.ndarray, spacing_mm: Sequence[float]) -> str:
    """What a segmentation found, in the regions the scores use: ``kidney 316.4 mL including tumor
    35.0 mL``, ``kidney 281.4 mL, no tumor``, or ``no kidney found`` (a scan outside the kidneys,
    or a miss)."""
    kidney, tumor = labelled_ml(labels, spacing_mm)
    if kidney == 0.0:
        return "no kidney found"
    return f"kidney {kidney:.1f} mL" + (f" including tumor {tumor:.1f} mL" if tumor > 0.0 else ", no tumor")


def _csv_value(value: str | int | float) -> str:
    """Names as they are, counts as integers, floats at full precision (``nan`` for NaN)."""
    if isinstance(value, str):
        return value
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    return repr(float(value))


def write_scores_csv(scores: Sequence[CaseScores], path: str | os.PathLike,
                     settings: Mapping[str, str | float] | None = None,
                     files: Sequence[tuple[str, str]] | None = None) -> Path:
    """Write one row per case and a final ``mean`` row (NaN-ignoring means) to ``path``.

    ``files``: each case's (prediction, reference) file, as ``prediction_file`` and
    ``reference_file`` columns after the scores, so a report says what was compared.

    The ``mean`` row of a count is its mean per case (``tumors_found`` there is a share of the
    tumors only when every case holds one; :func:`aggregate` gives ``tumors_found_rate``).

    ``settings`` (what the scores depend on beyond the files, e.g. ``found_share``) become
    columns after :data:`CSV_COLUMNS`, the same value in every row, so a report read alone, or
    two reports joined, still says how each was scored.

    The file is written to a temporary file in the same folder and moved into place, so a
    reader never sees half a report. Floats are written with full precision (``repr``);
    NaN is written as ``nan``.

    Returns:
        the path written.
    """
    path = Path(path)
    means = aggregate(scores)
    rows = [s.to_row() for s in scores]
    file_columns = []
    if files is not None:
        if len(files) != len(scores):
            raise ValueError(f"{len(files)} pairs of files for {len(scores)} cases")
        file_columns = ["prediction_file", "reference_file"]
        rows = [{**row, "prediction_file": pred, "reference_file": ref} for row, (pred, ref) in zip(rows, files)]
    rows.append({"case": "mean", **{name: means[name] for name in _NUMERIC_FIELDS}})
    settings = dict(settings or {})
    clashes = sorted(set(settings) & {*CSV_COLUMNS, *file_columns})
    if clashes:
        raise ValueError(f"settings {clashes} would replace score columns")
    with atomic_path(path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=[*CSV_COLUMNS, *file_columns, *settings])
        writer.writeheader()
        for row in rows:
            writer.writerow({k: _csv_value(v) for k, v in {**row, **settings}.items()})
    return path


__all__ = [
    "CSV_COLUMNS",
    "CaseScores",
    "DEFAULT_FOUND_SHARE",
    "MIN_TUMOR_ML",
    "TumorDetection",
    "aggregate",
    "describe_found",
    "dice",
    "kits_scores",
    "labelled_ml",
    "per_slice_dice",
    "tumor_detection",
    "write_scores_csv",
]
