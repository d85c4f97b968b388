"""Is model B really better than model A on these cases? A paired comparison of two score CSVs.

    kits-seg evaluate --pred PRED_A --gt GT --csv a.csv
    kits-seg evaluate --pred PRED_B --gt GT --csv b.csv
    python scripts/compare_scores.py a.csv b.csv [a2.csv b2.csv ...] [--resamples 10000] [--seed 0]

For kidney, tumor and composite Dice: the mean of each model, the mean per-case difference
B - A with a 95% paired bootstrap interval (cases resampled with replacement), and on how many
cases B is higher or lower. With 30 validation cases, where a small tumor scores 0 or 0.8
depending on a few voxels, differences in the mean tumor Dice of a few hundredths are often
inside that interval: a model is called better only when the interval excludes 0. Several
pairs of files (one per phantom seed, say) pool their cases into one comparison.
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

import numpy as np

METRICS = ("kidney_dice", "tumor_dice", "composite_dice")
#: Settings of ``kits-seg evaluate`` that change these Dice (reports before 2026-12-07 lack them).
DICE_SETTINGS = ("label_mapping", "gt_label_mapping", "empty_value")
#: Below this many paired cases the bootstrap interval says nothing (one case: zero width): no verdict.
MIN_CASES = 5


def read_scores(path: Path) -> tuple[dict[str, dict[str, float]], dict[str, str]]:
    """Per-case scores of a ``kits-seg evaluate --csv`` file (its ``mean`` row is skipped; cases of
    any name: KiTS's, a scan's, a DICOM series'), and the settings it records."""
    with path.open(newline="") as stream:
        rows = [r for r in csv.DictReader(stream) if r.get("case", "") not in ("", "mean")]
    if not rows:
        raise SystemExit(f"{path}: no case rows (expected the CSV of kits-seg evaluate --csv)")
    settings = {name: rows[0][name] for name in DICE_SETTINGS if name in rows[0]}
    return {r["case"]: {m: float(r[m]) for m in METRICS} for r in rows}, settings


def paired_bootstrap(diff: np.ndarray, resamples: int, rng: np.random.Generator) -> tuple[float, float]:
    """95% interval of the mean of ``diff`` (NaN cases dropped), resampling cases."""
    diff = diff[~np.isnan(diff)]
    means = diff[rng.integers(0, diff.size, (resamples, diff.size))].mean(axis=1)
    low, high = np.percentile(means, [2.5, 97.5])
    return float(low), float(high)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("csvs", type=Path, nargs="+", metavar="A.csv B.csv",
                        help="scores CSVs of model A (the reference) and model B; more pairs pool their cases")
    parser.add_argument("--resamples", type=int, default=10000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    if len(args.csvs) % 2:
        raise SystemExit(f"give pairs of CSVs (A B [A2 B2 ...]); got {len(args.csvs)} files")
    pairs = list(zip(args.csvs[0::2], args.csvs[1::2]))
    a, b = {}, {}
    for k, (path_a, path_b) in enumerate(pairs):
        tag = f" (pair {k + 1})" if len(pairs) > 1 else ""  # the same case of two seeds stays two cases
        (scores_a, settings_a), (scores_b, settings_b) = read_scores(path_a), read_scores(path_b)
        differ = [f"{name} {settings_a[name]!r} and {settings_b[name]!r}" for name in settings_a
                  if name in settings_b and settings_a[name] != settings_b[name]]
        if differ:  # the difference would be the scoring's, not the models'
            raise SystemExit(f"{path_a} and {path_b} were scored differently ({'; '.join(differ)}); "
                             "score both the same way")
        if not set(scores_a) & set(scores_b):
            raise SystemExit(f"{path_a} and {path_b} share no case")
        only = sorted(set(scores_a) ^ set(scores_b))
        if only:
            print(f"note: {len(only)} case(s) scored by one file only are left out: {', '.join(only[:5])}")
        a.update({case + tag: v for case, v in scores_a.items()})
        b.update({case + tag: v for case, v in scores_b.items()})
    cases = sorted(set(a) & set(b))
    rng = np.random.default_rng(args.seed)
    names = lambda k: ", ".join(str(pair[k]) if len(pairs) > 1 else pair[k].name for pair in pairs)  # noqa: E731
    print(f"{len(cases)} paired cases; A = {names(0)}, B = {names(1)}")
    print(f"{'':<15} {'A':>7} {'B':>7} {'B - A':>7}  {'95% interval':>17}  {'B higher / lower':>16}")
    for metric in METRICS:
        va = np.array([a[c][metric] for c in cases])
        vb = np.array([b[c][metric] for c in cases])
        diff = vb - va
        paired = int(np.count_nonzero(~np.isnan(diff)))
        if paired == 0:  # a reference with no tumor class (evaluate --map-gt-labels): nothing to compare
            print(f"{metric:<15} not scored")
            continue
        low, high = paired_bootstrap(diff, args.resamples, rng)
        higher, lower = int(np.sum(diff > 1e-9)), int(np.sum(diff < -1e-9))
        verdict = ("too few cases to tell" if paired < MIN_CASES else
                   "B better" if low > 0 else "A better" if high < 0 else "no clear difference")
        print(f"{metric:<15} {np.nanmean(va):7.4f} {np.nanmean(vb):7.4f} {np.nanmean(diff):+7.4f}  "
              f"[{low:+.4f}, {high:+.4f}]  {higher:>7} / {lower:<7} {verdict}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
