"""Is model B really better than model A on these cases? A paired comparison of two score CSVs.

    kits-seg evaluate --pred PRED_A --gt GT --csv a.csv
    kits-seg evaluate --pred PRED_B --gt GT --csv b.csv
    python scripts/compare_scores.py a.csv b.csv [--resamples 10000] [--seed 0]

For kidney, tumor and composite Dice: the mean of each model, the mean per-case difference
B - A with a 95% paired bootstrap interval (cases resampled with replacement), and on how many
cases B is higher or lower. With 30 validation cases, where a small tumor scores 0 or 0.8
depending on a few voxels, differences in the mean tumor Dice of a few hundredths are often
inside that interval: a model is called better only when the interval excludes 0.
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

import numpy as np

METRICS = ("kidney_dice", "tumor_dice", "composite_dice")


def read_scores(path: Path) -> dict[str, dict[str, float]]:
    """Per-case scores of a ``kits-seg evaluate --csv`` file (its summary rows are skipped)."""
    with path.open(newline="") as stream:
        rows = [r for r in csv.DictReader(stream) if r.get("case", "").startswith("case_")]
    if not rows:
        raise SystemExit(f"{path}: no case rows (expected the CSV of kits-seg evaluate --csv)")
    return {r["case"]: {m: float(r[m]) for m in METRICS} for r in rows}


def paired_bootstrap(diff: np.ndarray, resamples: int, rng: np.random.Generator) -> tuple[float, float]:
    """95% interval of the mean of ``diff`` (NaN cases dropped), resampling cases."""
    diff = diff[~np.isnan(diff)]
    means = diff[rng.integers(0, diff.size, (resamples, diff.size))].mean(axis=1)
    low, high = np.percentile(means, [2.5, 97.5])
    return float(low), float(high)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("a", type=Path, help="scores CSV of model A (the reference)")
    parser.add_argument("b", type=Path, help="scores CSV of model B")
    parser.add_argument("--resamples", type=int, default=10000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    a, b = read_scores(args.a), read_scores(args.b)
    cases = sorted(set(a) & set(b))
    if not cases:
        raise SystemExit(f"{args.a} and {args.b} share no case")
    only = sorted(set(a) ^ set(b))
    if only:
        print(f"note: {len(only)} case(s) scored by one file only are left out: {', '.join(only[:5])}")
    rng = np.random.default_rng(args.seed)
    print(f"{len(cases)} paired cases; A = {args.a.name}, B = {args.b.name}")
    print(f"{'':<15} {'A':>7} {'B':>7} {'B - A':>7}  {'95% interval':>17}  {'B higher / lower':>16}")
    for metric in METRICS:
        va = np.array([a[c][metric] for c in cases])
        vb = np.array([b[c][metric] for c in cases])
        diff = vb - va
        low, high = paired_bootstrap(diff, args.resamples, rng)
        higher, lower = int(np.sum(diff > 1e-9)), int(np.sum(diff < -1e-9))
        verdict = "B better" if low > 0 else "A better" if high < 0 else "no clear difference"
        print(f"{metric:<15} {np.nanmean(va):7.4f} {np.nanmean(vb):7.4f} {np.nanmean(diff):+7.4f}  "
              f"[{low:+.4f}, {high:+.4f}]  {higher:>7} / {lower:<7} {verdict}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
