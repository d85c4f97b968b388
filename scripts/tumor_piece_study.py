"""Can the tumor pieces a model calls be told true from false after the fact?

    python scripts/tumor_piece_study.py extract --data work_data/phantoms_s31 --csv work_data/pieces_s31.csv
    python scripts/tumor_piece_study.py evaluate --test work_data/pieces_s24.csv ... [--fit work_data/pieces_s31.csv]
    python scripts/tumor_piece_study.py real-masks --masks ../shared/data/kits19

A case's tumor Dice is lost to misses and to false tumor pieces; on 120 round-13 validation
draws (four clean-up rules), keeping only the tumor pieces that touch the reference tumor would
lift the mean tumor Dice from 0.480 to 0.555. Which rule could tell the false pieces?

``extract`` segments each case as ``kits-seg predict`` does, but with ``max_pieces=0`` (the
two-piece rule is what ``evaluate`` applies), and writes three CSV files: one row per tumor piece (label 2, corner-connected, as
kitseg.metrics counts tumors) with what it looks like (volume, stage 2's and stage 1's
probabilities over it, its contact with kidney, its HU against the kidney around it, its share
of the case's largest tumor piece) and how much of it is reference tumor (``.csv``); one per
foreground piece (face-connected, as the clean-up's) with its kidney and tumor voxels, what the
reference says of it and its mean y1 (``.fg.csv``); one per case with the voxel counts the
KiTS19 Dice needs (``.cases.csv``). ``evaluate`` then gives each test case's kidney and tumor
Dice under each rule from those counts alone, so no case is segmented twice: keep only the two
largest foreground pieces (``CleanupRules.max_pieces``), or the two holding the most kidney; clear, or relabel kidney, the tumor
pieces over which y1 averages under a threshold (stage 1 saw no kidney there; measured here
only, not in the tool); with ``--fit``, reject the pieces that a logistic model fit on other
draws scores under a threshold. The counts are exact for a rule applied after the clean-up's
(``max_pieces`` runs before the tumor relabelling, which can move a case slightly).
``real-masks`` counts each real mask's pieces: the two-piece rule must change none.
"""

from __future__ import annotations

import argparse
import csv
import time
from pathlib import Path

import numpy as np
from scipy import ndimage

from compare_scores import paired_bootstrap  # a sibling script: python puts scripts/ on the path

FEATURES = ("log_ml", "share_of_largest", "p_tumor_mean", "lead_mean", "kidney_contact", "hu_vs_kidney",
            "hu_sd", "slices", "y1_mean")
_CORNERS = ndimage.generate_binary_structure(3, 3)
_FACES = ndimage.generate_binary_structure(3, 1)
SHELL_MM = 5.0


def piece_rows(case: str, labels, ref, image, spacing, p_tumor, p_kidney, y1) -> tuple[list[dict], dict]:
    """One row per predicted tumor piece, and the case's voxel counts."""
    voxel_ml = float(np.prod(spacing)) / 1000.0
    tumor, ref_tumor = labels == 2, ref == 2
    case_row = {
        "case": case, "pred_tumor": int(tumor.sum()), "ref_tumor": int(ref_tumor.sum()),
        "both_tumor": int((tumor & ref_tumor).sum()), "pred_fg": int((labels > 0).sum()),
        "ref_fg": int((ref > 0).sum()), "both_fg": int(((labels > 0) & (ref > 0)).sum()),
    }
    case_row["fg_pieces"] = foreground_piece_rows(case, labels, ref, y1)
    pieces, count = ndimage.label(tumor, structure=_CORNERS)
    if count == 0:
        return [], case_row
    sizes = np.bincount(pieces.ravel(), minlength=count + 1)
    rows = []
    for index, box in enumerate(ndimage.find_objects(pieces), start=1):
        grow = tuple(int(np.ceil(SHELL_MM / d)) + 1 for d in spacing)
        big = tuple(slice(max(s.start - g, 0), s.stop + g) for s, g in zip(box, grow))
        piece = pieces[big] == index
        around = ndimage.binary_dilation(piece, _FACES) & ~piece
        near = ndimage.distance_transform_edt(~piece, sampling=spacing) <= SHELL_MM
        kidney_near = near & (labels[big] == 1)
        hu = image[big].astype(np.float64)
        rows.append({
            "case": case,
            "voxels": int(sizes[index]),
            "ref_tumor_voxels": int((piece & ref_tumor[big]).sum()),
            "ref_fg_voxels": int((piece & (ref[big] > 0)).sum()),
            "log_ml": float(np.log(sizes[index] * voxel_ml)),
            "share_of_largest": float(sizes[index] / sizes[1:].max()),
            "p_tumor_mean": float(p_tumor[big][piece].mean()),
            "lead_mean": float((p_tumor[big][piece] - p_kidney[big][piece]).mean()),
            "kidney_contact": float((labels[big][around] == 1).mean()),
            "hu_vs_kidney": float(hu[piece].mean() - hu[kidney_near].mean()) if kidney_near.any() else 0.0,
            "hu_sd": float(hu[piece].std()),
            "slices": int(piece.any(axis=(1, 2)).sum()),
            "y1_mean": float(y1[big][piece].mean()),
        })
    return rows, case_row


def foreground_piece_rows(case: str, labels, ref, y1) -> list[dict]:
    """One row per face-connected foreground piece (as the clean-up's pieces): its size, what
    the reference says of it and stage 1's mean y1 over it."""
    pieces, count = ndimage.label(labels > 0, structure=_FACES)
    if count == 0:
        return []
    index = np.arange(1, count + 1)
    voxels = ndimage.sum_labels(np.ones_like(pieces), pieces, index)
    return [{"case": case, "voxels": int(v), "kidney_voxels": int(k), "tumor_voxels": int(t),
             "ref_fg_voxels": int(f), "ref_tumor_voxels": int(rt), "pred_tumor_on_ref_tumor": int(tt), "y1_mean": float(m)}
            for v, k, t, f, rt, tt, m in zip(
                voxels, ndimage.sum_labels(labels == 1, pieces, index), ndimage.sum_labels(labels == 2, pieces, index),
                ndimage.sum_labels(ref > 0, pieces, index), ndimage.sum_labels(ref == 2, pieces, index),
                ndimage.sum_labels((labels == 2) & (ref == 2), pieces, index), ndimage.mean(y1, pieces, index))]


def extract(args) -> int:
    from kitseg.io import read_ct, read_labels
    from kitseg.pipeline import Segmenter
    from kitseg.postprocess import CleanupRules

    before_two_piece_rule = CleanupRules(max_pieces=0)  # evaluate applies that rule from the counts
    segmenter = Segmenter.from_file(args.weights, device="cpu")
    cases = sorted(p for p in args.data.iterdir() if (p / "imaging.nii.gz").is_file())
    piece_out, case_out, fg_out = [], [], []
    for case in cases:
        t0 = time.perf_counter()
        volume = read_ct(case / "imaging.nii.gz")
        ref = read_labels(case / "segmentation.nii.gz").array
        result = segmenter.segment(volume, cleanup=before_two_piece_rule)
        grid = result.prepared.grid
        rows, case_row = piece_rows(
            case.name, result.labels, ref, volume.array, volume.spacing,
            grid.to_source(result.probs[2]), grid.to_source(result.probs[1]), grid.to_source(result.y1))
        piece_out += rows
        fg_out += case_row.pop("fg_pieces")
        case_out.append(case_row)
        print(f"{case.name}: {len(rows)} tumor piece(s), {sum(r['ref_tumor_voxels'] > 0 for r in rows)} on the "
              f"reference tumor ({time.perf_counter() - t0:.0f} s)", flush=True)
    write(args.csv, piece_out, case_out, fg_out)
    return 0


def write(path: Path, pieces: list[dict], cases: list[dict], fg_pieces: list[dict]) -> None:
    """``path`` (tumor pieces), ``.cases.csv`` and ``.fg.csv`` beside it, as :func:`read` reads them."""
    path.parent.mkdir(parents=True, exist_ok=True)
    for out, rows in ((path, pieces), (path.with_suffix(".cases.csv"), cases), (path.with_suffix(".fg.csv"), fg_pieces)):
        with out.open("w", newline="") as stream:
            writer = csv.DictWriter(stream, fieldnames=list((rows or [{}])[0].keys()) or ["case"])
            writer.writeheader()
            writer.writerows(rows)


def _numbers(row: dict) -> dict:
    """A CSV row with every column but the case name read as a number."""
    return {k: (v if k == "case" else float(v)) for k, v in row.items()}


def read(path: Path) -> tuple[list[dict], dict[str, dict]]:
    with path.open(newline="") as stream:
        pieces = [_numbers(r) for r in csv.DictReader(stream)]
    with path.with_suffix(".cases.csv").open(newline="") as stream:
        cases = {r["case"]: _numbers(r) for r in csv.DictReader(stream)}
    for r in pieces:
        r["case"] = f"{path.stem}/{r['case']}"
    return pieces, {f"{path.stem}/{k}": v for k, v in cases.items()}


def read_sets(paths: list[Path]) -> tuple[list[dict], dict[str, dict]]:
    """The piece rows and case rows of several extract runs together."""
    pieces, cases = [], {}
    for path in paths:
        p, c = read(path)
        pieces += p
        cases.update(c)
    return pieces, cases


def dice_from_counts(both: float, pred: float, ref: float) -> float:
    """The Dice of two masks from their voxel counts (1 where both are empty, as kitseg.metrics)."""
    return 2.0 * both / (pred + ref) if pred + ref else 1.0


def interval(diff: np.ndarray, rng: np.random.Generator) -> str:
    low, high = paired_bootstrap(diff, 2000, rng)
    return f"[{low:+.4f}, {high:+.4f}]"


def design(pieces: list[dict]) -> np.ndarray:
    return np.array([[r[f] for f in FEATURES] for r in pieces], np.float64)


def fit_logistic(x: np.ndarray, y: np.ndarray, l2: float = 1.0, steps: int = 50) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Newton's method on the L2-penalised log-likelihood; features standardised first."""
    mean, sd = x.mean(0), x.std(0) + 1e-9
    z = np.hstack([np.ones((len(x), 1)), (x - mean) / sd])
    w = np.zeros(z.shape[1])
    penalty = np.full(z.shape[1], l2)
    penalty[0] = 0.0
    for _ in range(steps):
        p = 1.0 / (1.0 + np.exp(-z @ w))
        grad = z.T @ (p - y) + penalty * w
        hess = (z * (p * (1 - p))[:, None]).T @ z + np.diag(penalty)
        w -= np.linalg.solve(hess, grad)
    return w, mean, sd


def predict(model, x: np.ndarray) -> np.ndarray:
    w, mean, sd = model
    return 1.0 / (1.0 + np.exp(-(np.hstack([np.ones((len(x), 1)), (x - mean) / sd]) @ w)))


def tumor_dice(cases: dict[str, dict], pieces: list[dict], reject: np.ndarray) -> np.ndarray:
    """Each case's tumor Dice with the rejected pieces relabelled kidney (exact, from the counts)."""
    pred = {c: v["pred_tumor"] for c, v in cases.items()}
    both = {c: v["both_tumor"] for c, v in cases.items()}
    for r, out in zip(pieces, reject):
        if out:
            pred[r["case"]] -= r["voxels"]
            both[r["case"]] -= r["ref_tumor_voxels"]
    return np.array([dice_from_counts(both[c], pred[c], v["ref_tumor"]) for c, v in cases.items()])


def read_foreground(path: Path) -> dict[str, list[dict]]:
    by_case: dict[str, list[dict]] = {}
    with path.with_suffix(".fg.csv").open(newline="") as stream:
        for r in csv.DictReader(stream):
            by_case.setdefault(f"{path.stem}/{r['case']}", []).append(_numbers(r))
    return by_case


def dice_keeping_two(case: dict, fg_pieces: list[dict], key: str | None) -> tuple[float, float]:
    """A case's (kidney, tumor) Dice with only the two foreground pieces of the largest ``key``
    ("voxels", "kidney_voxels") kept, from its ``.cases.csv`` and ``.fg.csv`` rows; None keeps all."""
    pred_fg, both_fg, pred_t, both_t = case["pred_fg"], case["both_fg"], case["pred_tumor"], case["both_tumor"]
    if key is not None:
        for r in sorted(fg_pieces, key=lambda r: -r[key])[2:]:
            pred_fg -= r["voxels"]
            both_fg -= r["ref_fg_voxels"]
            pred_t -= r["tumor_voxels"]
            both_t -= r["pred_tumor_on_ref_tumor"]
    return dice_from_counts(both_fg, pred_fg, case["ref_fg"]), dice_from_counts(both_t, pred_t, case["ref_tumor"])


def two_kidneys_at_most(paths: list[Path]) -> None:
    """Each case's kidney and tumor Dice when only the two foreground pieces holding the most
    kidney (or the two largest) are kept: a person has two kidneys at most."""
    cases = read_sets(paths)[1]
    pieces = {k: v for path in paths for k, v in read_foreground(path).items()}
    rng = np.random.default_rng(0)
    results = {}
    for rule, key in (("as labelled", None), ("keep the 2 with most kidney", "kidney_voxels"),
                      ("keep the 2 largest", "voxels")):
        kidney, tumor, dropped = [], [], 0
        for name, c in cases.items():
            rows = pieces.get(name, [])
            k, t = dice_keeping_two(c, rows, key)
            kidney.append(k)
            tumor.append(t)
            dropped += max(len(rows) - 2, 0) if key is not None else 0
        results[rule] = np.array(kidney), np.array(tumor)
        line = f"  {rule:<28} kidney {np.mean(kidney):.4f}  tumor {np.mean(tumor):.4f}  pieces dropped {dropped}"
        if key is not None:
            for label, values, base in (("kidney", kidney, results["as labelled"][0]), ("tumor", tumor, results["as labelled"][1])):
                diff = np.asarray(values) - base
                line += (f"\n      {label} {diff.mean():+.4f} {interval(diff, rng)}"
                         f" higher in {int((diff > 1e-9).sum())}, lower in {int((diff < -1e-9).sum())}")
        print(line)
    print(f"  ({len(cases)} cases; {sum(len(v) > 2 for v in pieces.values())} with more than two foreground pieces)")


def low_y1_rule(paths: list[Path], thresholds=(0.3, 0.4, 0.5, 0.6, 0.7)) -> None:
    """Each case's Dice when tumor pieces whose mean y1 (stage 1's foreground probability) is under
    a threshold are relabelled kidney, or cleared to background: stage 1 saw no kidney there."""
    pieces, cases = read_sets(paths)
    rng = np.random.default_rng(0)
    base_k, base_t = None, None
    for threshold in (0.0,) + tuple(thresholds):
        for to in ("kidney", "background"):
            if threshold == 0.0 and to == "background":
                continue
            pred_fg = {c: v["pred_fg"] for c, v in cases.items()}
            both_fg = {c: v["both_fg"] for c, v in cases.items()}
            reject = np.array([r["y1_mean"] < threshold for r in pieces])
            for r, out in zip(pieces, reject):
                if out and to == "background":
                    pred_fg[r["case"]] -= r["voxels"]
                    both_fg[r["case"]] -= r["ref_fg_voxels"]
            tumor = tumor_dice(cases, pieces, reject)
            kidney = np.array([dice_from_counts(both_fg[c], pred_fg[c], v["ref_fg"]) for c, v in cases.items()])
            if base_k is None:
                base_k, base_t = kidney, tumor
                print(f"  as labelled: kidney {kidney.mean():.4f}, tumor {tumor.mean():.4f} ({len(cases)} cases)")
                continue
            text = f"  y1 < {threshold:.1f} -> {to:<10} {int(reject.sum()):3d} pieces " \
                   f"({sum(1 for r, o in zip(pieces, reject) if o and r['ref_tumor_voxels'] > 0)} on reference tumor)"
            for label, values, base in (("kidney", kidney, base_k), ("tumor", tumor, base_t)):
                diff = values - base
                text += (f"; {label} {diff.mean():+.4f} {interval(diff, rng)}"
                         f" {int((diff > 1e-9).sum())}/{int((diff < -1e-9).sum())}")
            print(text)


def evaluate(args) -> int:
    print("Two kidneys at most:")
    two_kidneys_at_most(args.test)
    print("Tumor pieces where stage 1 saw little foreground (higher/lower counts after each interval):")
    low_y1_rule(args.test)
    if not args.fit:
        return 0
    fit_pieces = read_sets(args.fit)[0]
    x, y = design(fit_pieces), np.array([r["ref_tumor_voxels"] > 0.5 * r["voxels"] for r in fit_pieces], float)
    model = fit_logistic(x, y, l2=args.l2)
    print(f"fit: {len(y)} pieces, {int(y.sum())} mostly reference tumor")
    for name, weight in zip(("intercept",) + FEATURES, model[0]):
        print(f"  {name:<18} {weight:+.3f}")
    pieces, cases = read_sets(args.test)
    score = predict(model, design(pieces))
    base = tumor_dice(cases, pieces, np.zeros(len(pieces), bool))
    oracle = tumor_dice(cases, pieces, np.array([r["ref_tumor_voxels"] == 0 for r in pieces]))
    print(f"test: {len(cases)} cases, {len(pieces)} pieces; tumor Dice as labelled {base.mean():.4f}, "
          f"keeping only pieces on the reference tumor {oracle.mean():.4f}")
    rng = np.random.default_rng(0)
    for threshold in args.thresholds:
        reject = score < threshold
        dice = tumor_dice(cases, pieces, reject)
        diff = dice - base
        lost_true = sum(1 for r, out in zip(pieces, reject) if out and r["ref_tumor_voxels"] > 0)
        print(f"  reject p < {threshold:.2f}: {int(reject.sum()):4d} pieces ({lost_true} touching reference tumor), "
              f"tumor Dice {dice.mean():.4f}, {diff.mean():+.4f} {interval(diff, rng)}, higher in {int((diff > 1e-9).sum())}, lower in {int((diff < -1e-9).sum())}")
    return 0


def real_masks(args) -> int:
    """How many face-connected pieces each real mask holds at 1% and 10% of its largest: the
    two-piece rule must change none."""
    from kitseg.io import read_labels

    worst, at_10_counts = 0, {}
    cases = sorted(p for p in args.masks.iterdir() if (p / "segmentation.nii.gz").is_file())
    for case in cases:
        labels = read_labels(case / "segmentation.nii.gz").array
        pieces, _ = ndimage.label(labels > 0, structure=_FACES)
        sizes = np.sort(np.bincount(pieces.ravel())[1:])[::-1]
        at_1, at_10 = int((sizes >= 0.01 * sizes[0]).sum()), int((sizes >= 0.1 * sizes[0]).sum())
        worst = max(worst, at_1)
        at_10_counts[at_10] = at_10_counts.get(at_10, 0) + 1
        if at_1 > 2:
            print(f"{case.name}: {at_1} pieces of at least 1% of the largest ({sizes[:4].tolist()} voxels)")
    print(f"{len(cases)} masks; the most pieces of at least 1% of a mask's largest: {worst}; masks by their "
          f"pieces of at least 10%: {dict(sorted(at_10_counts.items()))}")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    one = sub.add_parser("extract")
    one.add_argument("--data", type=Path, required=True, help="KiTS19-layout folder (imaging + segmentation)")
    one.add_argument("--weights", type=Path, default=None)
    one.add_argument("--csv", type=Path, required=True, help="piece rows (case rows go beside it: .cases.csv)")
    two = sub.add_parser("evaluate")
    two.add_argument("--fit", type=Path, nargs="*", default=[], help="piece CSVs to fit the piece model on (none: skip it)")
    two.add_argument("--test", type=Path, nargs="+", required=True)
    two.add_argument("--l2", type=float, default=1.0)
    two.add_argument("--thresholds", type=float, nargs="+", default=[0.1, 0.2, 0.3, 0.4, 0.5])
    three = sub.add_parser("real-masks")
    three.add_argument("--masks", type=Path, required=True, help="KiTS19-layout folder of real masks")
    args = parser.parse_args()
    return {"extract": extract, "evaluate": evaluate, "real-masks": real_masks}[args.command](args)


if __name__ == "__main__":
    raise SystemExit(main())
