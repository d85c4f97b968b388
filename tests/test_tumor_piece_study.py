"""scripts/tumor_piece_study.py: the Dice it computes from counts is the Dice of the relabelled map."""

from __future__ import annotations

import numpy as np
import pytest

from kitseg.metrics import dice

from .conftest import load_script


@pytest.fixture(scope="module")
def study():
    return load_script("tumor_piece_study")


def _case():
    """A reference with two kidneys and one tumor; a prediction with the tumor half found, a
    false tumor piece in the other kidney and a false foreground piece of its own."""
    ref = np.zeros((12, 24, 40), np.uint8)
    ref[2:10, 4:14, 3:15] = 1
    ref[2:10, 4:14, 24:36] = 1
    ref[4:8, 6:10, 5:9] = 2
    labels = ref.copy()
    labels[4:8, 6:10, 5:7] = 1           # half the tumor called kidney
    labels[3:5, 8:11, 28:31] = 2          # a false tumor piece in the right-hand kidney
    labels[1:3, 18:22, 18:22] = 2         # a false piece away from both kidneys (tumor only)
    labels[9:11, 16:20, 2:5] = 1          # a smaller false kidney piece
    return labels, ref


def test_counts_give_the_dice_of_the_map_each_rule_makes(study, tmp_path):
    labels, ref = _case()
    rng = np.random.default_rng(0)
    image = rng.normal(size=labels.shape).astype(np.float32)
    probs = rng.uniform(size=labels.shape).astype(np.float32)
    spacing = (3.0, 1.0, 1.0)
    pieces, case_row = study.piece_rows("c", labels, ref, image, spacing, probs, 1 - probs, probs)
    fg_pieces = case_row.pop("fg_pieces")
    assert len(pieces) == 3 and len(fg_pieces) == 4
    study.write(tmp_path / "run.csv", pieces, [case_row], fg_pieces)
    read_pieces, cases = study.read(tmp_path / "run.csv")
    read_fg = study.read_foreground(tmp_path / "run.csv")
    assert list(cases) == ["run/c"] and len(read_fg["run/c"]) == 4

    # Rejecting the tumor pieces that touch no reference tumor: they become kidney.
    reject = np.array([r["ref_tumor_voxels"] == 0 for r in read_pieces])
    assert reject.sum() == 2
    relabelled = labels.copy()
    relabelled[3:5, 8:11, 28:31] = 1
    relabelled[1:3, 18:22, 18:22] = 1
    expected = dice(relabelled == 2, ref == 2)
    assert study.tumor_dice(cases, read_pieces, reject)[0] == pytest.approx(expected)
    assert study.tumor_dice(cases, read_pieces, np.zeros(3, bool))[0] == pytest.approx(dice(labels == 2, ref == 2))

    # Only the two largest foreground pieces kept: both small false pieces go to background.
    kept = labels.copy()
    kept[1:3, 18:22, 18:22] = 0
    kept[9:11, 16:20, 2:5] = 0
    kidney, tumor = study.dice_keeping_two(cases["run/c"], read_fg["run/c"], "voxels")
    assert kidney == pytest.approx(dice(kept > 0, ref > 0))
    assert tumor == pytest.approx(dice(kept == 2, ref == 2))
    assert study.dice_keeping_two(cases["run/c"], read_fg["run/c"], None) == pytest.approx(
        (dice(labels > 0, ref > 0), dice(labels == 2, ref == 2)))
