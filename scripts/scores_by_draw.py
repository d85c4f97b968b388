"""Read phantom scores by what each case shows: contrast phase, tumor size, tumor-to-kidney contrast.

    kits-seg evaluate --pred PRED --gt PHANTOMS --csv scores.csv
    python scripts/scores_by_draw.py scores.csv PHANTOMS [scores2.csv PHANTOMS2 ...]

Joins each scored case with its phantom's record (``PHANTOMS/case_XXXXX/phantom.json``, written
by ``kits-seg phantom``) and prints the mean kidney and tumor Dice and the tumors found per
group: phase, tumor size, tumor-to-kidney contrast either way, and darker or brighter than the
kidney by size (a model may find dark tumors and call bright ones kidney). A mean tumor Dice
mixes tumors no reader could see (an unenhanced scan, a tumor within a few HU of its kidney)
with plain ones; this says which the model misses. Several pairs (one per
phantom seed) pool their cases; a case name may repeat across pairs.
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

import numpy as np

SIZE_BANDS_ML = ((0.0, 10.0), (10.0, 50.0), (50.0, float("inf")))
CONTRAST_BANDS_HU = ((0.0, 15.0), (15.0, 40.0), (40.0, float("inf")))


def read_rows(scores: Path, phantoms: Path) -> list[dict]:
    with scores.open(newline="") as stream:
        rows = [r for r in csv.DictReader(stream) if r.get("case", "").startswith("case_")]
    if not rows:
        raise SystemExit(f"{scores}: no case rows (expected the CSV of kits-seg evaluate --csv)")
    joined = []
    for row in rows:
        record_path = phantoms / row["case"] / "phantom.json"
        if not record_path.is_file():
            raise SystemExit(f"{record_path}: not found (phantoms drawn before records were written: "
                             "draw them again with the same --seed and --overwrite; the images are the same)")
        record = json.loads(record_path.read_text(encoding="utf-8"))
        measured = record.get("measured_tumor") or {}
        kidney_hu = measured.get("kidney_near_tumor_hu_mean")
        joined.append({
            "kidney_dice": float(row["kidney_dice"]),
            "tumor_dice": float(row["tumor_dice"]),
            "found": float(row["tumors_found"]) if row.get("tumors_found") not in (None, "") else np.nan,
            "ref_tumors": float(row["ref_tumors"]) if row.get("ref_tumors") not in (None, "") else np.nan,
            "phase": record["protocol"]["phase"],
            "tumor_ml": measured.get("tumor_ml", 0.0),
            # Signed: > 0 where the tumor is brighter than the kidney around it.
            "tumor_minus_kidney_hu": (measured["tumor_hu_mean"] - kidney_hu if kidney_hu is not None else np.nan),
        })
    return joined


def line(name: str, rows: list[dict]) -> str:
    if not rows:
        return f"{name:<26} {0:>5}"
    tumor = np.array([r["tumor_dice"] for r in rows if r["tumor_ml"] > 0])
    found = np.nansum([r["found"] for r in rows])
    total = np.nansum([r["ref_tumors"] for r in rows])
    return (f"{name:<26} {len(rows):>5}  {np.mean([r['kidney_dice'] for r in rows]):7.4f}  "
            f"{tumor.mean() if tumor.size else float('nan'):7.3f}  {int(found):>4} of {int(total):<4}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("pairs", nargs="+", type=Path, help="scores.csv PHANTOMS_DIR [scores2.csv PHANTOMS_DIR2 ...]")
    args = parser.parse_args()
    if len(args.pairs) % 2:
        parser.error("give the files in pairs: a scores CSV, then the phantom folder it scored")
    rows = [r for scores, phantoms in zip(args.pairs[::2], args.pairs[1::2]) for r in read_rows(scores, phantoms)]

    print(f"{'group':<26} {'cases':>5}  {'kidney':>7}  {'tumor':>7}  tumors found")
    print(line("all", rows))
    for phase in ("none", "arterial", "venous", "delayed"):
        print(line(f"phase {phase}", [r for r in rows if r["phase"] == phase]))
    for low, high in SIZE_BANDS_ML:
        print(line(f"tumor {low:g}-{high:g} mL", [r for r in rows if r["tumor_ml"] > 0 and low <= r["tumor_ml"] < high]))
    for r in rows:
        r["contrast_hu"] = abs(r["tumor_minus_kidney_hu"])
    for low, high in CONTRAST_BANDS_HU:
        print(line(f"|tumor-kidney| {low:g}-{high:g} HU", [r for r in rows if low <= r["contrast_hu"] < high]))
    unknown = [r for r in rows if r["tumor_ml"] > 0 and np.isnan(r["contrast_hu"])]
    if unknown:  # a tumor with no kidney within 5 mm of it (an exophytic one), or none at all
        print(line("contrast unknown", unknown))
    enhanced_plain = [r for r in rows if r["phase"] != "none" and r["contrast_hu"] >= 15.0]
    print(line("enhanced, >= 15 HU", enhanced_plain))
    # Which way the contrast goes matters: a model may know dark tumors and call bright ones kidney.
    for side, sign in (("darker", -1.0), ("brighter", 1.0)):
        visible = [r for r in rows if sign * r["tumor_minus_kidney_hu"] >= 15.0]
        print(line(f"{side} by >= 15 HU", visible))
        for low, high in SIZE_BANDS_ML:
            print(line(f"  {side}, {low:g}-{high:g} mL", [r for r in visible if low <= r["tumor_ml"] < high]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
