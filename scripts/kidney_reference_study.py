"""Does stage 2 find more tumor when each CT's intensities are read against its own kidney? A study.

A tumor 60 HU brighter than its kidney that fills a pole's cross-section is, in that axial
slice, an even bright blob, as a kidney is in another scan's phase (docs/model_studies.md, "Limits, as recorded round by round"):
stage 2 sees one slice and cannot tell which. Here each case's stage-grid image is shifted so
that the median intensity where stage 1 says kidney (y1 >= 0.5) lands on one value for every
case; a stage-2 network trained on such images reads "brighter than this patient's kidney"
directly. The training code is unchanged: it is handed a cache of shifted images (the shift
from each case's out-of-fold y1, as stage 2's training y1 are), and the study shifts the
image by the shipped stage 1's y1 before that network sees it.

    # 1. a cache of shifted images beside the prepared cases' labels and training masks
    python scripts/kidney_reference_study.py shift --cache work_data/run_cpu_bf16/cache \\
        --y1 work_data/run_ctx0/oof_y1 work_data/run_ctx0/val_y1 --cases $(ls work_data/data_ctx) \\
        --out-cache work_data/kref/cache --out-run work_data/run_kref
    # 2. round 13's newest network trained 2000 steps more on them (as run_ctx0 and run_cor were)
    kits-seg train --data work_data/data_ctx --cache work_data/kref/cache --out work_data/run_kref \\
        --preset cpu --device cpu --stage2-steps 2000 --val-cases case_00120 ... case_00149 \\
        --init-from work_data/m13_member2.kseg --keep-stage1 --set stage2_tumor_weight=3 \\
        --set steps_per_epoch=1000 --set augment_noise_hu=30 --set tumor_sampling=lesion \\
        --set tumor_fraction=0.9 --set stage2_hard_fraction=0.1
    # 3. the shipped model with that network mixed in, end to end
    python scripts/kidney_reference_study.py score --network work_data/run_kref/model.kseg \\
        --cases work_data/phantoms_s24 --out work_data/kref_s24 [--mix 1,1,1,0 ...] [--realct]

``score`` writes ``OUT/scores_MIX.csv`` (the ``kits-seg evaluate`` columns); each ``--mix`` gives
the shipped model's axial members' weights, then the new network's.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np

# Where every case's kidney median lands, in normalized units (100 HU in the [-200, 400] window:
# about the median over the training cases' stage-1 kidney, so the mean shift is small).
KIDNEY_LEVEL = 0.0
DEFAULT_MIXES = ("1,1,1,0", "1,1,1,1", "1,1,1,1.5", "0,0,0,1")


def kidney_shift(image: np.ndarray, y1: np.ndarray) -> float:
    """What to add to ``image`` so that its median where ``y1 >= 0.5`` becomes KIDNEY_LEVEL (0 where
    stage 1 sees no kidney)."""
    kidney = np.asarray(y1) >= 0.5
    if not kidney.any():
        return 0.0
    return KIDNEY_LEVEL - float(np.median(np.asarray(image, np.float32)[kidney]))


def shift(args: argparse.Namespace) -> int:
    from kitseg.training.data import save_npy

    y1_paths = {p.stem: p for folder in args.y1 for p in folder.glob("*.npy")}
    args.out_cache.mkdir(parents=True, exist_ok=True)
    shifts = {}
    for meta_path in sorted(args.cache.glob("*.json")):
        meta = json.loads(meta_path.read_text())
        name = meta["name"]
        if name not in args.cases:
            continue
        if name not in y1_paths:
            print(f"{name}: no y1 in {', '.join(map(str, args.y1))}", file=sys.stderr)
            return 1
        stem = meta_path.with_suffix("")
        out_meta = args.out_cache / meta_path.name
        image = np.load(args.cache / f"{stem.name}.image.npy", mmap_mode="r")
        shifts[name] = kidney_shift(image, np.load(y1_paths[name], mmap_mode="r"))
        if out_meta.is_file():
            continue
        save_npy(args.out_cache / f"{stem.name}.image.npy", (image.astype(np.float32) + shifts[name]).astype(np.float16))
        for part in args.cache.glob(f"{stem.name}.*.npy"):  # labels and training masks: unchanged, linked
            target = args.out_cache / part.name
            if part.name.endswith(".image.npy") or target.exists():
                continue
            os.link(part, target)
        shutil.copy2(meta_path, out_meta)  # last: marks the case complete
    for folder in args.y1:  # y1 unchanged: linked, with the records of where each came from
        out = args.out_run / folder.name
        out.mkdir(parents=True, exist_ok=True)
        for path in folder.iterdir():
            if not (out / path.name).exists():
                os.link(path, out / path.name)
    values = np.array(list(shifts.values()))
    print(f"{len(shifts)} cases shifted into {args.out_cache}: shift mean {values.mean():+.3f}, "
          f"range [{values.min():+.3f}, {values.max():+.3f}] (normalized units; 0.1 = 30 HU)")
    return 0


def score(args: argparse.Namespace) -> int:
    # sibling scripts: python puts scripts/ on the path
    from stage2_member_weights_study import member_probabilities, mix_labelers, mix_name, score_labelings

    from kitseg.pipeline import Segmenter

    segmenter = Segmenter.from_file(args.weights, device="cpu")
    referenced = Segmenter.from_file(args.network, device="cpu")
    n = len(getattr(segmenter.stage2_net, "members", [None])) + 1
    if any(len(mix) != n for mix in args.mix):
        raise SystemExit(f"every --mix needs {n} numbers: the {n - 1} axial members', then the new network's")

    def member_probs(volume):
        prepared, y1, mask, probs = member_probabilities(segmenter, volume)
        shifted = prepared.image.astype(np.float32) + kidney_shift(prepared.image, y1)
        new = referenced.stage2(dataclasses.replace(prepared, image=shifted), y1, mask).astype(np.float32)
        return prepared, np.concatenate([probs, new[None]])

    labelings = {mix_name(mix): labels for mix, labels in mix_labelers(segmenter, args.mix).items()}
    score_labelings(args.cases, member_probs, labelings, args.out, args.realct)
    return 0


def main() -> int:
    from stage2_member_weights_study import add_mixed_score_command  # a sibling: scripts/ is on the path

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    p = commands.add_parser("shift", help="a cache of images shifted to their kidney's level")
    p.add_argument("--cache", type=Path, required=True, help="a training cache (kits-seg train --cache)")
    p.add_argument("--y1", type=Path, nargs="+", required=True, help="oof_y1/ and val_y1/ folders of a run")
    p.add_argument("--cases", nargs="+", required=True, help="case names to shift")
    p.add_argument("--out-cache", type=Path, required=True)
    p.add_argument("--out-run", type=Path, required=True, help="the new run folder (gets oof_y1/, val_y1/)")
    add_mixed_score_command(
        commands, help="the shipped model with the kidney-referenced network mixed in",
        weights_help="the model (default: the shipped one)",
        network="network", network_help="a model whose stage 2 trained on shifted images", mixes=DEFAULT_MIXES)
    args = parser.parse_args()
    if args.command == "shift":
        args.cases = set(args.cases)
        return shift(args)
    return score(args)


if __name__ == "__main__":
    sys.exit(main())
