"""How should an ensemble stage 2 weigh its members? Scores every weighting from one run.

    python scripts/stage2_member_weights_study.py --weights W.kseg --cases work_data/phantoms_s24 \\
        --out work_data/weights_s24 [--mix 1,1,1 2,1,1 ...] [--realct]

For each case, stage 1 runs once and each member of the model's stage-2 ensemble runs alone;
every weighting (``--mix``, one number per member) then averages the members' class
probabilities with those weights, and the argmax, the default clean-up and the KiTS19 scores
follow as in ``kits-seg predict`` and ``kits-seg evaluate``. Writes ``OUT/scores_MIX.csv``
(the ``kits-seg evaluate`` columns, so ``scripts/compare_scores.py`` compares them) and
``OUT/false_tumor.csv``: predicted tumor outside the reference tumor, in mL, per case and
weighting. With ``--realct``, the real CT's kidney Dice and tumor volume per weighting as well
(its reference has no tumor, so all of it is false).
"""

from __future__ import annotations

import argparse
import csv
import functools
import sys
import time
from pathlib import Path

import numpy as np

REALCT = Path(__file__).resolve().parents[2] / "shared" / "data" / "realct"


def parse_mix(text: str) -> tuple[float, ...]:
    try:
        mix = tuple(float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--mix {text!r}: give comma-separated numbers, e.g. 2,1,1") from None
    from kitseg.networks.ensemble import normalised_mix

    try:
        normalised_mix(list(mix), len(mix))  # the check a model file's mix gets
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"--mix {text!r}: {error}") from None
    return mix


def mix_name(mix: tuple[float, ...]) -> str:
    return "-".join(f"{v:g}" for v in mix)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weights", type=Path, default=None, help="model file (default: the shipped one)")
    parser.add_argument("--cases", type=Path, nargs="*", default=[], help="KiTS19-layout folders with references")
    parser.add_argument("--out", type=Path, required=True, help="folder for the CSV files")
    parser.add_argument("--mix", type=parse_mix, nargs="+", default=None,
                        help="member weightings (default: equal, and the first member at 0.4, 0.5, 0.6 and alone)")
    parser.add_argument("--realct", action="store_true", help="also score ../shared/data/realct (skipped if absent)")
    args = parser.parse_args()

    from kitseg.atomic import atomic_path
    from kitseg.io import discover_inputs, read_ct, read_labels
    from kitseg.metrics import dice, kits_scores, write_scores_csv
    from kitseg.pipeline import Segmenter

    segmenter = Segmenter.from_file(args.weights, device="cpu")
    ensemble = segmenter.stage2_net
    if not hasattr(ensemble, "members"):
        parser.error("the model's stage 2 is a single network: nothing to weigh")
    members = list(ensemble.members)
    n = len(members)
    mixes = list(dict.fromkeys(args.mix or default_mixes(n)))  # each once, in order
    names = [mix_name(mix) for mix in mixes]
    if len(set(names)) < len(names):
        parser.error(f"two --mix weightings would share a file name: {names}")
    if any(len(mix) != n for mix in mixes):
        parser.error(f"every --mix needs {n} numbers, one per member")

    def member_probs(volume):
        prepared, y1, mask, probs = member_probabilities(segmenter, volume)
        return prepared, probs

    labelers = mix_labelers(segmenter, mixes)

    def labels_for(prepared, probs, mix):
        return labelers[mix](prepared, probs)

    args.out.mkdir(parents=True, exist_ok=True)
    scores = {mix: [] for mix in mixes}
    false_rows = []
    cases = [case for folder in args.cases for case in discover_inputs(folder)]
    for i, case in enumerate(cases, 1):
        start = time.perf_counter()
        if case.labels_path is None:
            parser.error(f"{case.image_path}: no segmentation.nii.gz beside it to score against")
        volume = read_ct(case.image_path)
        reference = read_labels(case.labels_path, like=volume).array
        prepared, probs = member_probs(volume)
        voxel_ml = float(np.prod(volume.spacing)) / 1000.0
        name = f"{case.name}_{case.image_path.parent.parent.name}"  # unique across folders
        row = {"case": name}
        for mix in mixes:
            labels = labels_for(prepared, probs, mix)
            scores[mix].append(kits_scores(labels, reference, volume.spacing, case=name))
            row[mix_name(mix)] = round(float(np.sum((labels == 2) & (reference != 2))) * voxel_ml, 2)
        false_rows.append(row)
        print(f"[{i}/{len(cases)}] {name} ({time.perf_counter() - start:.0f} s)", file=sys.stderr)

    if cases:
        print(f"{'weighting':>12} {'kidney':>7} {'tumor':>7} {'false tumor mL (mean, median)':>30}")
        for mix in mixes:
            write_scores_csv(scores[mix], args.out / f"scores_{mix_name(mix)}.csv")
            false_ml = [row[mix_name(mix)] for row in false_rows]
            kidney = np.mean([s.kidney_dice for s in scores[mix]])
            tumor = np.mean([s.tumor_dice for s in scores[mix]])
            false_mean, false_median = np.mean(false_ml), np.median(false_ml)
            print(f"{mix_name(mix):>12} {kidney:7.4f} {tumor:7.4f} {false_mean:14.2f} {false_median:8.2f}")
        with atomic_path(args.out / "false_tumor.csv") as tmp, open(tmp, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=["case"] + [mix_name(m) for m in mixes])
            writer.writeheader()
            writer.writerows(false_rows)

    realct = read_realct() if args.realct else None
    if realct is not None:
        volume, reference_kidney = realct
        prepared, probs = member_probs(volume)
        voxel_ml = float(np.prod(volume.spacing)) / 1000.0
        for mix in mixes:
            labels = labels_for(prepared, probs, mix)
            print(f"real CT {mix_name(mix):>12}: kidney Dice {dice(labels > 0, reference_kidney):.4f}, "
                  f"tumor {np.sum(labels == 2) * voxel_ml:.1f} mL (all false)")
    return 0


def member_probabilities(segmenter, volume):
    """(prepared, y1, mask, probs): stage 1 and the mask as ``kits-seg predict`` makes them, and
    the (members, 3, Z, Y, X) class probabilities of each member of the segmenter's stage 2 alone
    (a single network counts as one member)."""
    prepared = segmenter.prepare(volume)
    y1 = segmenter.stage1(prepared)
    mask = segmenter.mask(prepared, y1)
    ensemble = segmenter.stage2_net
    probs = []
    try:
        for member in getattr(ensemble, "members", [ensemble]):
            segmenter.stage2_net = member
            probs.append(segmenter.stage2(prepared, y1, mask).astype(np.float32))
    finally:
        segmenter.stage2_net = ensemble
    return prepared, y1, mask, np.stack(probs)


def read_realct():
    """(the real CT, its reference kidney mask), or None with a word where the shared data is absent."""
    from kitseg.io import read_ct, read_labels

    ct_path = REALCT / "totalseg_example_ct.nii.gz"
    if not ct_path.is_file():
        print(f"real CT skipped: {ct_path} is absent (shared development data)")
        return None
    volume = read_ct(ct_path)
    reference = read_labels(REALCT / "totalseg_example_ct_pred_labels.nii.gz", like=volume).array
    return volume, np.isin(reference, (2, 3))  # 2 = right, 3 = left kidney


def mix_labelers(segmenter, mixes) -> dict:
    """For each weighting (one number per member), a function of (prepared, probs) giving the
    labels of the members' (members, 3, Z, Y, X) probabilities averaged with those weights (as a
    model file weighs them), then labelled as ``kits-seg predict`` labels."""
    from kitseg.networks.ensemble import normalised_mix

    def labels(prepared, probs, shares):
        return segmenter.labels_on_source(prepared, np.tensordot(shares, probs, axes=1))

    return {mix: functools.partial(labels, shares=np.asarray(normalised_mix(list(mix), len(mix)), np.float32))
            for mix in mixes}


def score_labelings(folders, member_probs, labelings: dict, out: Path, realct: bool = False) -> None:
    """Score each way of labelling (name -> labels from (prepared, probs)) on every case of
    ``folders``, end to end: ``member_probs(volume)`` gives (prepared, probs) once per case. Writes
    ``out/scores_NAME.csv`` (the ``kits-seg evaluate`` columns) and prints the mean Dice; with
    ``realct``, the real CT's kidney Dice and (all false) tumor volume too."""
    from kitseg.io import discover_inputs, read_ct, read_labels
    from kitseg.metrics import dice, kits_scores, write_scores_csv

    out.mkdir(parents=True, exist_ok=True)
    scores = {name: [] for name in labelings}
    cases = [case for folder in folders for case in discover_inputs(folder)]
    for i, case in enumerate(cases, 1):
        start = time.perf_counter()
        volume = read_ct(case.image_path)
        reference = read_labels(case.labels_path, like=volume).array
        prepared, probs = member_probs(volume)
        for name, labels_of in labelings.items():
            scores[name].append(kits_scores(labels_of(prepared, probs), reference, volume.spacing, case=case.name))
        print(f"[{i}/{len(cases)}] {case.name} ({time.perf_counter() - start:.0f} s)", file=sys.stderr)
    if cases:
        print(f"{'labels':>14} {'kidney':>7} {'tumor':>7}")
        for name, rows in scores.items():
            write_scores_csv(rows, out / f"scores_{name}.csv")
            print(f"{name:>14} {np.mean([s.kidney_dice for s in rows]):7.4f} {np.mean([s.tumor_dice for s in rows]):7.4f}")
    found = read_realct() if realct else None
    if found is not None:
        volume, reference_kidney = found
        prepared, probs = member_probs(volume)
        voxel_ml = float(np.prod(volume.spacing)) / 1000.0
        for name, labels_of in labelings.items():
            labels = labels_of(prepared, probs)
            print(f"real CT {name:>14}: kidney Dice {dice(labels > 0, reference_kidney):.4f}, "
                  f"tumor {np.sum(labels == 2) * voxel_ml:.1f} mL (all false)")


def add_mixed_score_command(commands, *, help: str, network: str, network_help: str, weights_help: str,
                            mixes, mix_help: str | None = None):
    """The ``score`` subcommand of the studies that mix one new stage-2 network into a model's
    members: its arguments are those of ``score`` above, the new network's file as ``--NETWORK``
    (read back as ``args.network``)."""
    p = commands.add_parser("score", help=help)
    p.add_argument("--weights", type=Path, default=None, help=weights_help)
    p.add_argument(f"--{network}", dest="network", metavar=network.upper(), type=Path, required=True,
                   help=network_help)
    p.add_argument("--cases", type=Path, nargs="+", required=True, help="KiTS19-layout folders with references")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--mix", type=parse_mix, nargs="+", default=[parse_mix(m) for m in mixes], help=mix_help)
    p.add_argument("--realct", action="store_true", help="also score ../shared/data/realct (skipped if absent)")
    return p


def default_mixes(n: int) -> list[tuple[float, ...]]:
    """Equal weights, then the first member (the oldest, in the shipped files) weighted up."""
    mixes = [(1.0,) * n]
    for first in (0.4, 0.5, 0.6):
        if first > 1.0 / n:
            mixes.append((first,) + ((1.0 - first) / (n - 1),) * (n - 1))
    mixes.append((1.0,) + (0.0,) * (n - 1))
    return mixes


if __name__ == "__main__":
    sys.exit(main())
