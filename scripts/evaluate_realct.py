"""Zero-shot kidney Dice of a model on the real CT in ../shared/data/realct.

    python scripts/evaluate_realct.py [--weights W.kseg] [--out DIR]

The reference is a published model's kidney labels (2 = right, 3 = left kidney), not expert
annotation: an approximate check of how the model transfers from phantoms to real anatomy.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

REALCT = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "realct"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weights", type=Path, default=None, help="default: the shipped model")
    parser.add_argument("--out", type=Path, default=None, help="keep the prediction here")
    args = parser.parse_args()
    ct_path = REALCT / "totalseg_example_ct.nii.gz"
    ref_path = REALCT / "totalseg_example_ct_pred_labels.nii.gz"
    if not ct_path.is_file():
        print(f"skipped: {ct_path} is absent (shared development data)")
        return 0

    from kitseg.io import read_ct, read_labels, write_labels
    from kitseg.metrics import dice
    from kitseg.pipeline import Segmenter

    volume = read_ct(ct_path)
    reference = read_labels(ref_path, like=volume)
    ref_kidney = np.isin(reference.array, (2, 3))
    segmenter = Segmenter.from_file(args.weights, device="cpu")
    start = time.perf_counter()
    result = segmenter.segment(volume)
    seconds = time.perf_counter() - start
    pred_kidney = result.labels > 0
    voxel_ml = float(np.prod(volume.spacing)) / 1000.0
    print(f"real CT {volume.shape} at {tuple(round(s, 2) for s in volume.spacing)} mm, segmented in {seconds:.1f} s")
    print(f"kidney Dice (label>0 vs reference kidneys): {dice(pred_kidney, ref_kidney):.4f}")
    print(f"predicted kidney+tumor {pred_kidney.sum() * voxel_ml:.1f} mL (tumor {np.sum(result.labels == 2) * voxel_ml:.1f} mL); "
          f"reference kidneys {ref_kidney.sum() * voxel_ml:.1f} mL")
    # Per side: the patient's right is the low column half in the internal orientation.
    half = volume.shape[2] // 2
    for side, cols, label in (("right", slice(0, half), 2), ("left", slice(half, None), 3)):
        print(f"  {side} kidney Dice: {dice(pred_kidney[:, :, cols], reference.array[:, :, cols] == label):.4f}")
    if args.out:
        out = write_labels(result.labels, volume.source, args.out / "totalseg_example_ct_labels.nii.gz", overwrite=True)
        print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
