"""scripts/tumor_piece_study.py: the Dice it computes from counts is the Dice of the relabelled map."""

from __future__ import annotations

import numpy as np
import pytest

from kitseg.metrics import dice

from .conftest import load_script


@pytest.fixture(scope="module")
def study():
    return load_script("tumor_piece_study")


# Where each predicted piece lies (test_counts_give_the_dice_of_the_map_each_rule_makes):
LEFT_TUMOR_FOUND = np.s_[4:8, 6:10, 7:9]      # the found half of the reference tumor (left kidney)
FALSE_TUMOR_RIGHT = np.s_[3:5, 8:11, 25:28]   # false tumor inside the right kidney's larger part
RIGHT_SMALLER = np.s_[:, :, 31:36]            # the right kidney's part beyond a missed plane (reference kidney)
FALSE_TUMOR_AWAY = np.s_[0:12, 16:24, 16:22]  # a large false piece, all tumor, away from both kidneys
FALSE_KIDNEY = np.s_[9:11, 16:20, 2:5]        # a small false kidney piece
SECOND_TUMOR = np.s_[4:6, 6:8, 32:34]         # a second reference tumor, found, in the right kidney's smaller part


def _case():
    """A reference with two kidneys and one tumor, and a prediction of five face-connected pieces:
    the left kidney (960 voxels, its tumor half found), a large false piece of tumor alone (576),
    the right kidney cut in two by a missed plane (480 and 400 voxels, the larger holding a false
    tumor, the smaller a found second tumor) and a small false kidney piece (24): the two largest
    pieces are not the two with most kidney, and either rule drops found tumor."""
    ref = np.zeros((12, 24, 40), np.uint8)
    ref[2:10, 4:14, 3:15] = 1
    ref[2:10, 4:14, 24:36] = 1
    ref[4:8, 6:10, 5:9] = 2
    ref[SECOND_TUMOR] = 2
    labels = ref.copy()
    labels[4:8, 6:10, 5:7] = 1  # half the tumor called kidney
    labels[FALSE_TUMOR_RIGHT] = 2
    labels[2:10, 4:14, 30] = 0
    labels[FALSE_TUMOR_AWAY] = 2
    labels[FALSE_KIDNEY] = 1
    return labels, ref


def _without(labels: np.ndarray, *regions) -> np.ndarray:
    kept = labels.copy()
    for region in regions:
        kept[region] = 0
    return kept


def test_counts_give_the_dice_of_the_map_each_rule_makes(study, tmp_path):
    labels, ref = _case()
    rng = np.random.default_rng(0)
    image = rng.normal(size=labels.shape).astype(np.float32)
    probs = rng.uniform(size=labels.shape).astype(np.float32)
    pieces, case_row = study.piece_rows("c", labels, ref, image, (3.0, 1.0, 1.0), probs, 1 - probs, probs)
    fg_pieces = case_row.pop("fg_pieces")
    assert len(pieces) == 4 and sorted(r["voxels"] for r in fg_pieces) == [24, 400, 480, 576, 960]
    study.write(tmp_path / "run.csv", pieces, [case_row], fg_pieces)
    read_pieces, cases = study.read(tmp_path / "run.csv")
    read_fg = study.read_foreground(tmp_path / "run.csv")
    assert list(cases) == ["run/c"] and len(read_fg["run/c"]) == 5

    # Rejected tumor pieces become kidney: the found tumor half (on the reference tumor) and the far piece.
    reject = np.array([r["voxels"] in (32, 576) for r in read_pieces])
    assert reject.sum() == 2
    relabelled = labels.copy()
    relabelled[LEFT_TUMOR_FOUND] = 1
    relabelled[FALSE_TUMOR_AWAY] = 1
    assert study.tumor_dice(cases, read_pieces, reject)[0] == pytest.approx(dice(relabelled == 2, ref == 2))
    assert study.tumor_dice(cases, read_pieces, np.zeros(4, bool))[0] == pytest.approx(dice(labels == 2, ref == 2))

    # Only two foreground pieces kept: the two largest, or the two holding the most kidney.
    for key, kept in (("voxels", _without(labels, RIGHT_SMALLER, np.s_[2:10, 4:14, 24:30], FALSE_KIDNEY)),
                      ("kidney_voxels", _without(labels, RIGHT_SMALLER, FALSE_TUMOR_AWAY, FALSE_KIDNEY)),
                      (None, labels)):
        expected = (dice(kept > 0, ref > 0), dice(kept == 2, ref == 2))
        assert study.dice_keeping_two(cases["run/c"], read_fg["run/c"], key) == pytest.approx(expected), key
