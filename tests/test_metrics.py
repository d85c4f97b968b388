"""KiTS19 scores against hand-computed values on tiny label maps."""

from __future__ import annotations

import csv
import math

import numpy as np
import pytest

from kitseg.metrics import (
    CSV_COLUMNS,
    CaseScores,
    aggregate,
    describe_found,
    dice,
    kits_scores,
    labelled_ml,
    per_slice_dice,
    tumor_detection,
    write_scores_csv,
)


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


def make_scores(case: str, kidney: float, tumor: float, tumors: int = 2, found: int = 1) -> CaseScores:
    return CaseScores(case, kidney, tumor, (kidney + tumor) / 2, 100.0, 10.0, 110.0, 12.0, tumors, found, 3, 1.5)


def detection_pair() -> tuple[np.ndarray, np.ndarray]:
    """Reference: tumor A (10 voxels, two blocks touching only at a corner: one tumor), tumor B
    (5 voxels), a 1-voxel tumor C. Prediction: 6 of A, 2 of B, a 1-voxel piece touching only C,
    a 4-voxel false piece and a 1-voxel false piece in the kidney."""
    ref = np.ones((6, 8, 8), np.uint8)
    pred = np.ones_like(ref)
    ref[0, 0:2, 0:2] = 2  # A: 4 voxels ...
    ref[1, 2:4, 2:5] = 2  # ... and 6 joined to them by a corner
    ref[4, 0, 0:5] = 2  # B
    ref[5, 7, 7] = 2  # C
    pred[0, 0:2, 0:2] = 2  # 4 of A
    pred[1, 2, 2:4] = 2  # 2 more of A
    pred[4, 0, 0:2] = 2  # 2 of B
    pred[5, 6, 6] = 2  # touches C by a corner: one piece with C's own voxel
    pred[5, 7, 7] = 2
    pred[3, 5:7, 5:7] = 2  # false, 4 voxels
    pred[2, 7, 0] = 2  # false, 1 voxel
    return pred, ref


def test_tumor_detection_hand_counted():
    pred, ref = detection_pair()
    voxel_ml = 0.125  # 5 mm voxels
    d = tumor_detection(pred, ref, (5.0, 5.0, 5.0), found_share=0.5, min_ml=0.1)
    assert d.ref_ml == pytest.approx((10 * voxel_ml, 5 * voxel_ml, voxel_ml))
    assert d.labelled_share == pytest.approx((0.6, 0.4, 1.0))
    assert d.found == 2  # A (0.6) and C; B (0.4) missed
    assert sorted(d.false_ml) == pytest.approx([voxel_ml, 4 * voxel_ml])  # the piece on C is not false
    assert tumor_detection(pred, ref, (5.0, 5.0, 5.0), found_share=0.4).found == 3
    # Specks: 1-voxel pieces (0.125 mL) fall under 0.2 mL and count neither way; the piece
    # touching the reference speck C is still not false.
    d = tumor_detection(pred, ref, (5.0, 5.0, 5.0), min_ml=0.2)
    assert d.ref_ml == pytest.approx((10 * voxel_ml, 5 * voxel_ml)) and d.found == 1
    assert d.false_ml == pytest.approx((4 * voxel_ml,))
    # kits_scores carries the counts at the defaults (0.5, 0.1 mL: every 1 mm voxel is a speck).
    s = kits_scores(pred, ref, (5.0, 5.0, 5.0))
    assert (s.ref_tumors, s.tumors_found, s.false_tumors) == (3, 2, 2)
    assert s.false_tumor_ml == pytest.approx(5 * voxel_ml)
    assert kits_scores(pred, ref, (1.0, 1.0, 1.0)).ref_tumors == 0


def test_tumor_detection_needs_shared_voxels_and_reads_any_dimension():
    # A predicted piece beside the tumor, sharing a face but no voxel: false, and the tumor missed.
    ref = np.ones((1, 4, 6), np.uint8)
    ref[0, 1:3, 0:2] = 2
    pred = np.ones_like(ref)
    pred[0, 1:3, 2:4] = 2
    d = tumor_detection(pred, ref, (10.0, 10.0, 10.0))
    assert (d.found, len(d.ref_ml), len(d.false_ml)) == (0, 1, 1)
    # 2D and 1D maps count the same way; corners join pieces in 2D too.
    plane = np.array([[2, 0, 0], [0, 2, 0], [0, 0, 0]], np.uint8)
    assert tumor_detection(plane, plane, (10.0, 10.0)).ref_ml == pytest.approx((0.2,))
    line = np.array([2, 2, 0, 2], np.uint8)
    d = tumor_detection(line, np.zeros_like(line), (100.0,))
    assert d.false_ml == pytest.approx((0.2, 0.1))


def test_tumor_detection_across_slice_chunks_matches_one_labelling():
    """The tumor boxes are found 64 slices at a time; pieces far apart in z still count once each."""
    from scipy import ndimage

    rng = np.random.default_rng(3)
    ref = np.ones((150, 12, 12), np.uint8)
    pred = np.ones_like(ref)
    for z in (2, 63, 64, 120, 147):  # across chunk borders
        ref[z : z + 2, 3:6, 3:6] = 2
    pred[rng.random(pred.shape) < 0.002] = 2
    pred[63:66, 4:5, 4:5] = 2
    d = tumor_detection(pred, ref, (10.0, 10.0, 10.0), min_ml=0.0)
    full = np.ones((3, 3, 3))
    ref_pieces, n_ref = ndimage.label(ref == 2, full)
    pred_pieces, n_pred = ndimage.label(pred == 2, full)
    assert len(d.ref_ml) == n_ref == 4  # z 63-65 and 64-65 join
    on_ref = [np.any(ref[pred_pieces == i] == 2) for i in range(1, n_pred + 1)]
    assert len(d.false_ml) == on_ref.count(False)
    assert sorted(d.ref_ml) == pytest.approx(sorted(np.bincount(ref_pieces.ravel())[1:] * 1.0))


def test_tumor_detection_without_tumors_and_bad_arguments():
    kidney = np.ones((3, 4, 4), np.uint8)
    d = tumor_detection(kidney, kidney, (1, 1, 1))
    assert (d.ref_ml, d.false_ml, d.found) == ((), (), 0)
    s = kits_scores(kidney, kidney, (1, 1, 1))
    assert (s.ref_tumors, s.tumors_found, s.false_tumors, s.false_tumor_ml) == (0, 0, 0, 0.0)
    assert math.isnan(aggregate([s])["tumors_found_rate"])
    with pytest.raises(ValueError, match="found_share"):
        tumor_detection(kidney, kidney, (1, 1, 1), found_share=0.0)
    with pytest.raises(ValueError, match="min_ml"):
        tumor_detection(kidney, kidney, (1, 1, 1), min_ml=-1.0)
    with pytest.raises(ValueError, match=r"\(3, 4, 4\).*\(3, 4, 5\)"):
        tumor_detection(kidney, np.ones((3, 4, 5), np.uint8), (1, 1, 1))
    with pytest.raises(ValueError, match="at least one axis"):
        tumor_detection(np.uint8(2), np.uint8(2), ())
    # Empty maps score as before: Dice is the empty value, no tumors.
    empty = np.zeros((0, 4, 4), np.uint8)
    s = kits_scores(empty, empty, (1, 1, 1))
    assert s.kidney_dice == 1.0 and (s.ref_tumors, s.false_tumors) == (0, 0)


def test_aggregate_ignores_and_counts_nan():
    scores = [make_scores("a", 0.9, 0.5), make_scores("b", 0.7, math.nan), make_scores("c", 0.8, 0.7)]
    agg = aggregate(scores)
    assert agg["n_cases"] == 3
    assert agg["kidney_dice"] == pytest.approx(0.8)
    assert agg["tumor_dice"] == pytest.approx(0.6)  # mean of 0.5 and 0.7
    assert agg["tumor_dice_n_nan"] == 1 and agg["kidney_dice_n_nan"] == 0
    assert agg["composite_dice_n_nan"] == 1
    assert agg["kidney_ml"] == pytest.approx(100.0)
    assert agg["ref_tumors"] == pytest.approx(2.0)  # per case
    # Found over all tumors, not a mean of rates: 1 + 3 found of 2 + 6.
    rate = aggregate([make_scores("a", 0.9, 0.5), make_scores("b", 0.9, 0.5, tumors=6, found=3)])["tumors_found_rate"]
    assert rate == pytest.approx(4 / 8)
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
    assert rows[1][CSV_COLUMNS.index("tumors_found")] == "1"  # counts as integers, their means as floats
    assert float(rows[3][CSV_COLUMNS.index("false_tumors")]) == 3.0
    assert float(rows[3][1]) == pytest.approx(0.8) and float(rows[3][2]) == pytest.approx(0.5)
    # Written atomically: no temporary file left behind; rewriting replaces the file.
    write_scores_csv(scores[:1], path)
    assert [p.name for p in tmp_path.iterdir()] == ["scores.csv"]
    with open(path, newline="") as handle:
        assert len(list(csv.reader(handle))) == 3
    # Settings: columns after the scores, one value in every row; never in place of a score.
    write_scores_csv(scores, path, {"label_mapping": "3=1", "found_share": 0.5})
    with open(path, newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert list(rows[0]) == [*CSV_COLUMNS, "label_mapping", "found_share"]
    assert [(r["label_mapping"], r["found_share"]) for r in rows] == [("3=1", "0.5")] * 3
    with pytest.raises(ValueError, match="tumor_dice"):
        write_scores_csv(scores, path, {"tumor_dice": 1.0})


def test_describe_found_says_each_labels_volume_in_ml():
    labels = np.zeros((10, 10, 10), np.uint8)
    spacing = (2.0, 1.0, 0.5)  # 1 mm^3 a voxel: 1000 voxels a mL
    assert labelled_ml(labels, spacing) == (0.0, 0.0) and describe_found(labels, spacing) == "no kidney found"
    labels[:5] = 1  # 500 voxels
    assert describe_found(labels, spacing) == "kidney 0.5 mL, no tumor"
    labels[:2] = 2  # 200 of them tumor: KiTS19's kidney region holds it
    assert labelled_ml(labels, spacing) == pytest.approx((0.5, 0.2))
    assert describe_found(labels, spacing) == "kidney 0.5 mL including tumor 0.2 mL"


def test_label_mappings_of_other_tools_and_a_reference_without_tumor():
    from kitseg.config import (ConfigError, apply_label_mapping, describe_label_mapping, label_mapping,
                               label_mapping_text, tumor_left_unlabelled)

    # TotalSegmentator's map: 1 spleen, 2 right kidney, 3 left kidney, 5 liver; "*" is every other value but 0.
    totalseg = label_mapping(["2=1", "3=1", "*=0"])
    labels = np.array([0, 1, 2, 3, 5, 117], np.uint8)
    np.testing.assert_array_equal(apply_label_mapping(labels, totalseg), [0, 0, 1, 1, 0, 0])
    assert describe_label_mapping(totalseg) == "2=1 3=1 *=0"  # as typed, "*" last
    assert label_mapping(label_mapping_text(totalseg)) == totalseg  # JSON's text keys and back
    np.testing.assert_array_equal(apply_label_mapping(labels, label_mapping(["3=1"])), [0, 1, 2, 1, 5, 117])
    with pytest.raises(ConfigError, match=r"label \* is mapped twice"):
        label_mapping(["*=0", "*=1"])
    with pytest.raises(ConfigError, match=r"-1=0: a label value is 0..255"):  # typed, -1 is no "*"
        label_mapping({"-1": 0})
    with pytest.raises(ValueError, match=r"0..255 to be mapped, got 0..258"):  # never wrapped onto a class
        apply_label_mapping(np.array([0, 258]), totalseg)
    # Tumor is left unlabelled when 2 goes elsewhere and nothing comes to 2.
    assert tumor_left_unlabelled(totalseg) and tumor_left_unlabelled(label_mapping(["2=1"]))
    assert not tumor_left_unlabelled({}) and not tumor_left_unlabelled(label_mapping(["3=1"]))
    assert not tumor_left_unlabelled(label_mapping(["2=1", "7=2"]))

    pred = np.zeros((4, 4, 4), np.uint8)
    pred[1:3, 1:3, 1:3] = 1
    pred[1, 1, 1] = 2  # a tumor call the kidney-only reference can neither confirm nor refute
    ref = (pred > 0).astype(np.uint8)
    scored = kits_scores(pred, ref, (1.0, 1.0, 1.0), tumor_scored=False)
    assert scored.kidney_dice == 1.0 and scored.tumor_ml == pytest.approx(0.001)
    for name in ("tumor_dice", "composite_dice", "ref_tumor_ml", "ref_tumors", "tumors_found", "false_tumors",
                 "false_tumor_ml"):
        assert math.isnan(getattr(scored, name)), name
    assert math.isnan(aggregate([scored])["tumor_dice"])
    assert math.isnan(aggregate([scored])["tumors_found_rate"])  # no tumor was counted
    counted = kits_scores(pred, pred, (10.0, 10.0, 10.0))  # its tumor (1 mL a voxel here) confirmed
    assert aggregate([scored, counted])["tumors_found_rate"] == 1.0  # the unscored case counts for nothing
    assert kits_scores(pred, ref, (1.0, 1.0, 1.0)).tumor_dice == 0.0  # KiTS19's reading: a false tumor
