"""Would weighting the tumor probability before the argmax find more of the small tumors?

    kits-seg predict work_data/val_gt -o work_data/val_probs --save-intermediates
    python scripts/tumor_weight_study.py --pred work_data/val_probs --gt work_data/val_gt

Re-labels each case from its saved class probabilities (``prediction_XXXXX_probs.nii.gz``,
uint8 on the CT's grid) as argmax(p_background, p_kidney, w * p_tumor) for several weights w,
applies the default clean-up, and scores every variant with the KiTS19 definitions. w = 1 is
the tool's own rule (up to the probabilities' 8-bit rounding). No network runs here.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

WEIGHTS = (0.75, 1.0, 1.25, 1.5, 2.0, 3.0)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pred", type=Path, required=True, help="folder of kits-seg predict --save-intermediates")
    parser.add_argument("--gt", type=Path, required=True, help="KiTS19 case folders with segmentation.nii.gz")
    parser.add_argument("--weights", type=float, nargs="+", default=WEIGHTS)
    args = parser.parse_args()

    from kitseg.io import read_labels, read_probabilities
    from kitseg.metrics import aggregate, kits_scores
    from kitseg.postprocess import remove_stray_components

    probs_files = sorted(args.pred.glob("prediction_*_probs.nii.gz"))
    if not probs_files:
        raise SystemExit(f"{args.pred}: no prediction_*_probs.nii.gz (run kits-seg predict --save-intermediates)")
    scores: dict[float, list] = {w: [] for w in args.weights}
    for path in probs_files:
        case_id = path.name[len("prediction_") : -len("_probs.nii.gz")]
        ref = read_labels(args.gt / f"case_{case_id}" / "segmentation.nii.gz")
        probs = read_probabilities(path).array  # (Z, Y, X, 3), 0..1 from the 8-bit store
        if probs.shape[:3] != ref.shape:
            raise SystemExit(f"{path}: grid {probs.shape[:3]} differs from the reference {ref.shape}")
        for w in args.weights:
            weighted = probs * np.asarray([1.0, 1.0, w], np.float32)
            labels = np.argmax(weighted, axis=-1).astype(np.uint8)
            remove_stray_components(labels)
            scores[w].append(kits_scores(labels, ref.array, ref.spacing, case=f"case_{case_id}"))
        print(f"case_{case_id}: " + "  ".join(f"w={w:g} {s[-1].tumor_dice:.3f}" for w, s in scores.items()), flush=True)

    print(f"\n{len(probs_files)} cases from {args.pred}")
    print(f"{'tumor weight':>12}  {'kidney':>7}  {'tumor':>7}  {'composite':>9}")
    for w, case_scores in scores.items():
        mean = aggregate(case_scores)
        print(f"{w:>12g}  {mean['kidney_dice']:7.4f}  {mean['tumor_dice']:7.4f}  {mean['composite_dice']:9.4f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
