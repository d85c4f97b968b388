"""Choose the label clean-up rules (kitseg.postprocess) on predictions already made.

    python scripts/postprocess_study.py --pred work_data/val_pred --gt work_data/val_gt \
        [--realct-pred work_data/realct/totalseg_example_ct_labels.nii.gz] [--masks ../shared/data/kits19] \
        [--csv-dir DIR]

Scores every rule variant on the same raw predictions (`kits-seg predict --no-cleanup`; KiTS19
definitions) and, where given, the kidney Dice of the real CT prediction
(`scripts/evaluate_realct.py --no-cleanup --out DIR` writes it). With ``--masks``, each rule is
also applied to real ground-truth masks: a rule that changes a true label map (a small second
kidney beside a kidney with a huge tumor) would delete real anatomy on some patient. With
``--csv-dir``, each rule's per-case scores go to ``DIR/ruleNN.csv`` (NN its row in the table),
so that two rules can be paired with ``scripts/compare_scores.py``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

REALCT = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "realct"
VARIANTS = {  # name: CleanupRules' fields in order (the last, max_pieces: 0 = no limit); None = no clean-up
    "none": None,
    "kidney piece": (True, 0.0, False, 0.0, 0.0, 0),
    "size >= 0.05 largest": (False, 0.05, False, 0.0, 0.0, 0),
    "size >= 0.1 largest": (False, 0.1, False, 0.0, 0.0, 0),
    "size >= 0.2 largest": (False, 0.2, False, 0.0, 0.0, 0),
    "same level": (False, 0.0, True, 0.0, 0.0, 0),
    "kidney piece + size >= 0.1": (True, 0.1, False, 0.0, 0.0, 0),
    "kidney piece + size >= 0.2": (True, 0.2, False, 0.0, 0.0, 0),
    "kidney piece + same level": (True, 0.0, True, 0.0, 0.0, 0),
    "kidney + size >= 0.1 + level": (True, 0.1, True, 0.0, 0.0, 0),
    "kidney share >= 0.05 alone": (False, 0.0, False, 0.05, 0.0, 0),
    "kidney share >= 0.1 alone": (False, 0.0, False, 0.1, 0.0, 0),
    "all three + kidney share >= 0.05": (True, 0.1, True, 0.05, 0.0, 0),
    "all three + kidney share >= 0.1": (True, 0.1, True, 0.1, 0.0, 0),
    "all three + kidney share >= 0.2": (True, 0.1, True, 0.2, 0.0, 0),
    "all three + kidney share >= 0.3": (True, 0.1, True, 0.3, 0.0, 0),
    "all four + tumors < 0.1 of kidney's largest": (True, 0.1, True, 0.1, 0.1, 0),
    "all four + tumors < 0.2 of kidney's largest": (True, 0.1, True, 0.1, 0.2, 0),
    "all four + tumors < 0.25 of kidney's largest": (True, 0.1, True, 0.1, 0.25, 0),
    "all five + two pieces at most (the default)": (True, 0.1, True, 0.1, 0.2, 2),
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pred", type=Path, required=True)
    parser.add_argument("--gt", type=Path, required=True)
    parser.add_argument("--realct-pred", type=Path, default=None)
    parser.add_argument("--masks", type=Path, default=None, help="KiTS19 case folders with segmentation.nii.gz")
    parser.add_argument("--csv-dir", type=Path, default=None,
                        help="write each rule's per-case scores here (for scripts/compare_scores.py)")
    args = parser.parse_args()

    from kitseg.evaluation import pair_predictions
    from kitseg.io import read_labels
    from kitseg.metrics import aggregate, dice, kits_scores, write_scores_csv
    from kitseg.postprocess import CleanupRules, remove_stray_components

    def cleaned(labels: np.ndarray, rule: tuple | None) -> np.ndarray:
        labels = labels.copy()
        if rule is not None:
            remove_stray_components(labels, CleanupRules(*rule))
        return labels

    pairs = pair_predictions(args.pred, args.gt)
    scores: dict[str, list] = {name: [] for name in VARIANTS}
    for pair in pairs:
        ref, pred = read_labels(pair.reference), read_labels(pair.prediction)
        for name, rule in VARIANTS.items():
            scores[name].append(kits_scores(cleaned(pred.array, rule), ref.array, ref.spacing, case=pair.case))

    if args.csv_dir is not None:
        args.csv_dir.mkdir(parents=True, exist_ok=True)
        for index, name in enumerate(VARIANTS):
            write_scores_csv(scores[name], args.csv_dir / f"rule{index:02d}.csv")
        print(f"per-case scores: {args.csv_dir}/ruleNN.csv, NN the rule's row below (from 00)")

    realct = {}
    if args.realct_pred is not None:
        reference = read_labels(REALCT / "totalseg_example_ct_pred_labels.nii.gz")
        ref_kidney = np.isin(reference.array, (2, 3))
        pred = read_labels(args.realct_pred)
        for name, rule in VARIANTS.items():
            realct[name] = dice(cleaned(pred.array, rule) > 0, ref_kidney)

    damage: dict[str, list[str]] = {}
    if args.masks is not None:
        masks = sorted(args.masks.glob("case_*/segmentation.nii.gz"))
        damage = {name: [] for name in VARIANTS}
        for path in masks:
            truth = read_labels(path).array
            for name, rule in VARIANTS.items():
                score = kits_scores(cleaned(truth, rule), truth, (1.0, 1.0, 1.0))
                if min(score.kidney_dice, score.tumor_dice) < 0.99:
                    damage[name].append(f"{path.parent.name} ({score.kidney_dice:.3f})")
        print(f"ground truth check: {len(masks)} masks from {args.masks}")

    print(f"{len(pairs)} cases from {args.pred}")
    print(f"{'   rule':37s} {'kidney':>7s} {'tumor':>7s} {'compos.':>7s} {'min kid':>7s} {'realct':>7s}  truths hurt")
    for index, name in enumerate(VARIANTS):
        mean = aggregate(scores[name])
        worst = min(s.kidney_dice for s in scores[name])
        extra = f"{realct[name]:7.4f}" if name in realct else f"{'':7s}"
        hurt = (f"{len(damage[name])}: {', '.join(damage[name][:5])}" if damage[name] else "0") if damage else ""
        print(f"{index:02d} {name:34s} {mean['kidney_dice']:7.4f} {mean['tumor_dice']:7.4f} {mean['composite_dice']:7.4f} "
              f"{worst:7.4f} {extra}  {hurt}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
