"""Would reading stage 2's probabilities across neighbouring slices label kidney or tumor better?

    python scripts/prob_smoothing_study.py --data work_data/phantoms_s24 --csv-dir work_data/smooth_s24 \
        [--variants base split_z0.25 ...]

Stage 2 labels each 5 mm slice on its own; a tumor is a 3D body. This runs the model once per
case (each slice alone, ``--tumor-smoothing 0``), then labels the same stage-2 probabilities
several ways, each followed by the default clean-up, and scores them with the KiTS19
definitions. ``z0.25`` averages all three class probabilities with the neighbouring slices'
(weights 0.25, 0.5, 0.25) before the argmax. Every other variant keeps the argmax's foreground
and reads kidney or tumor from a "lead" map (the tumor's probability minus the kidney's, or a
function of it), so the kidney Dice (label > 0) cannot move but through the clean-up:

- ``base``: the lead as it is, which is the plain argmax (the tool with ``--tumor-smoothing 0``);
- ``split_zW``: averaged with the neighbouring slices' (W, 1 - 2W, W): the tool's
  ``--tumor-smoothing W``;
- ``split_g3d_S``: a 3D Gaussian of sigma S stage-grid voxels;
- ``shrink_z0.25`` / ``grow_z0.25``: tumor only where both the lead and its average say so / where
  either does (which half of ``split_z0.25`` does what);
- ``isolated``: a tumor call whose slice neighbours both call kidney (or nothing) made kidney;
- ``mask_z0.25``: as ``split_z0.25``, but a neighbour outside the stage-2 mask (where both
  probabilities are 0) counts the slice's own value instead.

Per-variant scores go to ``DIR/<variant>.csv`` for scripts/compare_scores.py.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
from scipy import ndimage


def _raw(probs):
    return probs[2].astype(np.float32) - probs[1].astype(np.float32)


def _z_average(probs, weight):
    from kitseg.pipeline import tumor_lead

    return tumor_lead(probs, weight)


def _isolated_made_kidney(probs):
    lead = _raw(probs)
    tumor = lead > 0
    padded = np.pad(tumor, ((1, 1), (0, 0), (0, 0)))
    alone = tumor & ~padded[:-2] & ~padded[2:]
    return np.where(alone, -np.abs(lead), lead)


def _mask_neighbours_only(probs, weight=0.25):
    """The average of three slices, a neighbour outside the stage-2 mask replaced by the slice itself."""
    lead, inside = _raw(probs), probs[0] < 1
    near = np.pad(lead, ((1, 1), (0, 0), (0, 0)), mode="edge")
    near_inside = np.pad(inside, ((1, 1), (0, 0), (0, 0)), mode="edge")
    below = np.where(near_inside[:-2], near[:-2], lead)
    above = np.where(near_inside[2:], near[2:], lead)
    return (1 - 2 * weight) * lead + weight * (below + above)


LEADS = {  # name: stage-grid lead map (tumor where > 0) from the (3, Z, Y, X) probabilities
    "base": _raw,
    "split_z0.25": lambda p: _z_average(p, 0.25),
    "split_z0.33": lambda p: _z_average(p, 1 / 3),
    "split_g3d_0.7": lambda p: ndimage.gaussian_filter(_raw(p), 0.7, mode="nearest"),
    "split_g3d_1.0": lambda p: ndimage.gaussian_filter(_raw(p), 1.0, mode="nearest"),
    "shrink_z0.25": lambda p: np.minimum(_raw(p), _z_average(p, 0.25)),
    "grow_z0.25": lambda p: np.maximum(_raw(p), _z_average(p, 0.25)),
    "isolated": _isolated_made_kidney,
    "mask_z0.25": _mask_neighbours_only,
}
ALL_VARIANTS = ("z0.25",) + tuple(LEADS)


def z_averaged_probs(probs: np.ndarray, weight: float) -> np.ndarray:
    out = probs.astype(np.float32, copy=True)
    padded = np.concatenate([out[:, :1], out, out[:, -1:]], axis=1)
    out = (1 - 2 * weight) * out + weight * (padded[:, :-2] + padded[:, 2:])
    out[0][probs[0] >= 1] = 1.0  # the pipeline reads "no foreground here" from probs[0] == 1
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True, help="KiTS19-layout folder (imaging + segmentation)")
    parser.add_argument("--weights", type=Path, default=None)
    parser.add_argument("--csv-dir", type=Path, required=True)
    parser.add_argument("--variants", nargs="+", choices=ALL_VARIANTS, default=ALL_VARIANTS)
    args = parser.parse_args()

    from kitseg.io import read_ct, read_labels
    from kitseg.metrics import aggregate, kits_scores, write_scores_csv
    from kitseg.pipeline import Segmenter

    segmenter = Segmenter.from_file(args.weights, device="cpu", tumor_slice_smoothing=0.0)  # each slice alone
    cases = sorted(p for p in args.data.iterdir() if (p / "imaging.nii.gz").is_file())
    scores: dict[str, list] = {name: [] for name in args.variants}
    args.csv_dir.mkdir(parents=True, exist_ok=True)
    for case in cases:
        t0 = time.perf_counter()
        volume = read_ct(case / "imaging.nii.gz")
        ref = read_labels(case / "segmentation.nii.gz")
        result = segmenter.segment(volume, cleanup=None)
        for name in args.variants:
            if name == "z0.25":
                labels = segmenter.labels_on_source(result.prepared, z_averaged_probs(result.probs, 0.25))
            else:
                labels = segmenter.labels_on_source(result.prepared, result.probs, lead=LEADS[name](result.probs))
            scores[name].append(kits_scores(labels, ref.array, ref.spacing, case=case.name))
        print(f"{case.name} ({time.perf_counter() - t0:.0f} s): "
              + "  ".join(f"{n} {s[-1].tumor_dice:.3f}" for n, s in scores.items()), flush=True)
    for name, case_scores in scores.items():
        write_scores_csv(case_scores, args.csv_dir / f"{name}.csv")
        mean = aggregate(case_scores)
        print(f"{name:>14}  kidney {mean['kidney_dice']:.4f}  tumor {mean['tumor_dice']:.4f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
