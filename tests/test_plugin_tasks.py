"""The plugin's headless task generators (napari_kits._tasks) against the engine they adapt."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from .conftest_plugin import case_folder, small_case  # noqa: F401 (fixtures)


@pytest.mark.parametrize("radius_unit", ["voxels", "mm"])
def test_run_all_paints_the_mask_the_engine_segments_inside(case_folder, radius_unit):  # noqa: F811
    """The mask the widget shows is the engine's, in either radius unit (mm: the stage grid's spacing)."""
    from kitseg.checkpoint import make_tiny_bundle
    from kitseg.io import read_ct
    from kitseg.pipeline import Segmenter
    from napari_kits._tasks import MaskReady, Stage2Done, iter_run_all

    bundle = make_tiny_bundle(seed=0)
    volume = read_ct(case_folder / "imaging.nii.gz")
    # The random network's y1 is high everywhere: threshold at its top 5%, so that the ball shows.
    plain = Segmenter(bundle, device="cpu")
    threshold = float(np.percentile(plain.stage1(plain.prepare(volume)), 95))
    mask_config = dataclasses.replace(bundle.mask, threshold=threshold, radius=4.0, radius_unit=radius_unit)
    segmenter = Segmenter(dataclasses.replace(bundle, mask=mask_config), device="cpu")
    expected = segmenter.segment(volume)
    assert 0 < expected.mask.mean() < 1

    events = list(iter_run_all(segmenter, volume, mask_config.threshold, mask_config.radius))
    mask = next(e for e in events if isinstance(e, MaskReady)).mask
    assert mask.dtype == np.uint8
    np.testing.assert_array_equal(mask, expected.mask.astype(np.uint8))
    np.testing.assert_array_equal(next(e for e in events if isinstance(e, Stage2Done)).labels, expected.labels)
