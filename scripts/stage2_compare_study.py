"""Several models' stage 2 on one run's validation cases, on the stage grid, with per-case CSVs.

    python scripts/stage2_compare_study.py --run work_data/run_v4 --data work_data/phantoms_v4 \
        --weights work_data/run_amp/model.kseg work_data/run_v4/model.kseg --csv-dir work_data/cmp_v4

Scores each model as ``kits-seg train`` validates (stage 2 reading stage 1's y1 and its mask,
KiTS19 definitions) without the 20-odd minutes of predicting on the CTs' own grids: a quick way
to ask whether stage 2 trained on one phantom generation does better on another's images. y1 is
computed once per distinct stage 1 (models fine-tuned with ``--keep-stage1`` share it; the first
model of each such group also pays for it in the seconds column). Every model is given the run's
cached images and the run's stage-2 mask rule (or, with ``--mask-radius-mm``, a ball of that many
mm), so each must have been trained on the run's grid and intensity window (checked). With
``--csv-dir``, one CSV per model, named after its run folder, with the subset of ``kits-seg
evaluate --csv``'s columns that ``compare_scores.py`` and ``tumor_miss_study.py`` read (volumes
on the stage grid). The run's case cache is read, not rebuilt.
"""

from __future__ import annotations

import argparse
import csv
import time
from pathlib import Path

import numpy as np

from fit_gap_study import BAND_HEADER, band_cells, load_run, tumor_ml  # the same run reading and size bands


def csv_name(weights: Path) -> str:
    """``work_data/run_v4/model.kseg`` -> ``run_v4.csv``; a lone file -> its stem."""
    return (weights.parent.name if weights.name == "model.kseg" else weights.stem) + ".csv"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=Path, required=True, help="a kits-seg train --out folder (its split and cache)")
    parser.add_argument("--data", type=Path, required=True, help="the KiTS19-layout folder the run trained on")
    parser.add_argument("--cache", type=Path, default=None,
                        help="the run's prepared-case cache, if it trained with --cache (default RUN/cache)")
    parser.add_argument("--weights", type=Path, nargs="+", required=True, help="models scored")
    parser.add_argument("--csv-dir", type=Path, default=None, help="write one per-case CSV per model here")
    parser.add_argument("--mask-radius-mm", type=float, default=None, metavar="R",
                        help="stage 2's mask a ball of R mm instead of the run's rule (e.g. 20: 4 slices along z "
                        "where 10 stage-grid voxels reach 50 mm)")
    parser.add_argument("--mirror-stage2", action="store_true",
                        help="test-time mirroring in stage 2 only (Segmenter(mirror=\"stage2\"))")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()

    from kitseg.checkpoint import load_bundle, read_metadata
    from kitseg.config import MaskConfig
    from kitseg.pipeline import Segmenter
    from kitseg.training.loop import stage1_y1, stage2_dice

    config, split, cases = load_run(args.run, args.data, ("validation",), cache=args.cache)
    if args.mask_radius_mm is not None:
        config = config.replace(mask=MaskConfig(config.mask.threshold, args.mask_radius_mm, "mm"))
    chosen = [cases[n] for n in split["validation"]]
    names = [csv_name(w) for w in args.weights]
    if args.csv_dir is not None and len(set(names)) < len(names):
        raise SystemExit(f"--csv-dir: two models would share a CSV name ({', '.join(names)})")
    bundles = [load_bundle(w) for w in args.weights]
    for weights, bundle in zip(args.weights, bundles):  # fail before the first minutes of scoring
        if not bundle.preprocessing.matches_except_stage2_context(config.preprocessing):
            raise SystemExit(f"{weights}: trained on another grid or intensity window ({bundle.preprocessing}) than "
                             f"{args.run}'s cached cases ({config.preprocessing})")
    y1_by_stage1: dict[str, dict[str, np.ndarray]] = {}

    print(f"{len(chosen)} validation cases of {args.run} ({args.data}), stage grid, mask {config.mask}")
    print(f"{'model':<40} {'kidney':>7} {'tumor':>7}   " + BAND_HEADER + "   seconds")
    for weights, name, bundle in zip(args.weights, names, bundles):
        start = time.perf_counter()
        segmenter = Segmenter(bundle, device=args.device, batch_size=16, mirror="stage2" if args.mirror_stage2 else "off")
        key = read_metadata(weights)["stages"]["1"]["weights_sha256"]
        if key not in y1_by_stage1:
            y1_by_stage1[key] = stage1_y1(segmenter, chosen, config)
        scores = stage2_dice(segmenter, chosen, y1_by_stage1[key], config)
        kidney, tumor = (float(np.mean(column)) for column in zip(*scores))
        print(f"{str(weights):<40} {kidney:>7.4f} {tumor:>7.4f}   " + band_cells(chosen, [t for _, t in scores])
              + f"   {time.perf_counter() - start:7.1f}", flush=True)
        if args.csv_dir is not None:
            args.csv_dir.mkdir(parents=True, exist_ok=True)
            with (args.csv_dir / name).open("w", newline="") as stream:
                writer = csv.writer(stream)
                writer.writerow(["case", "kidney_dice", "tumor_dice", "composite_dice", "ref_tumor_ml"])
                for c, (k, t) in zip(chosen, scores):
                    writer.writerow([c.name, k, t, (k + t) / 2, tumor_ml(c)])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
