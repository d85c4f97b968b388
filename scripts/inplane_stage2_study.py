"""Does stage 2 find small tumors better on a 1 mm in-plane grid than on the cpu preset's 2 mm? A study.

Even memorized, a tumor under 10 mL is mostly missed at 2 x 2 x 5 mm (docs/model_studies.md, "Limits, as recorded round by round":
"Stage 2 underfits"), and four times the width did not help: the grid is the untested suspect.
This study keeps the rest of ``run_ctx0`` (round 13's newest network trained 2000 steps more on
``data_ctx``): the same start, data, recipe and steps, and the shipped stage 1 at 2 mm, except
two things the finer grid brings along: crops of 160 pixels (16 cm against 22) and a training
mask of 20 mm along z too (``run_ctx0``'s 10 voxels reached 50 mm). Stage 2 works on the finer
in-plane grid; its y1 is stage 1's 2 mm map resampled onto that
grid (linear, in-plane only: the slices are the same 5 mm ones), in training (out-of-fold y1) as
at inference, and its mask is that y1 dilated by the same 20 mm. The training code is unchanged:
it is handed the finer cases, the y1 resampled onto them, and a copy of the starting model that
declares the finer grid (convolutions do not depend on the grid; their reach in mm halves).

    # 1. the cases on the 1 mm grid, the 2 mm run's y1 brought onto it, the starting model's copy
    python scripts/inplane_stage2_study.py prepare --data work_data/data_ctx --from-run work_data/run_ctx0 \\
        --init work_data/m13_member2.kseg --spacing 1.0 --cache work_data/mm1/cache \\
        --out-run work_data/run_mm1 --out-init work_data/mm1/init_1mm.kseg
    # 2. 2000 steps as run_ctx0's, crops of 160 pixels (16 cm; run_ctx0's 112 at 2 mm saw 22 cm),
    #    training masks dilated by 20 mm as at inference (run_ctx0's by 10 voxels: 20 mm in-plane, 50 mm along z)
    kits-seg train --data work_data/data_ctx --cache work_data/mm1/cache --out work_data/run_mm1 \\
        --preset cpu --device cpu --stage2-steps 2000 --val-cases case_00120 ... case_00149 \\
        --init-from work_data/mm1/init_1mm.kseg --keep-stage1 \\
        --set 'preprocessing={"slice_spacing_mm":5.0,"inplane_spacing_mm":1.0,"context_slices":1}' \\
        --set 'mask={"threshold":0.5,"radius":20,"radius_unit":"mm"}' \\
        --set crop_stage2=160 --set stage2_tumor_weight=3 --set steps_per_epoch=1000 \\
        --set augment_noise_hu=30 --set tumor_sampling=lesion --set tumor_fraction=0.9 \\
        --set stage2_hard_fraction=0.1
    #    trained further (run_mm2): the same with --init-from work_data/run_mm1/model.kseg and
    #    --out work_data/run_mm2, run_mm1's oof_y1/ and val_y1/ linked in first (cp -al)
    # 3. that network behind the shipped stage 1, alone and mixed with the shipped members, end to end
    python scripts/inplane_stage2_study.py score --network work_data/run_mm1/model.kseg \\
        --cases work_data/phantoms_s24 --out work_data/mm1_s24 [--mix 0,0,0,1 1,1,1,1 ...] [--realct]

``score`` writes ``OUT/scores_MIX.csv`` (the ``kits-seg evaluate`` columns; ``--mix 0,0,0,1`` gives
``scores_0-0-0-1.csv``); each ``--mix`` gives the shipped members' weights, then the new network's,
and the shipped members always run (their mix is free once they have). The trained model file
declares its stage 1 on the fine grid too: use it through ``score``, not ``kits-seg predict``,
which would run that 2 mm stage 1 on the 1 mm grid. The shipped members' probabilities are
brought onto the fine grid and mixed there. Compare the new network alone with the 2 mm control
alone (``stage2_member_weights_study.py --weights work_data/m5_study.kseg --mix 0,0,0,1,0``) by
``scripts/compare_scores.py``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import numpy as np

# The new network alone; the shipped ensemble through the fine grid (a check of the way back: it
# should score as the shipped model does); the new network as a fourth member.
DEFAULT_MIXES = ("0,0,0,1", "1,1,1,0", "1,1,1,1")


def resample_inplane(y1: np.ndarray, shape: tuple[int, int, int]) -> np.ndarray:
    """A (Z, Y, X) stage-grid map resampled in-plane onto another stage grid of the same CT (same
    slices, same world extent: both grids span the CT, ``StageGrid``), linearly."""
    from kitseg.preprocess import resampling_matrix

    if y1.shape[0] != shape[0]:
        raise ValueError(f"the grids' slices differ: {y1.shape} and {shape}")
    wy = resampling_matrix(y1.shape[1], shape[1])
    wx = resampling_matrix(y1.shape[2], shape[2])
    return np.clip(np.matmul(np.matmul(wy, np.asarray(y1, np.float32)), wx.T), 0.0, 1.0)


def prepare(args: argparse.Namespace) -> int:
    from kitseg.checkpoint import load_bundle, module_weights_sha256, save_bundle
    from kitseg.training.data import open_cached_case, prepare_cases, save_npy
    from kitseg.training.loop import _write_json_atomic

    # The coarse run and starting model are inputs: never written over.
    if args.out_run.resolve() == args.from_run.resolve() or args.out_init.resolve() == args.init.resolve():
        raise SystemExit("--out-run and --out-init must differ from --from-run and --init: those are read, not written")
    bundle = load_bundle(args.init)
    fine = dataclasses.replace(bundle.preprocessing, inplane_spacing_mm=args.spacing)
    stems = prepare_cases(args.data, fine, args.cache, progress=False, workers=args.workers)
    stage1_sha = module_weights_sha256(bundle.stage1.module)
    coarse_val = _read_json(args.from_run / "val_y1" / "sources.json")
    covered = set()
    for folder in ("oof_y1", "val_y1"):
        source_dir, out_dir = args.from_run / folder, args.out_run / folder
        out_dir.mkdir(parents=True, exist_ok=True)
        sources = {}
        for stem in stems:
            case = open_cached_case(stem)
            coarse = source_dir / f"{case.name}.npy"
            if not coarse.is_file():
                continue
            if folder == "val_y1":
                # Kept by the training run only if made by the stage 1 it keeps; the coarse record
                # says which (and on which kind of device, as the run checks).
                record = coarse_val.get(case.name)
                if not isinstance(record, dict) or record.get("stage1_sha256") != stage1_sha:
                    raise SystemExit(f"{coarse}: not recorded as made by {args.init}'s stage 1 "
                                     f"({source_dir / 'sources.json'}); the fine run would not keep it")
            out = out_dir / coarse.name
            # an earlier prepare's y1 is kept only if it is on this grid (another --spacing is not)
            if not out.is_file() or np.load(out, mmap_mode="r").shape != case.image.shape:
                y1 = resample_inplane(np.load(coarse), case.image.shape)
                # as the training code writes them: out-of-fold y1 in float16, validation y1 in float32
                save_npy(out, y1.astype(np.float16 if folder == "oof_y1" else np.float32))
            # The records the training code checks: which prepared case (and stage 1) a y1 is of.
            sources[case.name] = stem.name if folder == "oof_y1" else {
                "stage1_sha256": stage1_sha, "case": stem.name, "device": coarse_val[case.name].get("device", "cpu")}
        _write_json_atomic(out_dir / "sources.json", sources)
        covered |= set(sources)
        print(f"{out_dir}: {len(sources)} y1 resampled onto the {args.spacing} mm grid")
    missing = sorted({open_cached_case(stem).name for stem in stems} - covered)
    if missing:
        # The training run would train out-of-fold stage-1 models on the fine grid for these (hours
        # on a CPU) and mix their y1 with the resampled ones: better to stop here.
        raise SystemExit(f"{args.from_run}: no y1 for {len(missing)} case(s) ({', '.join(missing[:5])}"
                         f"{', ...' if len(missing) > 5 else ''}) in oof_y1/ or val_y1/")
    save_bundle(dataclasses.replace(bundle, preprocessing=fine), args.out_init)
    print(f"{args.out_init}: {args.init}'s networks, declared on the {args.spacing} mm grid")
    return 0


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except ValueError as exc:
        raise SystemExit(f"{path}: not readable as JSON ({exc})") from exc
    return data if isinstance(data, dict) else {}


def score(args: argparse.Namespace) -> int:
    # sibling scripts: python puts scripts/ on the path
    from stage2_member_weights_study import member_probabilities, mix_labelers, mix_name, score_labelings

    from kitseg.pipeline import Segmenter

    shipped = Segmenter.from_file(args.weights, device="cpu")
    fine = Segmenter.from_file(args.network, device="cpu")
    n = len(getattr(shipped.stage2_net, "members", [None])) + 1
    if any(len(mix) != n for mix in args.mix):
        raise SystemExit(f"every --mix needs {n} numbers: the {n - 1} shipped members', then the new network's")

    def member_probs(volume):
        coarse, y1, _, probs = member_probabilities(shipped, volume)
        prepared = fine.prepare(volume)
        shape = prepared.image.shape
        y1 = resample_inplane(y1, shape)
        new = fine.stage2(prepared, y1, fine.mask(prepared, y1)).astype(np.float32)
        # The shipped members' probabilities brought onto the fine grid as y1 is, and mixed there.
        members = np.stack([[resample_inplane(p, shape) for p in member] for member in probs])
        return prepared, np.concatenate([members, new[None]])

    # Labelled on the fine grid's way back to the CT (three-slice rule and clean-up as kits-seg predict).
    labelings = {mix_name(mix): labels for mix, labels in mix_labelers(fine, args.mix).items()}
    score_labelings(args.cases, member_probs, labelings, args.out, args.realct)
    return 0


def main() -> int:
    from stage2_member_weights_study import add_mixed_score_command  # a sibling: scripts/ is on the path

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    p = commands.add_parser("prepare", help="the cases, y1 and starting model on a finer in-plane grid")
    p.add_argument("--data", type=Path, required=True, help="a KiTS19-layout training folder")
    p.add_argument("--from-run", type=Path, required=True, help="a run on the coarse grid: its oof_y1/, val_y1/")
    p.add_argument("--init", type=Path, required=True, help="the model the fine-tuning starts from")
    p.add_argument("--spacing", type=float, default=1.0, help="the finer in-plane spacing, mm")
    p.add_argument("--cache", type=Path, required=True, help="where the cases on the finer grid go")
    p.add_argument("--out-run", type=Path, required=True, help="the new run folder (gets oof_y1/, val_y1/)")
    p.add_argument("--out-init", type=Path, required=True, help="the starting model's copy on the finer grid")
    p.add_argument("--workers", type=int, default=2)
    add_mixed_score_command(
        commands, help="a stage 2 on the finer grid behind the shipped stage 1",
        weights_help="stage 1's model (default: the shipped one)",
        network="network", network_help="a model whose stage 2 trained on the finer grid", mixes=DEFAULT_MIXES,
        mix_help="the shipped members' weights, then the new network's")
    args = parser.parse_args()
    return prepare(args) if args.command == "prepare" else score(args)


if __name__ == "__main__":
    sys.exit(main())
