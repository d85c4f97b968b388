"""How often do stage 2's training crops show each tumor? The two ``tumor_sampling`` modes compared.

    python scripts/tumor_sampling_study.py --data work_data/data_mixf --cache work_data/cache

Builds the ``cpu`` preset's stage-2 sampler (or ``--preset``) on every labelled case of
``--data`` (prepared on the stage grid, through ``--cache``), draws ``--samples`` crop windows
per mode with the same seed, and counts the sightings of tumors under 10 mL and of 10 mL or more
(a sighting: a window holding at least one voxel of a tumor, a 3D connected piece of label 2 on
the stage grid; a window showing two tumors counts two), with the tumor voxels they show.
Nothing is trained; only the windows are drawn.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from kitseg.training import preset
from kitseg.training.config import TUMOR_SAMPLING
from kitseg.training.data import Stage2Sampler, load_cases, tumor_lesions

SMALL_ML = 10.0


def count_shown(sampler: Stage2Sampler, lesion_ml: list[list[float]], lesions: list[list[np.ndarray]],
                samples: int, seed: int) -> dict[str, int]:
    rng = np.random.default_rng(seed)
    counts = {"small sightings": 0, "small voxels": 0, "large sightings": 0, "large voxels": 0}
    for _ in range(samples):
        ci, z, window = sampler.draw_window(rng)
        for voxels, ml in zip(lesions[ci], lesion_ml[ci]):
            inside = voxels[:, 0] == z
            if window is not None:
                y0, y1, x0, x1 = window
                inside &= (voxels[:, 1] >= y0) & (voxels[:, 1] < y1) & (voxels[:, 2] >= x0) & (voxels[:, 2] < x1)
            shown = int(inside.sum())
            if shown:
                size = "small" if ml < SMALL_ML else "large"
                counts[f"{size} sightings"] += 1
                counts[f"{size} voxels"] += shown
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True, help="KiTS19-layout training folder")
    parser.add_argument("--cache", type=Path, default=None, help="stage-grid cache folder (as kits-seg train --cache)")
    parser.add_argument("--preset", default="cpu")
    parser.add_argument("--samples", type=int, default=20000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    config = preset(args.preset)
    cases = load_cases(args.data, config.preprocessing, args.cache, progress=False)
    y1 = {c.name: np.zeros((1, 1, 1), np.float16) for c in cases}  # only the windows are drawn, never y1
    lesions = [tumor_lesions(c.labels) for c in cases]
    lesion_ml = [[len(v) * float(np.prod(c.spacing)) / 1000 for v in pieces] for c, pieces in zip(cases, lesions)]
    all_ml = np.array([ml for per_case in lesion_ml for ml in per_case])
    print(f"{len(cases)} cases, {all_ml.size} tumors on the stage grid: {np.sum(all_ml < SMALL_ML)} under "
          f"{SMALL_ML:g} mL, {np.sum(all_ml >= SMALL_ML)} of {SMALL_ML:g} mL or more")
    print(f"{args.samples} windows per mode, crop {config.crop_stage2}, tumor_fraction {config.tumor_fraction}, "
          f"seed {args.seed}")
    results = {}
    for mode in TUMOR_SAMPLING:
        sampler = Stage2Sampler(cases, y1, config.mask, config.crop_stage2, config.tumor_fraction, tumor_sampling=mode)
        results[mode] = count_shown(sampler, lesion_ml, lesions, args.samples, args.seed)
        shown = ", ".join(f"{k} {v}" for k, v in results[mode].items())
        print(f"{mode:>7}: tumors seen in a window, and their voxels: {shown}")
    base, new = results[TUMOR_SAMPLING[0]], results[TUMOR_SAMPLING[1]]
    for key in base:
        print(f"{TUMOR_SAMPLING[1]} / {TUMOR_SAMPLING[0]}, {key}: {new[key] / max(base[key], 1):.2f}")


if __name__ == "__main__":
    main()
