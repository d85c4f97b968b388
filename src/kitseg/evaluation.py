"""Pairing prediction files with ground truth and scoring them (``kits-seg evaluate``)."""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from .config import KITS_LABELS as KITS_LABEL_MAP  # the classes; io.KITS_LABELS is the file name
from .config import apply_label_mapping, tumor_left_unlabelled
from .geometry import strip_nifti_suffix
from .io import (InputError, case_labels_file, check_same_grid, is_dicom_seg, is_nifti, is_result_name, layout_hint,
                 name_a_few, nifti_named, read_labels)
from .metrics import DEFAULT_FOUND_SHARE, CaseScores, kits_scores

log = logging.getLogger(__name__)

_PREDICTION_RE = re.compile(r"^prediction_(\d+)$")


@dataclass(frozen=True)
class EvaluationPair:
    case: str
    prediction: Path
    reference: Path


def _case_names(pred: Path) -> list[str]:
    """The case names a prediction file may be of: ``case_XXXXX`` for ``prediction_XXXXX``, NAME
    for ``NAME_labels``; for nnU-Net's ``NAME_0000`` (a CT's first channel; its labels are NAME)
    NAME second."""
    stem = strip_nifti_suffix(pred.name)
    match = _PREDICTION_RE.match(stem)
    case = f"case_{match.group(1)}" if match else (stem[: -len("_labels")] if stem.endswith("_labels") else stem)
    channel = re.fullmatch(r"(.+)_0000", case)
    return [case] + ([channel.group(1)] if channel else [])


def _reference_for(pred: Path, gt_dir: Path) -> tuple[str, Path | None]:
    """The case name of a prediction file and its ground truth in ``gt_dir`` (None if absent)."""
    names = _case_names(pred)
    for name in names:
        in_folder = case_labels_file(gt_dir / name)
        if in_folder is not None:
            return name, in_folder
        found = nifti_named(gt_dir, name)
        if found is not None:
            return name, found
    return names[0], None


def pair_predictions(pred: Path, gt: Path) -> list[EvaluationPair]:
    """Match each prediction with its reference; a prediction without one is an error."""
    pairs, unmatched = match_predictions(pred, gt)
    if unmatched:
        raise InputError(f"{gt}: no ground truth for {name_a_few(unmatched)}")
    return pairs


def match_predictions(pred: Path, gt: Path) -> tuple[list[EvaluationPair], list[str]]:
    """The (prediction, reference) pairs, and the names of predictions with no reference in ``gt``.

    ``pred``: a prediction file or a folder of them; ``gt``: a reference file, a folder of KiTS
    case folders or reference files, or one case folder (its ``segmentation.nii.gz``, or KiTS21's
    ``aggregated_MAJ_seg.nii.gz``). Raises
    InputError when nothing can be paired.
    """
    pred, gt = Path(pred), Path(gt)
    if not pred.exists():
        raise InputError(f"{pred}: no such file or folder")
    if not gt.exists():
        raise InputError(f"{gt}: no such file or folder")
    gt = ground_truth_folder(gt)
    case_folder = gt if gt.is_dir() and case_labels_file(gt) else None
    if case_folder is not None:  # one case folder: its reference
        gt = case_labels_file(gt)
    if pred.is_file():
        preds = [pred]
    else:
        preds = sorted(p for p in pred.iterdir() if p.is_file() and is_nifti(p) and _is_label_output(p))
        if not preds:
            raise InputError(f"{pred}: no predictions found (prediction_XXXXX.nii.gz or NAME_labels.nii.gz)")
    if gt.is_file():
        if len(preds) > 1:
            raise InputError(f"{gt}: {len(preds)} predictions ({name_a_few([p.name for p in preds], 3)}) need a "
                             "ground-truth folder, not one file")
        if case_folder is None:  # named as in a folder's report, so that two reports join by case
            names = _case_names(preds[0])
            return [EvaluationPair(next((n for n in names if n == strip_nifti_suffix(gt.name)), names[0]),
                                   preds[0], gt)], []
        case, _ = _reference_for(preds[0], case_folder.parent)
        if _PREDICTION_RE.match(strip_nifti_suffix(preds[0].name)) and case != case_folder.name:
            raise InputError(f"{preds[0]}: is {case}'s prediction, not {case_folder.name}'s ({case_folder})")
        return [EvaluationPair(case_folder.name, preds[0], gt)], []
    pairs, unmatched = [], []
    for p in preds:
        case, ref = _reference_for(p, gt)
        if ref is None:
            unmatched.append(p.name)
        else:
            pairs.append(EvaluationPair(case, p, ref))
    if not pairs:
        raise InputError(f"{gt}: no ground truth for {name_a_few(unmatched)} (looked for GT/case_XXXXX/"
                         "segmentation.nii.gz or aggregated_MAJ_seg.nii.gz for prediction_XXXXX, GT/NAME.nii.gz or "
                         f"GT/NAME/segmentation.nii.gz for NAME_labels){layout_hint(gt)}")
    by_reference: dict[Path, list[str]] = {}
    for pair in pairs:
        by_reference.setdefault(pair.reference.resolve(), []).append(pair.prediction.name)
    twice = {ref: names for ref, names in by_reference.items() if len(names) > 1}
    if twice:  # two rows of one case would weigh it twice in the means
        ref, names = next(iter(twice.items()))
        raise InputError(f"{pred}: {' and '.join(names)} are both predictions of {ref}; keep one of them in the "
                         "folder (or score them one at a time)")
    return pairs, unmatched


def ground_truth_folder(gt: Path) -> Path:
    """``gt`` itself, or a data set's ``labelsTr`` where ``gt`` is a data set in nnU-Net's layout."""
    if gt.is_dir() and (gt / "labelsTr").is_dir() and not case_labels_file(gt):
        return gt / "labelsTr"
    return gt


def _is_label_output(path: Path) -> bool:
    stem = strip_nifti_suffix(path.name)
    return bool(_PREDICTION_RE.match(stem)) or stem.endswith("_labels")


def unpaired_references(pairs: list[EvaluationPair], pred: Path, gt: Path) -> list[str]:
    """The references of a ground-truth folder (KiTS case folders, or label files as nnU-Net's
    ``labelsTr``) that no prediction of a folder was paired with."""
    pred, gt = Path(pred), ground_truth_folder(Path(gt))
    if pred.is_file() or gt.is_file() or case_labels_file(gt):
        return []  # one file, or one case, scored on purpose
    paired = {pair.reference.resolve() for pair in pairs}
    unpaired = []
    for entry in sorted(gt.iterdir()):
        reference = case_labels_file(entry) if entry.is_dir() else entry
        if (reference is not None and not entry.name.startswith(".") and is_nifti(reference)
                and not is_result_name(reference) and reference.resolve() not in paired):
            unpaired.append(entry.name if entry.is_dir() else strip_nifti_suffix(entry.name))
    return unpaired


def _check_kits_labels(volume, path: Path, ground_truth: bool) -> None:
    """KiTS19 label maps hold 0, 1 and 2 only: another value would be scored as kidney without a word."""
    stray = KITS_LABEL_MAP.stray_values(volume.array)
    if stray:
        other_tool = (", or the ground truth's alone for another tool's labels, e.g. --map-gt-labels 2=1 3=1 '*=0' "
                      "(TotalSegmentator's kidneys)" if ground_truth else "")
        raise InputError(f"{path}: holds label {name_a_few(stray, 8)}; KiTS19 labels are 0 "
                         "(background), 1 (kidney), 2 (tumor): map the others onto these, e.g. --map-labels 3=1 "
                         f"(KiTS21/23's cysts scored within the kidney region){other_tool}")


def _read_label_map(path: Path, dicom_seg: bool, series_near: Sequence[Path]):
    """A NIfTI label map, or a DICOM SEG's kidney and tumor on its series' grid (found beside it,
    or in ``series_near``)."""
    if dicom_seg:
        from .dicom_seg import read_dicom_seg

        return read_dicom_seg(path, near=series_near).labels
    return read_labels(path)


def evaluate_pairs(pairs: list[EvaluationPair], empty_value: float = 1.0,
                   found_share: float = DEFAULT_FOUND_SHARE, mapping: dict[int, int] | None = None,
                   gt_mapping: dict[int, int] | None = None, series_near: Sequence[Path] = ()) -> list[CaseScores]:
    """KiTS19 scores of each pair; ``mapping``: label values of both files mapped onto KiTS19's first
    (:func:`kitseg.config.label_mapping`); ``gt_mapping``: the ground truth's instead (another tool's
    reference: TotalSegmentator's kidneys are ``2=1 3=1 *=0``). Where the ground truth's mapping
    leaves no value tumor, tumor is not scored (NaN: :func:`kitseg.metrics.kits_scores`).
    ``series_near``: folders where the series of DICOM SEG files may be, when not beside them."""
    scores = []
    mapping = mapping or {}
    gt_mapping = mapping if gt_mapping is None else gt_mapping
    unmapped_segs = []
    for pair in pairs:
        ref_seg, pred_seg = is_dicom_seg(pair.reference), is_dicom_seg(pair.prediction)
        ref = _read_label_map(pair.reference, ref_seg, series_near)
        pred = _read_label_map(pair.prediction, pred_seg, series_near)
        # A SEG is read as KiTS19's classes by its segments' codes: a mapping meant for label values is not its.
        for volume, path, seg, labels_mapping in ((ref, pair.reference, ref_seg, gt_mapping),
                                                  (pred, pair.prediction, pred_seg, mapping)):
            if not seg:
                volume.array = apply_label_mapping(volume.array, labels_mapping)
            elif labels_mapping:
                unmapped_segs.append(path.name)
        tumor_scored = ref_seg or not tumor_left_unlabelled(gt_mapping)
        _check_kits_labels(ref, pair.reference, ground_truth=True)
        _check_kits_labels(pred, pair.prediction, ground_truth=False)
        check_same_grid(pred.source, ref.source, pair.prediction, reference_name=f"the ground truth's ({pair.reference})")
        scores.append(kits_scores(pred.array, ref.array, ref.spacing, case=pair.case, empty_value=empty_value,
                                  found_share=found_share, tumor_scored=tumor_scored))
    if unmapped_segs:
        log.warning("%s: DICOM SEG, read as kidney and tumor by their segments' codes; the label mapping is not "
                    "applied to them", name_a_few(unmapped_segs, 3))
    return scores
