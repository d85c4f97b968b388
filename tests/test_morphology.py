"""dilate_ball must equal scipy's brute-force dilation by ball() voxel for voxel."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage

import kitseg.morphology as morphology
from kitseg.morphology import ball, bounding_box, dilate_ball

KITS_CASE = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "kits19" / "case_00000" / "segmentation.nii.gz"


def brute_force(mask: np.ndarray, radius: float, spacing=None) -> np.ndarray:
    return ndimage.binary_dilation(mask, structure=ball(radius, spacing))


# --- ball -----------------------------------------------------------------------------------


def test_ball_small_radii_in_voxels():
    assert ball(0).shape == (1, 1, 1) and ball(0).all()
    assert ball(0.99).sum() == 1
    assert ball(1).sum() == 7  # centre + 6 face neighbours
    assert ball(math.sqrt(2)).sum() == 19  # + 12 edge neighbours
    assert ball(1.75).sum() == 27  # the full 3x3x3 cube
    # A radius equal to an offset's length takes it in, whatever float rounding says:
    # math.sqrt(3)**2 < 3, yet the corners are in (float32 headers carry such rounding).
    assert ball(math.sqrt(3)).sum() == 27
    assert ball(math.sqrt(3) * (1 - 1e-5)).sum() == 19
    # A 20 mm ball on a 2 mm grid read from a float32 header is the exact grid's ball.
    assert np.array_equal(ball(20, (5.05, 2.0, 2.0)), ball(20, (5.05, 2.0000000715, 2.0000000715)))
    assert ball(10).shape == (21, 21, 21)


def test_ball_matches_its_definition_with_anisotropic_spacing():
    spacing = (5.0, 0.8, 0.8)
    b = ball(10, spacing)
    assert b.shape == (5, 25, 25)  # floor(10/5)=2, floor(10/0.8)=12
    centre = np.array(b.shape) // 2
    offsets = np.indices(b.shape).reshape(3, -1).T - centre
    expected = ((offsets * spacing) ** 2).sum(axis=1) <= 100.0
    np.testing.assert_array_equal(b.ravel(), expected)
    # Symmetric under every axis flip (binary_dilation reflects the structure).
    np.testing.assert_array_equal(b, b[::-1, ::-1, ::-1])


@pytest.mark.parametrize("radius", [-1.0, math.inf, math.nan])
def test_ball_rejects_bad_radius(radius):
    with pytest.raises(ValueError, match="radius"):
        ball(radius)


@pytest.mark.parametrize("spacing", [(1.0, 1.0), (1.0, 0.0, 1.0), (1.0, -2.0, 1.0), (1.0, math.nan, 1.0)])
def test_ball_rejects_bad_spacing(spacing):
    with pytest.raises(ValueError, match="spacing"):
        ball(2, spacing)


# --- dilate_ball: exhaustive equality with the brute force -----------------------------------

RADII = [0.0, 0.5, 1.0, math.sqrt(2), 1.5, math.sqrt(3), 2.0, 2.5, 3.0, 4.0]
SPACINGS = [None, (1.0, 1.0, 1.0), (2.5, 0.8, 0.8), (0.5, 0.8, 0.8), (1.7, 0.3, 1.0), (5.0, 0.92, 0.92)]


def random_mask(rng: np.random.Generator) -> np.ndarray:
    shape = tuple(int(n) for n in rng.integers(1, 13, size=3))
    kind = rng.integers(0, 5)
    if kind == 0:
        return np.zeros(shape, dtype=bool)
    if kind == 1:  # sparse points, often on the border
        mask = rng.random(shape) < 0.03
        mask[tuple(rng.integers(0, n) for n in shape)] = True
        return mask
    if kind == 2:  # dense
        return rng.random(shape) < 0.4
    if kind == 3:  # a full face: foreground touching the border everywhere along it
        mask = np.zeros(shape, dtype=bool)
        axis = rng.integers(0, 3)
        index = [slice(None)] * 3
        index[axis] = -1 if rng.random() < 0.5 else 0
        mask[tuple(index)] = True
        return mask
    return np.ones(shape, dtype=bool)


@pytest.mark.parametrize("seed", range(6))
def test_dilate_ball_equals_brute_force_on_random_inputs(seed):
    rng = np.random.default_rng(seed)
    for _ in range(60):
        mask = random_mask(rng)
        radius = float(rng.choice(RADII)) * (1.0 if rng.random() < 0.5 else 1.37)
        spacing = SPACINGS[rng.integers(0, len(SPACINGS))]
        # Tiny blocks force the Z-slab path with halos; large ones the single-block path.
        block = int(rng.choice([1, 7, 60, 1 << 22]))
        got = dilate_ball(mask, radius, spacing, max_block_voxels=block)
        expected = brute_force(mask, radius, spacing)
        assert got.dtype == np.bool_ and got.shape == mask.shape
        np.testing.assert_array_equal(got, expected, err_msg=f"{mask.shape=} {radius=} {spacing=} {block=}")


def test_dilate_ball_far_apart_parts_and_nonbool_input():
    # Two "kidneys" far apart along X (the box is split), a third part along Z; uint8 labels.
    labels = np.zeros((23, 17, 61), dtype=np.uint8)
    labels[3:6, 4:9, 2:7] = 1
    labels[10:14, 6:12, 50:58] = 2
    labels[20, 16, 30] = 1
    for spacing, radius in [(None, 3.0), ((2.0, 0.8, 0.8), 4.0)]:
        expected = brute_force(labels > 0, radius, spacing)
        np.testing.assert_array_equal(dilate_ball(labels, radius, spacing), expected)
        np.testing.assert_array_equal(dilate_ball(labels, radius, spacing, max_block_voxels=200), expected)


def test_dilate_ball_empty_and_radius_zero():
    mask = np.zeros((4, 5, 6), dtype=bool)
    assert not dilate_ball(mask, 10).any()
    mask[1, 2, 3] = True
    np.testing.assert_array_equal(dilate_ball(mask, 0), mask)
    np.testing.assert_array_equal(dilate_ball(mask, 0.5, (1.0, 1.0, 1.0)), mask)


# Spacings whose float squared offset lengths straddle radius**2 for offsets of equal true
# length, e.g. (3 * 0.1)**2 > 0.3**2 == (1 * 0.3)**2: the ball keeps one and drops the other.
TIE_CASES = [((0.1, 0.1, 0.3), 0.3), ((0.1, 0.2, 0.3), 0.6), ((0.7, 0.1, 0.1), 0.7)]


@pytest.mark.parametrize(("spacing", "radius"), TIE_CASES)
def test_dilate_ball_on_float_ties_equals_brute_force(spacing, radius):
    lengths = morphology._squared_offset_lengths(radius, spacing)
    inside = lengths <= radius**2
    assert 0 < lengths[~inside].min() - lengths[inside].max() < 1e-15  # really a near-tie
    rng = np.random.default_rng(7)
    for _ in range(25):
        mask = rng.random(tuple(rng.integers(3, 11, size=3))) < 0.05
        np.testing.assert_array_equal(dilate_ball(mask, radius, spacing), brute_force(mask, radius, spacing))


def test_tie_check_repairs_an_unlucky_feature_transform(monkeypatch):
    """If the feature transform picks the out-of-ball one of two tied offsets, the result is still exact."""
    # A radius whose slackened square (_RADIUS_SLACK) is 0.09 exactly: the tie sits on the ball's edge.
    spacing, radius = (0.1, 0.1, 0.3), 0.3 / (1 + morphology._RADIUS_SLACK)
    centre = np.array([4, 4, 4])
    inside_offset, outside_offset = np.array([0, 0, 1]), np.array([3, 0, 0])  # 0.3 mm both
    mask = np.zeros((9, 9, 9), dtype=bool)
    mask[tuple(centre - inside_offset)] = True
    mask[tuple(centre - outside_offset)] = True
    expected = brute_force(mask, radius, spacing)
    assert expected[tuple(centre)]

    real_edt = ndimage.distance_transform_edt

    def unlucky_edt(input, sampling=None, return_distances=True, return_indices=False, indices=None, **kw):
        real_edt(input, sampling=sampling, return_distances=False, return_indices=True, indices=indices)
        # The block may be a crop: find, in its coordinates, the voxel with both tied features.
        foreground = ~np.asarray(input, dtype=bool)
        limits = np.array(foreground.shape)
        for voxel in np.argwhere(~foreground):
            a, b = voxel - inside_offset, voxel - outside_offset
            in_block = all((0 <= x).all() and (x < limits).all() for x in (a, b))
            if in_block and foreground[tuple(a)] and foreground[tuple(b)]:
                indices[(slice(None), *voxel)] = b  # the tied, out-of-ball feature
                break
        else:
            raise AssertionError("the tied voxel is not in the block")

    monkeypatch.setattr(morphology.ndimage, "distance_transform_edt", unlucky_edt)
    np.testing.assert_array_equal(dilate_ball(mask, radius, spacing), expected)
    # Without the tie check the same transform gives a wrong voxel: the check is what saves it.
    monkeypatch.setattr(morphology, "_TIE_RELATIVE_GAP", 0.0)
    assert not dilate_ball(mask, radius, spacing)[tuple(centre)]


def test_dilate_ball_rejects_non_3d():
    with pytest.raises(ValueError, match="3D"):
        dilate_ball(np.zeros((4, 4), dtype=bool), 1)


@pytest.mark.skipif(not KITS_CASE.exists(), reason="needs ../shared/data/kits19 (real KiTS19 masks)")
def test_dilate_ball_on_a_real_kits_mask():
    import nibabel as nib

    labels = np.asarray(nib.load(str(KITS_CASE)).dataobj)[::10]  # 0.5 mm -> 5 mm slices
    box = bounding_box(labels > 0, margin=(2, 6, 6))
    mask = labels[box] > 0
    for spacing, radius in [(None, 3.0), ((5.0, 0.92, 0.92), 5.0)]:
        np.testing.assert_array_equal(dilate_ball(mask, radius, spacing), brute_force(mask, radius, spacing))


# --- bounding_box ----------------------------------------------------------------------------


def test_bounding_box():
    mask = np.zeros((7, 8, 9), dtype=bool)
    mask[2, 3:5, 1] = True
    mask[4, 6, 7] = True
    assert bounding_box(mask) == (slice(2, 5), slice(3, 7), slice(1, 8))
    # Margins are clipped to the array; one margin per axis is allowed.
    assert bounding_box(mask, margin=3) == (slice(0, 7), slice(0, 8), slice(0, 9))
    assert bounding_box(mask, margin=(1, 0, 1)) == (slice(1, 6), slice(3, 7), slice(0, 9))
    assert np.count_nonzero(mask[bounding_box(mask)]) == np.count_nonzero(mask)


def test_bounding_box_empty_and_bad_margin():
    assert bounding_box(np.zeros((3, 4, 5), dtype=bool)) is None
    with pytest.raises(ValueError, match="margin"):
        bounding_box(np.ones((3, 3, 3)), margin=-1)
    with pytest.raises(ValueError, match="margin"):
        bounding_box(np.ones((3, 3, 3)), margin=(1, 2))
