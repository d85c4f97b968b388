"""Would averaging models' class probabilities beat each model alone?

    kits-seg predict work_data/val_gt -o work_data/val_probs_a --weights A.kseg --save-intermediates
    kits-seg predict work_data/val_gt -o work_data/val_probs_b --weights B.kseg --save-intermediates
    python scripts/stage2_ensemble_study.py --probs work_data/val_probs_a work_data/val_probs_b \\
        --gt work_data/val_gt [--realct-probs A_realct_probs.nii.gz B_realct_probs.nii.gz]

Scores each model (two or more) and the mean of the class probabilities of every group of two
or more (argmax, then the default clean-up; KiTS19 definitions) from the probabilities
``--save-intermediates`` saved (8-bit, on the CT's grid). With ``--realct-probs`` (the same for ``../shared/data/realct/totalseg_example_ct.nii.gz``),
also the real CT's kidney Dice against its reference kidneys. Models that share stage 1 (as
`scripts/combine_stages.py` files can) share the mask, so their mean is an ensemble of stage 2.
No network runs here.
"""

from __future__ import annotations

import argparse
import itertools
from pathlib import Path

import numpy as np

REALCT = Path(__file__).resolve().parents[2] / "shared" / "data" / "realct"
REALCT_REFERENCE = REALCT / "totalseg_example_ct_pred_labels.nii.gz"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--probs", type=Path, nargs="+", required=True, help="folders of --save-intermediates (2+)")
    parser.add_argument("--gt", type=Path, required=True, help="KiTS19 case folders with segmentation.nii.gz")
    parser.add_argument("--realct-probs", type=Path, nargs="+", default=None, help="one file per --probs folder")
    args = parser.parse_args()
    if len(args.probs) < 2:
        parser.error("--probs needs two or more folders")
    if args.realct_probs is not None and len(args.realct_probs) != len(args.probs):
        parser.error("--realct-probs needs one file per --probs folder")

    from kitseg.io import read_labels, read_probabilities
    from kitseg.metrics import aggregate, dice, kits_scores
    from kitseg.postprocess import remove_stray_components

    def labelled(probs: np.ndarray) -> np.ndarray:
        labels = np.argmax(probs, axis=-1).astype(np.uint8)
        remove_stray_components(labels)
        return labels

    letters = "ABCDEFGH"[: len(args.probs)]
    groups = [g for n in range(1, len(letters) + 1) for g in itertools.combinations(range(len(letters)), n)]
    names = [f"{letters[g[0]]} ({args.probs[g[0]].name})" if len(g) == 1 else "mean of " + " ".join(letters[i] for i in g)
             for g in groups]

    def means(models: list[np.ndarray]):
        for g in groups:
            yield sum(models[i] for i in g) / len(g)

    scores: dict[str, list] = {name: [] for name in names}
    files = sorted(args.probs[0].glob("prediction_*_probs.nii.gz"))
    if not files:
        raise SystemExit(f"{args.probs[0]}: no prediction_*_probs.nii.gz (run kits-seg predict --save-intermediates)")
    for path_a in files:
        case = "case_" + path_a.name[len("prediction_") : -len("_probs.nii.gz")]
        ref = read_labels(args.gt / case / "segmentation.nii.gz")
        models = [read_probabilities(folder / path_a.name).array for folder in args.probs]
        for name, probs in zip(names, means(models)):
            scores[name].append(kits_scores(labelled(probs), ref.array, ref.spacing, case=case))
        print(case + "  " + "  ".join(f"{s[-1].tumor_dice:.3f}" for s in scores.values()), flush=True)

    print(f"\n{len(files)} cases; mean Dice")
    print(f"{'':<40} {'kidney':>7} {'tumor':>7} {'composite':>9}")
    for name, case_scores in scores.items():
        mean = aggregate(case_scores)
        print(f"{name:<40} {mean['kidney_dice']:7.4f} {mean['tumor_dice']:7.4f} {mean['composite_dice']:9.4f}")

    if args.realct_probs is not None:
        if not REALCT_REFERENCE.is_file():
            raise SystemExit(f"{REALCT_REFERENCE}: not found (the real CT's reference kidneys)")
        reference = read_labels(REALCT_REFERENCE)
        ref_kidneys = np.isin(reference.array, (2, 3))  # 2 = right, 3 = left kidney
        models = [read_probabilities(p).array for p in args.realct_probs]
        voxel_ml = float(np.prod(reference.spacing)) / 1000.0
        print("\nreal CT")
        for name, probs in zip(names, means(models)):
            labels = labelled(probs)
            print(f"{name:<40} kidney Dice {dice(labels > 0, ref_kidneys):.4f}, "
                  f"tumor {np.count_nonzero(labels == 2) * voxel_ml:.1f} mL")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
