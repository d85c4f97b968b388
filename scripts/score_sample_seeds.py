"""Score models on built-in sample cases of several seeds (the sample generator, not KiTS19 masks).

    python scripts/score_sample_seeds.py [--seeds 8] W1.kseg [W2.kseg ...]

The shipped sample is seed 0; one seed is one tumor, so this shows whether a result on the
sample is typical. Prints, per seed, the reference tumor volume and each model's kidney and tumor
Dice (KiTS19 definitions, clean-up on), then the means.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np

from kitseg.config import TUMOR_SLICE_SMOOTHING


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("weights", type=Path, nargs="+")
    parser.add_argument("--seeds", type=int, default=8)
    parser.add_argument("--tumor-smoothing", type=float, default=TUMOR_SLICE_SMOOTHING, metavar="W",
                        help="kits-seg predict's --tumor-smoothing (default: the tool's; 0 reads each slice alone)")
    args = parser.parse_args()

    from kitseg.io import read_ct, read_labels
    from kitseg.metrics import kits_scores
    from kitseg.phantom.sample import make_sample_case
    from kitseg.pipeline import Segmenter

    segmenters = {w.name: Segmenter.from_file(w, tumor_slice_smoothing=args.tumor_smoothing) for w in args.weights}
    scores = {name: [] for name in segmenters}
    print("seed  tumor_mL  " + "  ".join(f"{n}: kidney tumor" for n in segmenters))
    with tempfile.TemporaryDirectory() as tmp:
        for seed in range(args.seeds):
            folder = make_sample_case(seed=seed).save_case_folder(Path(tmp) / f"case_{seed:05d}")
            volume = read_ct(folder / "imaging.nii.gz")
            reference = read_labels(folder / "segmentation.nii.gz", like=volume).array
            case = {name: kits_scores(seg.segment(volume).labels, reference, volume.spacing)
                    for name, seg in segmenters.items()}
            ref_tumor_ml = next(iter(case.values())).ref_tumor_ml
            row = f"{seed:4d}  {ref_tumor_ml:8.1f}"
            for name, score in case.items():
                scores[name].append((score.kidney_dice, score.tumor_dice))
                row += f"  {score.kidney_dice:.3f} {score.tumor_dice:.3f}"
            print(row, flush=True)
    for name, pairs in scores.items():
        kidney, tumor = np.mean(pairs, axis=0)
        print(f"mean {name}: kidney {kidney:.3f}, tumor {tumor:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
