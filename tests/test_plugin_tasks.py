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


def test_score_line_names_the_largest_tumors_shares_and_the_false_pieces():
    from kitseg.metrics import TumorDetection
    from napari_kits._widget import _describe_detection

    five = TumorDetection(ref_ml=(2.0, 40.0, 0.5, 9.0, 120.0), labelled_share=(0.0, 0.6, 1.0, 0.25, 0.9),
                          false_ml=(1.25, 0.5), found_share=0.5)
    assert _describe_detection(five) == ("Tumors found: 3 of 5 (labelled tumor: 90%, 60%, 25%, …); "
                                         "false tumor pieces: 2 (1.8 mL)")
    none = TumorDetection(ref_ml=(), labelled_share=(), false_ml=(3.0,), found_share=0.5)
    assert _describe_detection(none) == "Tumors found: 0 of 0; false tumor pieces: 1 (3.0 mL)"
