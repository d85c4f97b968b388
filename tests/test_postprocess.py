"""Label clean-up: stray pieces go, kidneys (with their tumors) stay."""

from __future__ import annotations

import numpy as np
import pytest

from kitseg.postprocess import CleanupRules, remove_stray_components


def _two_kidneys_and_strays() -> np.ndarray:
    labels = np.zeros((12, 30, 40), np.uint8)
    labels[2:10, 5:15, 3:12] = 1  # right kidney, 720 voxels
    labels[4:7, 8:12, 8:12] = 2  # its tumor, inside
    labels[2:9, 5:14, 25:33] = 1  # left kidney, 504 voxels
    labels[2:9, 14:17, 28:31] = 2  # an exophytic tumor touching it
    labels[10:12, 22:27, 2:7] = 2  # tumor-only blob far away (a liver lesion): no kidney voxel
    labels[0, 25:28, 30:33] = 1  # a 9-voxel kidney speck
    return labels


def test_default_rules_keep_both_kidneys_with_their_tumors():
    labels = _two_kidneys_and_strays()
    before = labels.copy()
    report = remove_stray_components(labels)
    assert (report.kept, report.removed, report.removed_voxels) == (2, 2, 50 + 9)
    assert not labels[10:12, 22:27, 2:7].any() and not labels[0, 25:28, 30:33].any()
    kept = np.zeros_like(before)
    kept[:, :22] = before[:, :22]
    kept[0] = 0
    np.testing.assert_array_equal(labels, kept)  # everything else untouched, tumors included


def test_each_rule_alone():
    labels = _two_kidneys_and_strays()
    remove_stray_components(labels, CleanupRules(require_kidney=True, min_fraction=0.0))
    assert not labels[10:12, 22:27, 2:7].any() and labels[0, 25:28, 30:33].all()  # speck has kidney
    labels = _two_kidneys_and_strays()
    remove_stray_components(labels, CleanupRules(require_kidney=False, min_fraction=0.05))
    assert not labels[0, 25:28, 30:33].any() and labels[10:12, 22:27, 2:7].all()  # 50 >= 0.05 * 720


def test_a_lone_tumor_is_kept_rather_than_emptying_the_map():
    labels = np.zeros((5, 6, 6), np.uint8)
    labels[1:3, 1:4, 1:4] = 2
    report = remove_stray_components(labels)
    assert report.removed == 0 and labels.sum() == 2 * 18


def test_empty_map_and_bad_input():
    labels = np.zeros((4, 4, 4), np.uint8)
    assert remove_stray_components(labels).kept == 0
    with pytest.raises(ValueError, match="3D"):
        remove_stray_components(np.zeros((4, 4), np.uint8))
    with pytest.raises(ValueError, match="min_fraction"):
        CleanupRules(min_fraction=1.5)
