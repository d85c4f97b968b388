"""Does a stage 2 that reads coronal slices help the axial ones? A study, outside the engine.

A tumor at a kidney's pole that fills the kidney's outline is, in one axial slice, a round,
even blob, as the pole itself is (docs/model_studies.md, "Limits, as recorded round by round"); a coronal slice shows it on top of
the kidney. This study trains one stage-2 network on coronal slices of the stage grid with the
unchanged training code, by handing it the training cases turned on their side, and scores the
shipped axial stage 2 with that network's probabilities mixed in.

    # 1. the prepared cases, their training masks and their y1, turned: (Z, Y, X) -> (Y, Z, X)
    python scripts/coronal_stage2_study.py turn --cache work_data/run_cpu_bf16/cache \\
        --y1 work_data/run_ctx0/oof_y1 work_data/run_ctx0/val_y1 \\
        --cases $(ls work_data/data_ctx) --out-cache work_data/cor/cache --out-run work_data/run_cor
    # 2. round 13's newest network trained 2000 steps more on them, with run_ctx0's recipe (data_ctx:
    #    the phantoms_v3 draws and a seed-31 draw of each training mask)
    kits-seg train --data work_data/data_ctx --cache work_data/cor/cache --out work_data/run_cor \\
        --preset cpu --device cpu --stage2-steps 2000 --val-cases case_00120 ... case_00149 \\
        --init-from work_data/m13_member2.kseg --keep-stage1 --set stage2_tumor_weight=3 \\
        --set steps_per_epoch=1000 --set augment_noise_hu=30 --set tumor_sampling=lesion \\
        --set tumor_fraction=0.9 --set stage2_hard_fraction=0.1
    #    then 4000 steps more: the same with --out work_data/run_cor2 --stage2-steps 4000
    #    --init-from work_data/run_cor/model.kseg (run_cor's oof_y1/ and val_y1/ linked into run_cor2/)
    # 3. the shipped model with the coronal network mixed in, end to end, on fresh draws
    python scripts/coronal_stage2_study.py score --coronal work_data/run_cor/model.kseg \\
        --cases work_data/phantoms_s24 --out work_data/cor_s24 [--mix 1,1,1,0 1,1,1,1 ...] [--realct]

The training code never sees an axis name: a turned case is a volume whose first axis is the
one it slices along, with its spacing turned alike, so the training mask (a ball in mm) and the
y1 copied in line up. ``score`` runs the shipped model's stage 1 and stage 2 as ``kits-seg
predict`` does, each of its stage-2 members alone, and the coronal network on the same y1 and
mask turned; each weighting (``--mix``) averages their class probabilities, and the labels, the
three-slice rule and the clean-up follow as in ``kits-seg predict``. Writes ``OUT/scores_MIX.csv``
(the ``kits-seg evaluate`` columns, for ``scripts/compare_scores.py``).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import shutil
import sys
from pathlib import Path

import numpy as np

# Weightings scored by default (three axial members, as the shipped model, then the coronal network):
# the shipped model; the coronal network at a quarter, a third, a half; in place of each axial member.
DEFAULT_MIXES = ("1,1,1,0", "1,1,1,1", "1,1,1,1.5", "1,1,1,3", "0,1,1,1", "1,0,1,1", "1,1,0,1", "0,0,0,1")
TURN = (1, 0, 2)  # (Z, Y, X) -> (Y, Z, X): slices along the anterior-posterior axis are coronal


def shares_of_axial(axial_mix: list[float]) -> np.ndarray:
    """The model's own weighting of its axial members, the coronal network out."""
    return np.asarray(list(axial_mix) + [0.0], np.float32)


def turned(array: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(np.transpose(array, TURN))


def turn(args: argparse.Namespace) -> int:
    from kitseg.training.data import save_npy

    wanted = set(args.cases)
    args.out_cache.mkdir(parents=True, exist_ok=True)
    done = 0
    for meta_path in sorted(args.cache.glob("*.json")):
        meta = json.loads(meta_path.read_text())
        if meta["name"] not in wanted:
            continue
        stem = meta_path.with_suffix("")
        out_meta = args.out_cache / meta_path.name
        if not out_meta.is_file():
            for part in sorted(args.cache.glob(f"{stem.name}.*.npy")):  # image, labels, training masks
                save_npy(args.out_cache / part.name, turned(np.load(part, mmap_mode="r")))
            spacing = [meta["spacing"][i] for i in TURN]
            shape = [meta["shape"][i] for i in TURN]
            out_meta.write_text(json.dumps({**meta, "spacing": spacing, "shape": shape}))  # last: marks it complete
        done += 1
    missing = wanted - {json.loads(p.read_text())["name"] for p in args.out_cache.glob("*.json")}
    if missing:
        print(f"not in {args.cache}: {', '.join(sorted(missing))}", file=sys.stderr)
        return 1
    for folder in args.y1:
        out = args.out_run / folder.name
        out.mkdir(parents=True, exist_ok=True)
        for path in sorted(folder.glob("*.npy")):
            if path.stem in wanted and not (out / path.name).is_file():
                save_npy(out / path.name, turned(np.load(path, mmap_mode="r")))
        # The records say which prepared case and stage 1 each y1 came from; turning changes neither.
        shutil.copy2(folder / "sources.json", out / "sources.json")
    print(f"{done} cases turned into {args.out_cache}; y1 into {args.out_run}")
    return 0


def score(args: argparse.Namespace) -> int:
    # sibling scripts: python puts scripts/ on the path
    from stage2_member_weights_study import member_probabilities, mix_labelers, mix_name, score_labelings

    from kitseg.pipeline import Segmenter, tumor_lead

    segmenter = Segmenter.from_file(args.weights, device="cpu")
    coronal = Segmenter.from_file(args.network, device="cpu")
    ensemble = segmenter.stage2_net
    axial_members = list(ensemble.members) if hasattr(ensemble, "members") else [ensemble]
    n = len(axial_members) + 1
    if any(len(mix) != n for mix in args.mix):
        raise SystemExit(f"every --mix needs {n} numbers: the {n - 1} axial members', then the coronal network's")

    def member_probs(volume):
        """(members + 1, 3, Z, Y, X): each axial member's class probabilities, then the coronal network's."""
        prepared, y1, mask, probs = member_probabilities(segmenter, volume)
        side = dataclasses.replace(prepared, image=turned(prepared.image))
        side_probs = coronal.stage2(side, turned(y1), turned(mask)).astype(np.float32)
        return prepared, np.concatenate([probs, np.transpose(side_probs, (0, 2, 1, 3))[None]])  # back to (Z, Y, X)

    axial_only = shares_of_axial(getattr(ensemble, "mix", [1.0]))

    def labels_by_lead(prepared, probs, rule):
        """The axial members' foreground; kidney or tumor by a rule on both views' tumor leads."""
        axial = np.tensordot(axial_only, probs, axes=1)
        weight = segmenter.tumor_slice_smoothing
        lead_axial, lead_coronal = tumor_lead(axial, weight), tumor_lead(probs[-1], weight)
        if rule == "either":
            lead = np.maximum(lead_axial, lead_coronal)
        else:  # "lead-W": the coronal lead's part W
            share = float(rule.split("-")[1])
            lead = (1.0 - share) * lead_axial + share * lead_coronal
        return segmenter.labels_on_source(prepared, axial, lead=lead)

    labelings = {mix_name(mix): labels for mix, labels in mix_labelers(segmenter, args.mix).items()}
    labelings.update({rule: functools.partial(labels_by_lead, rule=rule) for rule in args.lead_rules})
    score_labelings(args.cases, member_probs, labelings, args.out, args.realct)
    return 0


def main() -> int:
    from stage2_member_weights_study import add_mixed_score_command  # a sibling: scripts/ is on the path

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    p = commands.add_parser("turn", help="prepared cases and their y1, turned to coronal slicing")
    p.add_argument("--cache", type=Path, required=True, help="a training cache (kits-seg train --cache)")
    p.add_argument("--y1", type=Path, nargs="+", required=True, help="oof_y1/ and val_y1/ folders of a run")
    p.add_argument("--cases", nargs="+", required=True, help="case names to turn")
    p.add_argument("--out-cache", type=Path, required=True)
    p.add_argument("--out-run", type=Path, required=True, help="the new run folder (gets oof_y1/, val_y1/)")
    p = add_mixed_score_command(
        commands, help="the shipped model with a coronal stage 2 mixed in",
        weights_help="the axial model (default: the shipped one)",
        network="coronal", network_help="a model whose stage 2 trained on turned cases", mixes=DEFAULT_MIXES,
        mix_help="weightings, one number per axial member of the model's stage 2, then the coronal "
                 "network's (default: %(default)s)")
    p.add_argument("--lead-rules", nargs="*", default=["either", "lead-0.25", "lead-0.5"],
                   help="foreground from the axial members, kidney or tumor from both views' three-slice tumor "
                        "leads: 'either' (the larger), 'lead-W' (the coronal lead's part W)")
    args = parser.parse_args()
    return turn(args) if args.command == "turn" else score(args)


if __name__ == "__main__":
    sys.exit(main())
