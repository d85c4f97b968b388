"""KiTS19 scores against hand-computed values on tiny label maps."""

from __future__ import annotations

import csv
import math

import numpy as np
import pytest

from kitseg.metrics import CSV_COLUMNS, CaseScores, aggregate, dice, kits_scores, per_slice_dice, write_scores_csv


def test_dice_hand_computed():
    pred = np.array([1, 1, 1, 0, 0], dtype=bool)
    ref = np.array([0, 0, 1, 1, 0], dtype=bool)
    assert dice(pred, ref) == pytest.approx(2 * 1 / 5)  # 3 + 2 voxels, overlap 1
    assert dice(pred, pred) == 1.0
    assert dice(pred, ~pred) == 0.0


def test_dice_empty_cases():
    empty = np.zeros((2, 3, 4), dtype=bool)
    full = np.ones((2, 3, 4), dtype=bool)
    assert dice(empty, empty) == 1.0
    assert math.isnan(dice(empty, empty, empty_value=math.nan))
    assert dice(empty, full) == 0.0 and dice(full, empty) == 0.0


def test_dice_shape_mismatch_names_both_shapes():
    with pytest.raises(ValueError, match=r"\(2, 3\).*\(3, 2\)"):
        dice(np.zeros((2, 3), bool), np.zeros((3, 2), bool))


def labels_pair() -> tuple[np.ndarray, np.ndarray]:
    """pred: kidney 3 voxels of which 1 tumor; ref: kidney 2 voxels, 1 tumor elsewhere."""
    pred = np.zeros((2, 3, 4), dtype=np.uint8)
    ref = np.zeros((2, 3, 4), dtype=np.uint8)
    pred[0, 0, 0:3] = [1, 1, 2]
    ref[0, 0, 2] = 1  # the predicted tumor voxel is kidney in the reference
    ref[1, 2, 3] = 2
    return pred, ref


def test_kits_scores_hand_computed():
    pred, ref = labels_pair()
    s = kits_scores(pred, ref, spacing_mm=(0.5, 0.8, 0.8), case="case_x")
    # kidney = label > 0 (tumor counts as kidney): |P|=3, |R|=2, overlap 1 -> 0.4
    assert s.kidney_dice == pytest.approx(0.4)
    # tumor = label == 2: |P|=1, |R|=1, overlap 0 -> 0
    assert s.tumor_dice == 0.0
    assert s.composite_dice == pytest.approx(0.2)
    voxel_ml = 0.5 * 0.8 * 0.8 / 1000
    assert s.kidney_ml == pytest.approx(3 * voxel_ml)
    assert s.tumor_ml == pytest.approx(1 * voxel_ml)
    assert s.ref_kidney_ml == pytest.approx(2 * voxel_ml)
    assert s.ref_tumor_ml == pytest.approx(1 * voxel_ml)
    assert s.case == "case_x"
    assert list(s.to_row()) == list(CSV_COLUMNS)


def test_kits_scores_tumor_free_case():
    pred = np.zeros((3, 4, 5), dtype=np.uint8)
    pred[1, 1:3, 1:3] = 1
    ref = pred.copy()
    s = kits_scores(pred, ref, spacing_mm=(1, 1, 1))
    assert (s.kidney_dice, s.tumor_dice, s.composite_dice) == (1.0, 1.0, 1.0)
    s = kits_scores(pred, ref, spacing_mm=(1, 1, 1), empty_value=math.nan)
    assert s.kidney_dice == 1.0 and math.isnan(s.tumor_dice) and math.isnan(s.composite_dice)


def test_kits_scores_counts_across_chunks():
    # More slices than one counting chunk: a chunking bug would drop or double counts.
    rng = np.random.default_rng(0)
    pred = rng.integers(0, 3, size=(150, 6, 7), dtype=np.uint8)
    ref = rng.integers(0, 3, size=(150, 6, 7), dtype=np.uint8)
    s = kits_scores(pred, ref, spacing_mm=(2.0, 1.0, 1.0))
    assert s.kidney_dice == pytest.approx(dice(pred > 0, ref > 0))
    assert s.tumor_dice == pytest.approx(dice(pred == 2, ref == 2))
    assert s.kidney_ml == pytest.approx(np.count_nonzero(pred) * 2.0 / 1000)


def test_kits_scores_errors():
    with pytest.raises(ValueError, match=r"pred \(2, 3, 4\) vs ref \(2, 3, 5\)"):
        kits_scores(np.zeros((2, 3, 4), np.uint8), np.zeros((2, 3, 5), np.uint8), (1, 1, 1))
    with pytest.raises(ValueError, match="spacing"):
        kits_scores(np.zeros((2, 3, 4), np.uint8), np.zeros((2, 3, 4), np.uint8), (1, 0, 1))


def test_per_slice_dice():
    pred, ref = labels_pair()
    kidney = per_slice_dice(pred, ref, "kidney")
    assert kidney.shape == (2,)
    assert kidney[0] == pytest.approx(2 * 1 / (3 + 1))  # slice 0: pred 3, ref 1, overlap 1
    assert kidney[1] == 0.0  # slice 1: only the reference tumor
    tumor = per_slice_dice(pred, ref, "tumor")
    np.testing.assert_array_equal(tumor, [0.0, 0.0])
    # Along the last axis: columns 0, 1 have only prediction, 2 both, 3 only reference.
    np.testing.assert_allclose(per_slice_dice(pred, ref, "kidney", axis=2), [0.0, 0.0, 1.0, 0.0])
    # Slices with nothing in either are NaN by default (skipped when ranking worst slices).
    rows = per_slice_dice(pred, ref, "kidney", axis=1)
    assert math.isnan(rows[1]) and rows[0] == pytest.approx(2 / 4)
    assert per_slice_dice(pred, ref, "kidney", axis=1, empty_value=1.0)[1] == 1.0
    with pytest.raises(ValueError, match="region"):
        per_slice_dice(pred, ref, "cyst")  # type: ignore[arg-type]


def make_scores(case: str, kidney: float, tumor: float) -> CaseScores:
    return CaseScores(case, kidney, tumor, (kidney + tumor) / 2, 100.0, 10.0, 110.0, 12.0)


def test_aggregate_ignores_and_counts_nan():
    scores = [make_scores("a", 0.9, 0.5), make_scores("b", 0.7, math.nan), make_scores("c", 0.8, 0.7)]
    agg = aggregate(scores)
    assert agg["n_cases"] == 3
    assert agg["kidney_dice"] == pytest.approx(0.8)
    assert agg["tumor_dice"] == pytest.approx(0.6)  # mean of 0.5 and 0.7
    assert agg["tumor_dice_n_nan"] == 1 and agg["kidney_dice_n_nan"] == 0
    assert agg["composite_dice_n_nan"] == 1
    assert agg["kidney_ml"] == pytest.approx(100.0)
    empty = aggregate([])
    assert empty["n_cases"] == 0 and math.isnan(empty["kidney_dice"])


def test_write_scores_csv(tmp_path):
    scores = [make_scores("case_00001", 0.9, 0.5), make_scores("case_00002", 0.7, math.nan)]
    path = write_scores_csv(scores, tmp_path / "scores.csv")
    with open(path, newline="") as handle:
        rows = list(csv.reader(handle))
    assert rows[0] == list(CSV_COLUMNS)
    assert [r[0] for r in rows[1:]] == ["case_00001", "case_00002", "mean"]
    assert float(rows[1][1]) == 0.9 and float(rows[1][2]) == 0.5
    assert rows[2][2] == "nan"
    assert float(rows[3][1]) == pytest.approx(0.8) and float(rows[3][2]) == pytest.approx(0.5)
    # Written atomically: no temporary file left behind; rewriting replaces the file.
    write_scores_csv(scores[:1], path)
    assert [p.name for p in tmp_path.iterdir()] == ["scores.csv"]
    with open(path, newline="") as handle:
        assert len(list(csv.reader(handle))) == 3
