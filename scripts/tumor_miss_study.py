"""Which tumors does a model miss? Tumor Dice by tumor size and by tumor-to-kidney contrast.

    kits-seg evaluate --pred work_data/val_pred --gt work_data/val_gt --csv work_data/val_scores.csv
    python scripts/tumor_miss_study.py --gt work_data/val_gt --scores work_data/val_scores.csv

For every case of the scores CSV (written by ``kits-seg evaluate --csv``): the reference tumor's
volume, the mean HU of tumor and of kidney in the CT (``imaging.nii.gz``), their contrast in
units of the kidney's HU spread, and the tumor Dice; then the mean Dice per size band and for
tumors brighter or darker than the kidney on average. ``--ceiling`` also takes each reference
label map to a model's network grid and back (one-hot, ``--weights``, default the shipped
model), the way a prediction travels: the tumor Dice that resampling alone leaves.
``separability`` is what the network has to go on by intensity alone: on the model's grid (the
image as stage 2 sees it), the detectability index d' = |mean tumor - mean kidney| / pooled
spread, against the kidney within 10 mm of the tumor. Under about 0.5 the two HU distributions
overlap almost entirely; the Dice is reported per d' band.
``--phantom-seed N`` (phantoms made by ``kits-seg phantom --seed N``) also names each case's
contrast phase, drawn again from the case's seed, and reports the Dice per phase.
``--where`` runs the model (``--weights``: the one that made the scores) on each CT again and
says where the reference tumor went, as shares of its voxels on the CT's grid: outside stage 2's
mask (stage 1 missed the region), and what the raw argmax called it (tumor, kidney,
background), plus the share of the reference tumor that the clean-up removed after being called
tumor or kidney. It tells a stage-1 miss from a stage-2 confusion.
``--pred DIR`` (the predictions the scores were made from, ``kits-seg predict``'s
``prediction_XXXXX.nii.gz``) weighs what costs the tumor Dice, in mL per case: tumor called in
the reference kidney, tumor called outside the reference's kidney and tumor, and reference tumor
not called tumor; per size band, with the cases whose false tumor outweighs their tumor.
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path
from typing import NamedTuple

import numpy as np
from scipy import ndimage

SIZE_BANDS_ML = ((0.0, 10.0), (10.0, 50.0), (50.0, float("inf")))
SEPARABILITY_BANDS = ((0.0, 0.5), (0.5, 1.0), (1.0, 2.0), (2.0, float("inf")))
NEAR_TUMOR_MM = 10.0
# --where: shares of the reference tumor outside the mask, called tumor / kidney / background
# by the raw argmax, and removed by the clean-up.
WHERE_COLUMNS = ("outside", "tumor", "kidney", "bg", "cleaned")
# --pred: tumor called in the reference kidney, tumor called elsewhere, reference tumor not called tumor (mL).
VOLUME_COLUMNS = ("false in kidney", "false outside", "missed")


class TumorCase(NamedTuple):
    case: str
    tumor_ml: float
    kidney_hu: float
    tumor_hu: float
    contrast: float  # (tumor HU - kidney HU) / kidney HU spread
    separability: float  # d' of tumor against the kidney around it, on the model's grid
    tumor_dice: float
    phase: str  # contrast phase of a phantom ("?" when not asked for)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gt", type=Path, required=True, help="KiTS19 case folders (imaging + segmentation)")
    parser.add_argument("--scores", type=Path, required=True, help="CSV of kits-seg evaluate --csv")
    parser.add_argument("--ceiling", action="store_true", help="also score the reference after the grid round trip")
    parser.add_argument("--weights", type=Path, default=None, help="model whose grid --ceiling uses and --where runs (default: shipped); for --where, the one that made --scores")
    parser.add_argument("--where", action="store_true",
                        help="run the model again: where the reference tumor's voxels went (mask, class, clean-up)")
    parser.add_argument("--pred", type=Path, default=None,
                        help="the predictions the scores came from: false and missed tumor volumes per case")
    parser.add_argument("--phantom-seed", type=int, default=None,
                        help="the --seed of kits-seg phantom that made --gt: report the Dice per contrast phase")
    args = parser.parse_args()

    from kitseg.checkpoint import read_metadata
    from kitseg.config import PreprocessingConfig
    from kitseg.io import read_ct, read_labels
    from kitseg.metrics import dice
    from kitseg.phantom.params import PhantomParams, sample_protocol
    from kitseg.phantom.realistic import case_seed
    from kitseg.postprocess import remove_stray_components
    from kitseg.preprocess import StageGrid
    from kitseg.weights import default_weights_path

    weights = args.weights or default_weights_path()
    preprocessing = PreprocessingConfig(**read_metadata(weights)["preprocessing"])

    def phase_of(case: str) -> str:
        if args.phantom_seed is None:
            return "?"
        # The protocol is the first draw from the case's generator (kitseg.phantom.realistic).
        rng = np.random.default_rng(case_seed(args.phantom_seed, case))
        return sample_protocol(rng, PhantomParams()).phase

    def round_trip(labels_volume) -> np.ndarray:
        grid = StageGrid.for_volume(labels_volume, preprocessing)
        one_hot = [grid.to_stage((labels_volume.array == k).astype(np.float32)) for k in range(3)]
        return grid.to_source(np.stack(one_hot)).argmax(axis=0)

    segmenter = None
    if args.where:
        from kitseg.pipeline import Segmenter

        segmenter = Segmenter.from_file(weights)

    def where_tumor_went(ct, tumor: np.ndarray) -> np.ndarray:
        """Shares of ``tumor`` outside the mask; called tumor, kidney, background; then cleaned up."""
        result = segmenter.segment(ct, cleanup=None)
        outside = result.prepared.grid.to_source(result.mask.astype(np.float32))[tumor] < 0.5
        raw = result.labels[tumor]
        cleaned = result.labels.copy()
        remove_stray_components(cleaned)
        removed = (raw > 0) & (cleaned[tumor] == 0)
        return np.array([outside.mean(), *[(raw == k).mean() for k in (2, 1, 0)], removed.mean()])

    def separability(ct, labels: np.ndarray) -> float:
        grid = StageGrid.for_volume(ct, preprocessing)
        image = grid.to_stage(ct.array)
        stage_labels = np.stack([grid.to_stage((labels == k).astype(np.float32)) for k in range(3)]).argmax(axis=0)
        tumor = stage_labels == 2
        if not tumor.any():
            return float("nan")
        near = ndimage.distance_transform_edt(~tumor, sampling=grid.spacing) <= NEAR_TUMOR_MM
        kidney = (stage_labels == 1) & near
        if not kidney.any():
            kidney = stage_labels == 1
        t, k = image[tumor], image[kidney]
        return float(abs(t.mean() - k.mean()) / max(np.sqrt((t.var() + k.var()) / 2.0), 1.0))

    rows = [r for r in csv.DictReader(args.scores.open()) if r["case"].startswith("case_")]
    if not rows:
        raise SystemExit(f"{args.scores}: no case rows")

    def tumor_volumes(case: str, ct, labels: np.ndarray) -> np.ndarray:
        """mL of tumor called in the reference kidney, called outside kidney and tumor, and missed."""
        path = args.pred / f"prediction_{case.removeprefix('case_')}.nii.gz"
        if not path.is_file():
            raise SystemExit(f"{path}: no prediction for {case} (--pred takes kits-seg predict's output folder)")
        called = read_labels(path, like=ct).array == 2
        counts = ((called & (labels == 1)).sum(), (called & (labels == 0)).sum(), (~called & (labels == 2)).sum())
        return np.array(counts, float) * float(np.prod(ct.spacing)) / 1000.0

    cases, ceilings, where, volumes = [], [], [], []
    header = f"{'case':<11} {'phase':<8} {'tumor mL':>9} {'kidney HU':>10} {'tumor HU':>9} {'contrast':>8} {'d prime':>7} {'tumor Dice':>10}"
    print(header + ("  " + " ".join(f"{w:>7}" for w in WHERE_COLUMNS) if args.where else "")
          + ("  " + " ".join(f"{w:>15}" for w in VOLUME_COLUMNS) if args.pred else ""))
    for row in rows:
        ct = read_ct(args.gt / row["case"] / "imaging.nii.gz")
        labels_volume = read_labels(args.gt / row["case"] / "segmentation.nii.gz", like=ct)
        labels = labels_volume.array
        kidney_hu, tumor_hu = ct.array[labels == 1], ct.array[labels == 2]
        if tumor_hu.size == 0 or kidney_hu.size == 0:
            continue  # no tumor: nothing to miss
        contrast = float((tumor_hu.mean() - kidney_hu.mean()) / max(kidney_hu.std(), 1.0))
        c = TumorCase(row["case"], float(row["ref_tumor_ml"]), float(kidney_hu.mean()), float(tumor_hu.mean()),
                      contrast, separability(ct, labels), float(row["tumor_dice"]), phase_of(row["case"]))
        cases.append(c)
        line = (f"{c.case:<11} {c.phase:<8} {c.tumor_ml:9.1f} {c.kidney_hu:10.1f} {c.tumor_hu:9.1f} {c.contrast:8.2f} "
                f"{c.separability:7.2f} "
                f"{c.tumor_dice:10.3f}")
        if args.where:
            where.append(where_tumor_went(ct, labels == 2))
            line += "  " + " ".join(f"{share:7.2f}" for share in where[-1])
        if args.pred is not None:
            volumes.append(tumor_volumes(c.case, ct, labels))
            line += "  " + " ".join(f"{v:15.1f}" for v in volumes[-1])
        if args.ceiling:
            ceilings.append(dice(round_trip(labels_volume) == 2, labels == 2))
            line += f"  ceiling {ceilings[-1]:.3f}"
        print(line)

    def report(name: str, chosen: list[TumorCase]) -> None:
        scores = [c.tumor_dice for c in chosen]
        print(f"{name:<34} {len(scores):3d} cases  mean tumor Dice {np.mean(scores) if scores else float('nan'):.3f}")

    print(f"\n{len(cases)} cases with a tumor, from {args.scores}")
    for low, high in SIZE_BANDS_ML:
        report(f"tumor {low:g}-{high:g} mL", [c for c in cases if low <= c.tumor_ml < high])
    report("tumor brighter than kidney (mean)", [c for c in cases if c.contrast > 0])
    report("tumor darker than kidney (mean)", [c for c in cases if c.contrast <= 0])
    for low, high in SEPARABILITY_BANDS:
        report(f"separability d' {low:g}-{high:g}", [c for c in cases if low <= c.separability < high])
    for phase in sorted({c.phase for c in cases} - {"?"}):
        report(f"phase {phase}", [c for c in cases if c.phase == phase])
    if where:
        shares = np.array(where)
        print("where the reference tumor went, mean share per case: "
              + ", ".join(f"{name} {share:.2f}" for name, share in zip(WHERE_COLUMNS, shares.mean(axis=0))))
        missed = np.array([c.tumor_dice < 0.5 for c in cases])
        if missed.any():
            print(f"  the {missed.sum()} cases under 0.5 tumor Dice: "
                  + ", ".join(f"{name} {share:.2f}" for name, share in zip(WHERE_COLUMNS, shares[missed].mean(axis=0))))
    if volumes:
        by_case, reference = np.array(volumes), np.array([c.tumor_ml for c in cases])
        print("false and missed tumor, mean mL per case (" + ", ".join(VOLUME_COLUMNS) + "):")
        for low, high in SIZE_BANDS_ML:
            chosen = (low <= reference) & (reference < high)
            if not chosen.any():
                continue
            band = by_case[chosen]
            outweighs = int((band[:, 0] + band[:, 1] > reference[chosen]).sum())
            print(f"  tumor {low:g}-{high:g} mL ({chosen.sum()} cases, reference {reference[chosen].mean():.1f} mL): "
                  + ", ".join(f"{name} {v:.1f}" for name, v in zip(VOLUME_COLUMNS, band.mean(axis=0)))
                  + f"; false tumor outweighs the tumor in {outweighs}")
    if ceilings:
        print(f"resampling ceiling ({weights.name}: {preprocessing.slice_spacing_mm:g} mm slices, "
              f"{preprocessing.inplane_spacing_mm or 'native'} mm in-plane): "
              f"mean tumor Dice {np.mean(ceilings):.3f} (lowest {min(ceilings):.3f})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
