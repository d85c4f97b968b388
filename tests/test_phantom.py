"""Synthetic CT phantoms: the simple procedural tier and the realistic tier built on KiTS19 masks."""

from __future__ import annotations

import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from kitseg.phantom import SyntheticCase, make_synthetic_case

# ---------------------------------------------------------------- tier 1: simple phantom


@pytest.fixture(scope="module")
def default_case() -> SyntheticCase:
    return make_synthetic_case(seed=3)


def test_simple_types_shape_and_affine(default_case: SyntheticCase) -> None:
    case = default_case
    assert case.ct.shape == case.labels.shape == (40, 96, 112)
    assert case.ct.dtype == np.int16 and case.labels.dtype == np.uint8
    assert set(np.unique(case.labels)) == {0, 1, 2}
    assert nib.aff2axcodes(case.affine) == ("I", "P", "L")
    np.testing.assert_allclose(np.abs(case.affine[:3, :3]).sum(axis=0)[::-1], [1.5, 1.5, 2.5])
    assert case.spacing == (2.5, 1.5, 1.5)
    assert np.any(case.affine[:3, 3] != 0)


def test_simple_labels_agree_with_hu(default_case: SyntheticCase) -> None:
    ct, labels = default_case.ct.astype(np.float32), default_case.labels
    kidney_mean = ct[labels == 1].mean()
    tumor_mean = ct[labels == 2].mean()
    assert 140 <= kidney_mean <= 210
    assert 60 <= tumor_mean <= 120
    assert ct[0, 0, 0] < -900  # air in the corner
    # Bone present and bright; the kidneys sit in the posterior half, one each side of the midline.
    assert ct.max() > 400
    _, rows, cols = np.nonzero(labels)
    assert rows.mean() > labels.shape[1] / 2
    assert cols.min() < labels.shape[2] / 2 < cols.max()


def test_simple_is_deterministic_per_seed() -> None:
    a, b, c = make_synthetic_case(seed=7), make_synthetic_case(seed=7), make_synthetic_case(seed=8)
    np.testing.assert_array_equal(a.ct, b.ct)
    np.testing.assert_array_equal(a.labels, b.labels)
    assert not np.array_equal(a.ct, c.ct)


def test_simple_without_tumor() -> None:
    case = make_synthetic_case(seed=1, tumor=False)
    assert set(np.unique(case.labels)) == {0, 1}


@pytest.mark.parametrize(
    "shape, spacing", [((17, 33, 45), (3.0, 1.0, 1.2)), ((1, 64, 63), (5.0, 0.8, 0.8)), ((9, 201, 77), (1.0, 2.0, 3.0))]
)
def test_simple_odd_shapes(shape: tuple[int, int, int], spacing: tuple[float, float, float]) -> None:
    case = make_synthetic_case(shape=shape, spacing=spacing, seed=2)
    assert case.ct.shape == case.labels.shape == shape
    np.testing.assert_allclose(case.spacing, spacing)


def test_simple_rejects_bad_geometry() -> None:
    with pytest.raises(ValueError, match="shape"):
        make_synthetic_case(shape=(0, 10, 10))
    with pytest.raises(ValueError, match="spacing"):
        make_synthetic_case(spacing=(1.0, -1.0, 1.0))


def test_simple_is_fast() -> None:
    start = time.perf_counter()
    make_synthetic_case(seed=11)
    assert time.perf_counter() - start < 0.5


def test_simple_kits_round_trip(tmp_path: Path, default_case: SyntheticCase) -> None:
    folder = default_case.save_case_folder(tmp_path / "case_00000")
    img = nib.load(folder / "imaging.nii.gz")
    seg = nib.load(folder / "segmentation.nii.gz")
    np.testing.assert_allclose(img.affine, default_case.affine)
    np.testing.assert_allclose(seg.affine, default_case.affine)
    assert img.get_data_dtype() == np.int16 and seg.get_data_dtype() == np.uint8
    np.testing.assert_array_equal(np.asarray(img.dataobj), default_case.ct)
    np.testing.assert_array_equal(np.asarray(seg.dataobj), default_case.labels)
    assert sorted(p.name for p in folder.iterdir()) == ["imaging.nii.gz", "segmentation.nii.gz"]
