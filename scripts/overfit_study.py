"""Can stage 2 learn the small tumors it is shown when nothing varies? A study.

Trained further on 12 cases only, stage 2 fitted their tumors under 10 mL only in part (0.29;
docs/model_studies.md, "Limits, as recorded round by round": "Stage 2 underfits"), with the
recipe's augmentation on: flips, rotations, scaling, intensity jitter and noise. Without any of
it, each training image is seen exactly as it is. If stage 2 then labels those tumors nearly
whole, the network and the 2 x 2 x 5 mm grid can represent them, and what keeps it from them is
what varies (noise, contrast, shape). If it still cannot, the limit is nearer the network, its
input, its grid or its training (loss, steps, schedule).

    # 1. a data folder of a few phantoms whose masks the model never trained on (links), and
    #    their y1 from the model's own stage 1: what stage 2 learns from (no fold models needed)
    python scripts/overfit_study.py prepare --phantoms work_data/phantoms_s24 \\
        --cases case_00120 case_00121 ... --val-cases case_00122 case_00126 \\
        --data work_data/overfit_data --run work_data/run_overfit_noaug
    # 2. stage 2 trained on those cases, the shipped stage 1 kept, round 12's settings; stage 2
    #    starts from the shipped ensemble's first member, round 6's network; one validation at the
    #    end, so the last step is kept. AUG is one of (each run in its own --run, prepared as in 1):
    #      --set augment=false           no augmentation (run_overfit_noaug)
    #      --set augment_noise_hu=0      flips, rotations, scaling, intensity jitter; no noise (run_overfit_nonoise)
    #      --set augment_noise_hu=30     the recipe's: all of it, noise up to 30 HU (run_overfit_aug)
    kits-seg train --data work_data/overfit_data --out work_data/run_overfit_noaug --preset cpu --device cpu \\
        --stage2-steps 1500 --val-cases case_00122 case_00126 \\
        --init-from src/kitseg/weights/default.kseg --keep-stage1 AUG \\
        --set steps_per_epoch=1500 --set stage2_tumor_weight=3 --set tumor_sampling=lesion --set tumor_fraction=0.9
    # 3. the training cases scored on the stage grid, by tumor size
    python scripts/fit_gap_study.py --run work_data/run_overfit_noaug --data work_data/overfit_data

The starting model must not have trained on these masks: ``prepare`` refuses a case whose mask
(``case_XXXXX``, twins such as ``case_XXXXX_radial`` included) its provenance lists among any
network's training cases, and says when a network started from another file whose cases are not
recorded. Its stage 1's y1 of them is then what a stage 1 gives a new case, as the out-of-fold y1
of a normal run is. The y1 are made with the preset's grid and mask: give ``kits-seg train`` no
``--set`` of ``preprocessing`` or ``mask``. Should the run train fold models all the same
(a ``RUN/fold*/`` folder appears: the phantom files changed since), the premise is gone: prepare
again.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path
from typing import Any


def trained_on(provenance: Any) -> tuple[set[str], set[str]]:
    """The masks every network of a model file (and those it was combined from) trained on, and
    the files its networks started from (``--init-from``), whose own cases the file does not hold."""
    from kitseg.training.data import mask_name

    masks: set[str] = set()
    started_from: set[str] = set()
    children = provenance if isinstance(provenance, list) else ()  # a list: an ensemble's members
    if isinstance(provenance, dict):
        if isinstance(provenance.get("train_cases"), list):
            masks.update(mask_name(str(v)) for v in provenance["train_cases"])
        if isinstance(provenance.get("init_from"), dict) and "file" in provenance["init_from"]:
            started_from.add(str(provenance["init_from"]["file"]))
        children = provenance.values()
    for child in children:
        more, files = trained_on(child)
        masks |= more
        started_from |= files
    return masks, started_from


def prepare(args: argparse.Namespace) -> int:
    from kitseg.checkpoint import load_bundle
    from kitseg.training.config import preset
    import torch

    from kitseg.training.data import cache_folder, load_cases, mask_name, save_npy
    from kitseg.training.loop import OOF_SOURCES, _write_json_atomic, predict_y1
    from kitseg.weights import default_weights_path

    weights = args.weights or default_weights_path()
    bundle = load_bundle(weights)
    names = args.cases + args.val_cases
    masks, started_from = trained_on(bundle.provenance)
    if not masks:
        raise SystemExit(f"{weights}: its provenance records no training cases; cannot tell which masks it saw")
    if bundle.stage1.architecture == "ensemble":
        raise SystemExit(f"{weights}: stage 1 is an ensemble; kits-seg train --keep-stage1 keeps its first member only")
    seen = sorted(n for n in names if mask_name(n) in masks)
    if seen:
        raise SystemExit(f"{weights} trained on the masks of {', '.join(seen)}: its y1 of them would be better than "
                         "on a new case; choose masks it never saw")
    if started_from:
        print(f"note: {weights}'s networks started from {', '.join(sorted(started_from))}, whose training cases "
              "it does not record: make sure those never saw these masks either")
    # The run's own preprocessing (its preset's) and cache, so that kits-seg train reuses both.
    config = preset(args.preset)
    if config.preprocessing != bundle.preprocessing:
        raise SystemExit(f"{weights}: made on another grid than the {args.preset} preset ({bundle.preprocessing})")
    overlap = set(args.cases) & set(args.val_cases)
    if overlap:
        raise SystemExit(f"{', '.join(sorted(overlap))}: both a training and a validation case")
    if len({mask_name(n) for n in args.cases}) < config.oof_folds:
        raise SystemExit(f"--cases: kits-seg train needs the training images of at least {config.oof_folds} masks")
    if args.run.exists() and (not args.run.is_dir() or any(args.run.iterdir())):
        raise SystemExit(f"{args.run}: not an empty folder; prepare a new run folder")
    data, run = args.data.resolve(), args.run.resolve()
    if data == run or data in run.parents or run in data.parents:
        raise SystemExit("--data and --run must be separate folders")
    if args.data.exists():
        if not args.data.is_dir():
            raise SystemExit(f"{args.data}: not a folder")
        extra = sorted(p.name for p in args.data.iterdir() if p.name not in set(names))
        if extra:
            raise SystemExit(f"{args.data}: holds other cases too ({', '.join(extra[:5])}); use a new --data folder")
    sources = {}
    for name in names:
        source, link = (args.phantoms / name).resolve(), args.data / name
        if not (source / "imaging.nii.gz").is_file() or not (source / "segmentation.nii.gz").is_file():
            raise SystemExit(f"{source}: not a KiTS19 case folder with imaging.nii.gz and segmentation.nii.gz")
        if (link.exists() or link.is_symlink()) and link.resolve() != source:
            raise SystemExit(f"{link}: is not a link to {source}; use a new --data folder")
        sources[name] = (source, link)
    # Checked all before the first link is made.
    args.data.mkdir(parents=True, exist_ok=True)
    for source, link in sources.values():
        if not link.exists():
            link.symlink_to(source, target_is_directory=True)

    # The run's cache, so that kits-seg train reuses the prepared cases.
    cases = {c.name: c for c in load_cases(args.data, config.preprocessing, cache_folder(args.run, None),
                                           progress=False, workers=args.workers)}
    oof_dir = args.run / "oof_y1"
    oof_dir.mkdir(parents=True, exist_ok=True)
    stage1 = bundle.stage1.module.eval()
    y1_sources = {}
    for name in args.cases:
        case = cases[name]
        y1 = predict_y1(stage1, [case], config, device=torch.device("cpu"), mask_slices_only=True)[name]
        save_npy(oof_dir / f"{name}.npy", y1.astype("float16"))  # as the training code writes them
        y1_sources[name] = case.cache_stem.name
        _write_json_atomic(oof_dir / OOF_SOURCES, y1_sources)  # in step with the files, as the training code
    _write_json_atomic(args.run / "overfit_study.json", {
        "weights": str(weights), "phantoms": str(args.phantoms), "preset": args.preset,
        "mask": dataclasses.asdict(config.mask), "cases": args.cases, "val_cases": args.val_cases})
    print(f"{oof_dir}: y1 of {len(y1_sources)} training case(s) from {weights}'s stage 1")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    p = commands.add_parser("prepare", help="the data folder and the training cases' y1 for a new run")
    p.add_argument("--phantoms", type=Path, required=True, help="a KiTS19-layout folder of phantoms")
    p.add_argument("--cases", nargs="+", required=True, help="the training cases")
    p.add_argument("--val-cases", nargs="+", required=True, help="validation cases (kits-seg train needs some)")
    p.add_argument("--data", type=Path, required=True, help="the data folder to make (links to the cases)")
    p.add_argument("--run", type=Path, required=True, help="the new run folder (gets cache/ and oof_y1/)")
    p.add_argument("--weights", type=Path, default=None, help="the starting model (default: the shipped one)")
    p.add_argument("--preset", default="cpu", help="the preset kits-seg train will be given (its grid)")
    p.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    return prepare(args)


if __name__ == "__main__":
    sys.exit(main())
