"""Does stage 2 underfit or overfit? Its Dice on training cases beside its Dice on validation cases.

    python scripts/fit_gap_study.py --run work_data/run_r4 --data work_data/phantoms_v3 [--weights M.kseg]

For a training run folder (``kits-seg train --out RUN``) and its data: stage 2 of the model
(default ``RUN/model.kseg``) scores a sample of the run's training cases, each through its
out-of-fold y1 (``RUN/oof_y1``: what stage 2 learnt from) and again through the model's own
stage 1, and the run's validation cases through the model's own stage 1 (what training
validates with). All on the stage grid, without augmentation, KiTS19 definitions; tumor Dice
also by tumor size. Training cases scoring no better than validation ones mean the network has
not fitted what it was shown (more steps or capacity would help); training far above validation
means it learnt its cases, not the task (more or more varied data would help). The run's
prepared-case cache is read, not rebuilt. Runs since 2026-12-03 keep out-of-fold y1 only on the
slices of stage 2's training mask (0 elsewhere): through it, stage 1's false positives on other
slices are not seen, so that row can score a little higher than it would for older runs.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

SIZE_BANDS_ML = ((0.0, 10.0), (10.0, 50.0), (50.0, float("inf")))
BAND_HEADER = "   ".join(f"{f'tumor {lo:g}-{hi:g} mL':>16}" for lo, hi in SIZE_BANDS_ML)


def load_run(run: Path, data: Path, parts: tuple[str, ...], files: tuple[str, ...] = ("config.json", "split.json"),
             cache: Path | None = None):
    """A ``kits-seg train --out`` folder's recipe and split, and its ``parts`` of the split's cases
    (read from the run's prepared-case cache, ``cache`` if it trained with ``--cache``, not
    rebuilt): ``(config, split, cases by name)``."""
    from kitseg.training.config import TrainConfig
    from kitseg.training.data import cache_folder, load_cases

    for needed in files:
        if not (run / needed).exists():
            raise SystemExit(f"{run}: no {needed}; is it a kits-seg train --out folder?")
    config = TrainConfig.from_dict(json.loads((run / "config.json").read_text()))
    split = json.loads((run / "split.json").read_text())
    cases = {c.name: c for c in load_cases(data, config.preprocessing, cache_folder(run, cache), progress=False,
                                           mapping=config.labels_mapped())}
    missing = sorted(set().union(*(split[part] for part in parts)) - set(cases))
    if missing:
        raise SystemExit(f"{data}: lacks the run's case(s) {', '.join(missing[:5])}")
    return config, split, cases


def tumor_ml(case) -> float:
    """The reference tumor's volume on the stage grid (mL)."""
    return (case.labels == 2).sum() * float(np.prod(case.spacing)) / 1000.0


def band_cells(cases: list, tumor_dice: list[float]) -> str:
    """Mean tumor Dice of the cases with a tumor, per size band (columns under BAND_HEADER)."""
    volumes_ml = [tumor_ml(c) for c in cases]
    cells = []
    for lo, hi in SIZE_BANDS_ML:
        in_band = [t for v, t in zip(volumes_ml, tumor_dice) if lo <= v < hi and v > 0]
        cells.append(f"{np.mean(in_band):.3f} ({len(in_band):>2} cases)" if in_band else "  -  (no case)")
    return "   ".join(f"{cell:>16}" for cell in cells)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=Path, required=True, help="a kits-seg train --out folder")
    parser.add_argument("--data", type=Path, required=True, help="the KiTS19-layout folder the run trained on")
    parser.add_argument("--cache", type=Path, default=None,
                        help="the run's prepared-case cache, if it trained with --cache (default RUN/cache)")
    parser.add_argument("--weights", type=Path, default=None, help="model whose stage 2 is scored (default RUN/model.kseg)")
    parser.add_argument("--train-cases", type=int, default=30, help="how many training cases to score (random sample)")
    parser.add_argument("--seed", type=int, default=0, help="seed of that sample")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()

    from kitseg.checkpoint import load_bundle
    from kitseg.pipeline import Segmenter
    from kitseg.training.loop import stage1_y1, stage2_dice

    config, split, cases = load_run(args.run, args.data, ("train", "validation"),
                                    files=("config.json", "split.json", "oof_y1"), cache=args.cache)
    weights = args.weights or args.run / "model.kseg"
    segmenter = Segmenter(load_bundle(weights), device=args.device, batch_size=16)
    rng = np.random.default_rng(args.seed)
    sample = sorted(rng.choice(split["train"], min(args.train_cases, len(split["train"])), replace=False))

    train_y1 = {n: np.load(args.run / "oof_y1" / f"{n}.npy").astype(np.float32) for n in sample}
    # The same training cases through the model's own stage 1 (which trained on them, so its y1 is
    # cleaner than out-of-fold): separates a weak y1 from a stage 2 that has not fitted its cases.
    train_own_y1 = stage1_y1(segmenter, [cases[n] for n in sample], config)
    val_y1 = stage1_y1(segmenter, [cases[n] for n in split["validation"]], config)

    print(f"stage 2 of {weights}, run {args.run}")
    print(f"{'cases':<25} {'n':>3} {'kidney':>7} {'tumor':>7}   " + BAND_HEADER)
    for title, names, y1 in (("training (out-of-fold y1)", sample, train_y1),
                             ("training (stage 1's y1)", sample, train_own_y1),
                             ("validation (stage 1's y1)", split["validation"], val_y1)):
        chosen = [cases[n] for n in names]
        scores = stage2_dice(segmenter, chosen, y1, config)
        kidney, tumor = (float(np.mean(column)) for column in zip(*scores))
        print(f"{title:<25} {len(names):>3} {kidney:>7.4f} {tumor:>7.4f}   " + band_cells(chosen, [t for _, t in scores]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
