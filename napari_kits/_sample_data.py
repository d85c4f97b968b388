"""npe2 sample data: the engine's procedural abdomen (two kidneys, one tumor) and its labels."""

from __future__ import annotations

from ._layers import ct_layer_data, ground_truth_layer_data

#: A moderately sized case: big enough to look like a CT, small enough to segment in seconds.
SAMPLE_SHAPE = (64, 192, 192)
SAMPLE_SPACING = (2.5, 1.6, 1.6)
SAMPLE_NAME = "synthetic case"


def make_sample_data(shape: tuple[int, int, int] = SAMPLE_SHAPE, spacing=SAMPLE_SPACING, seed: int = 0) -> list[tuple]:
    """The synthetic CT (image layer, W400/L40) and its ground truth (labels layer)."""
    from kitseg.geometry import Volume
    from kitseg.phantom import make_synthetic_case

    case = make_synthetic_case(shape=shape, spacing=spacing, seed=seed)
    ct = Volume.from_source_array(case.ct, case.affine)
    return [ct_layer_data(ct, SAMPLE_NAME), ground_truth_layer_data(ct.like(case.labels), SAMPLE_NAME)]
