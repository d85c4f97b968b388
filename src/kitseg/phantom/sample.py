"""The built-in sample case: what `napari-kits`, File > Open Sample and `kits-seg sample` show.

Its kidney/tumor geometry is the procedural one of :mod:`.simple` (no patient data ships with
the project), and its CT is drawn by the realistic generator of :mod:`.realistic`, i.e. the
same kind of image the shipped model was trained on. Fixed seed: every install gets the same case.
"""

from __future__ import annotations

import numpy as np

from .params import PhantomParams
from .realistic import synthesize_ct
from .simple import SyntheticCase, make_synthetic_case

SAMPLE_SHAPE = (64, 256, 256)
SAMPLE_SPACING = (3.0, 1.5, 1.5)
# The generator as the shipped model's training phantoms were drawn (their medulla as patches,
# the narrow bone density), so that the sample, and every figure measured on it, stays what the
# shipped model was made for.
SAMPLE_PARAMS = PhantomParams(medulla="blobs", cancellous_bone_hu=None)


def make_sample_case(seed: int = 0, shape=SAMPLE_SHAPE, spacing=SAMPLE_SPACING) -> SyntheticCase:
    """A realistic-looking abdominal CT (int16 HU) with a kidney tumor, and its labels.

    About 2 s for the default 64 x 256 x 256 grid (3 mm slices, 1.5 mm in-plane).
    """
    geometry = make_synthetic_case(shape=shape, spacing=spacing, seed=seed, tumor=True)
    ct = synthesize_ct(geometry.labels, geometry.spacing, np.random.default_rng(seed), SAMPLE_PARAMS)
    return SyntheticCase(ct=ct, labels=geometry.labels, affine=geometry.affine)
