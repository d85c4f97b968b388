"""npe2 sample data: the engine's built-in sample case (synthetic abdomen CT, kidney tumor) and its labels."""

from __future__ import annotations

from ._layers import ct_layer_data, ground_truth_layer_data

SAMPLE_NAME = "synthetic case"


def make_sample_data(shape: tuple[int, int, int] | None = None, spacing=None, seed: int = 0) -> list[tuple]:
    """The sample CT (image layer, W400/L40) and its ground truth (labels layer).

    The default is :func:`kitseg.phantom.make_sample_case` (the same case as ``kits-seg sample``:
    realistic phantom intensities, the kind of image the shipped model was trained on); a
    ``shape``/``spacing`` gives the quick procedural phantom of that size instead (tests).
    """
    from kitseg.geometry import Volume
    from kitseg.phantom import make_sample_case, make_synthetic_case

    if shape is None and spacing is None:
        case = make_sample_case(seed=seed)
    else:
        case = make_synthetic_case(shape=shape or (64, 192, 192), spacing=spacing or (2.5, 1.6, 1.6), seed=seed)
    ct = Volume.from_source_array(case.ct, case.affine)
    return [ct_layer_data(ct, SAMPLE_NAME), ground_truth_layer_data(ct.like(case.labels), SAMPLE_NAME)]
