"""Stage 2 on the mask's bounding box vs on every full slice, on a KiTS-like case.

    python benchmarks/bench_stage2_crop.py [--case DIR] [--weights W.kseg]

The case is a KiTS19-layout folder (default: a phantom of a real KiTS19 mask when ../shared
holds the masks, else the sample case). y1 is taken from the reference labels (smoothed), so the
mask has the size a good stage 1 gives; the timing is what this benchmark is about.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from scipy import ndimage

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import SHARED_KITS, machine  # noqa: E402


def _case_folder(tmp: Path) -> Path:
    mask = SHARED_KITS / "case_00003" / "segmentation.nii.gz"
    if mask.is_file():
        from kitseg.phantom import generate_phantom_case

        return generate_phantom_case(mask, tmp / "case_00003", seed=0)
    from kitseg.phantom import make_sample_case

    return make_sample_case().save_case_folder(tmp / "case_00000")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--case", type=Path, default=None)
    parser.add_argument("--weights", type=Path, default=None, help="default: the shipped model")
    parser.add_argument("--batch-size", type=int, default=8)
    args = parser.parse_args()

    from kitseg.io import read_ct, read_labels
    from kitseg.pipeline import Segmenter, make_mask
    from kitseg.training.data import labels_to_stage

    with tempfile.TemporaryDirectory() as tmp:
        folder = args.case or _case_folder(Path(tmp))
        volume = read_ct(folder / "imaging.nii.gz")
        labels = read_labels(folder / "segmentation.nii.gz", like=volume)
    segmenter = Segmenter.from_file(args.weights, device="cpu", batch_size=args.batch_size)
    prepared = segmenter.prepare(volume)
    y1 = ndimage.gaussian_filter((labels_to_stage(labels.array, prepared.grid) > 0).astype(np.float32), 1.0)
    mask = make_mask(y1, 0.5, segmenter.bundle.mask.radius)

    timings = {}
    outputs = {}
    for crop in (True, False):
        probs = np.empty((3,) + prepared.image.shape, np.float16)
        start = time.perf_counter()
        for _ in segmenter.iter_stage2(prepared, y1, mask, probs, crop_to_mask=crop):
            pass
        timings[crop] = time.perf_counter() - start
        outputs[crop] = probs
    agree = np.mean(np.argmax(outputs[True], 0)[mask] == np.argmax(outputs[False], 0)[mask])
    print(f"machine: {machine()}")
    print(f"case: {folder.name}, CT {volume.shape}, stage grid {prepared.image.shape}, mask {mask.mean() * 100:.1f}% of the stage volume")
    print(f"stage 2 on every full slice: {timings[False]:.2f} s")
    print(f"stage 2 on the mask's box:   {timings[True]:.2f} s")
    print(f"speed-up: {timings[False] / timings[True]:.1f}x; labels inside the mask agree on {agree * 100:.2f}% of voxels")


if __name__ == "__main__":
    main()
