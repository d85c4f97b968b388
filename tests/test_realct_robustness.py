"""scripts/realct_robustness.py: each variant's grid is where its voxels really are, and its labels come home."""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from .conftest import SHARED_DATA, load_script, requires

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "realct_robustness.py"


@pytest.fixture(scope="module")
def robustness():
    return load_script("realct_robustness")


def _world(affine: np.ndarray, shape) -> np.ndarray:
    """A scalar field that tells world positions apart: x + 3y + 7z (mm) at each voxel centre."""
    index = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), axis=-1).astype(float)
    world = index @ affine[:3, :3].T + affine[:3, 3]
    return world @ np.array([1.0, 3.0, 7.0])


def test_each_variant_puts_its_voxels_where_they_are_in_the_world(robustness):
    affine = np.array([[-0.8, 0.0, 0.0, 100.0], [0.0, -0.9, 0.0, 40.0], [0.0, 0.0, 3.0, -200.0], [0, 0, 0, 1.0]])
    shape = (16, 12, 9)  # an odd number of slices: the thick variant's last slice
    ct = _world(affine, shape).astype(np.float32)
    reference = np.zeros(shape, bool)
    reference[5:11, 4:9, 2:7] = True
    slice_axis = robustness.slice_axis_of(affine)
    assert slice_axis == 2
    for name, make in robustness.VARIANTS.items():
        variant = make(ct, affine, slice_axis, reference)
        assert variant.back(np.zeros(variant.image.shape, bool)).shape == shape, name
        if name.startswith(("noise", "HU")):
            continue  # the grid is the scan's; only the intensities change
        expected = _world(variant.affine, variant.image.shape)
        inner = (slice(None),) * 3
        if name == "pixels 4x finer (0.75 mm)":  # the outermost fine pixels repeat the edge, not extrapolate
            inner = (slice(2, -2), slice(2, -2), slice(None))
        if name == "field of view +60 mm of air":
            inner = tuple(slice(robustness.PAD_VOXELS, -robustness.PAD_VOXELS) if a != slice_axis else slice(None)
                          for a in range(3))
        np.testing.assert_allclose(variant.image[inner], expected[inner], rtol=0, atol=1e-3, err_msg=name)


def test_labels_of_a_reordered_padded_or_cropped_scan_come_back_voxel_for_voxel(robustness):
    affine = np.diag([3.0, 3.0, 3.0, 1.0])
    shape = (30, 28, 8)
    rng = np.random.default_rng(0)
    reference = np.zeros(shape, bool)
    reference[12:18, 12:16, 2:6] = True
    labels = rng.random(shape) > 0.5  # any label map on the scan's own grid
    exact = ("as stored", "rows and columns reversed", "axes reversed (slices first)", "field of view +60 mm of air",
             "slices at half spacing")
    for name in exact:
        variant = robustness.VARIANTS[name](labels.astype(np.float32), affine, 2, reference)
        np.testing.assert_array_equal(variant.back(variant.image > 0.5), labels, err_msg=name)
    cropped = robustness.VARIANTS["field of view: kidneys +30 mm"](labels.astype(np.float32), affine, 2, reference)
    margin = int(robustness.CROP_MARGIN_MM / 3.0)
    box = (slice(12 - margin, 18 + margin), slice(12 - margin, 16 + margin), slice(None))
    assert cropped.image.shape == (6 + 2 * margin, 4 + 2 * margin, 8)
    expected = np.zeros(shape, bool)
    expected[box] = labels[box]  # outside the field of view nothing is labelled
    np.testing.assert_array_equal(cropped.back(cropped.image > 0.5), expected)
    fine = robustness.VARIANTS["pixels 4x finer (0.75 mm)"](reference.astype(np.float32), affine, 2, reference)
    np.testing.assert_array_equal(fine.back(fine.image > 0.5), reference)


@requires(SHARED_DATA / "realct" / "totalseg_example_ct.nii.gz")
def test_the_shipped_model_labels_the_real_ct_the_same_in_another_axis_order(tmp_path):
    table = tmp_path / "robustness.csv"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--variants", "as stored", "axes reversed (slices first)",
                           "--csv", str(table)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    rows = {row["variant"]: row for row in csv.DictReader(table.open())}
    assert rows["axes reversed (slices first)"]["same_as_stored"] == "True"
    # Round 6's zero-shot figure (0.884, docs/model_studies.md); well above what a lost geometry would leave.
    assert float(rows["as stored"]["kidney_dice"]) > 0.85
