"""How many tumors does a model find, by tumor size? Counted tumor by tumor, not case by case.

    kits-seg predict work_data/phantoms_s24 -o work_data/pred_s24
    python scripts/tumor_detection_study.py work_data/pred_s24 work_data/phantoms_s24 [PRED2 GT2 ...]

Each pair is a folder of predictions (``kits-seg predict``) and its ground-truth folder (KiTS19
layout), paired as ``kits-seg evaluate`` pairs them; several pairs are pooled. For each found
share (``--found-shares``, default 0.5 as ``kits-seg evaluate`` and 0.1, "touched"), the
reference tumors found per size band, with ``kitseg.metrics.tumor_detection``'s definitions
(3D connected pieces, specks under 0.1 mL left out); then the false tumor pieces: per case, and
by size.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

SIZE_BANDS_ML = ((0.0, 10.0), (10.0, 50.0), (50.0, float("inf")))
FALSE_BANDS_ML = ((0.0, 1.0), (1.0, 10.0), (10.0, float("inf")))


def _band_name(low: float, high: float) -> str:
    return f"{low:g} mL and more" if high == float("inf") else f"{low:g}-{high:g} mL"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folders", type=Path, nargs="+", metavar="PRED GT", help="pairs of folders")
    parser.add_argument("--found-shares", type=float, nargs="+", default=[0.5, 0.1])
    args = parser.parse_args(argv)
    if len(args.folders) % 2:
        raise SystemExit(f"give pairs of folders (PRED GT [PRED2 GT2 ...]); got {len(args.folders)}")
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    from kitseg.evaluation import pair_predictions
    from kitseg.io import read_labels
    from kitseg.metrics import tumor_detection

    ref_ml: list[float] = []
    shares: list[float] = []
    false_per_case: list[tuple[float, ...]] = []
    for pred_dir, gt_dir in zip(args.folders[::2], args.folders[1::2]):
        for pair in pair_predictions(pred_dir, gt_dir):
            ref, pred = read_labels(pair.reference), read_labels(pair.prediction)
            found = tumor_detection(pred.array, ref.array, ref.spacing)
            ref_ml += found.ref_ml
            shares += found.labelled_share
            false_per_case.append(found.false_ml)
    ref_ml_arr, share_arr = np.asarray(ref_ml), np.asarray(shares)
    print(f"{len(false_per_case)} cases, {len(ref_ml)} reference tumors")
    for found_share in args.found_shares:
        found = share_arr >= found_share
        cells = []
        for low, high in SIZE_BANDS_ML:
            band = (ref_ml_arr >= low) & (ref_ml_arr < high)
            cells.append(f"{_band_name(low, high)} {found[band].sum()} of {band.sum()}")
        print(f"found (at least {found_share:g} labelled tumor): {found.sum()} of {found.size} "
              f"({100 * found.mean():.0f}%); " + "; ".join(cells))
    for low, high in SIZE_BANDS_ML:
        band = (ref_ml_arr >= low) & (ref_ml_arr < high)
        if band.any():
            print(f"  {_band_name(low, high)}: median share labelled tumor {np.median(share_arr[band]):.2f}")
    pieces = np.asarray([v for case in false_per_case for v in case])
    counts = np.asarray([len(case) for case in false_per_case])
    print(f"false tumor pieces: {pieces.size} in {np.count_nonzero(counts)} of {counts.size} cases "
          f"(median {np.median(counts):g} per case, most {counts.max() if counts.size else 0}), "
          f"{pieces.sum():.1f} mL")
    for low, high in FALSE_BANDS_ML:
        band = (pieces >= low) & (pieces < high)
        cases = sum(any(low <= v < high for v in case) for case in false_per_case)
        print(f"  {_band_name(low, high)}: {band.sum()} pieces, {pieces[band].sum():.1f} mL, in {cases} cases")
    return 0


if __name__ == "__main__":
    sys.exit(main())
