"""Make one model file from stage 1 of one `.kseg` and stage 2 of another (or of several).

    python scripts/combine_stages.py --stage1 RUN/stage1/best.kseg --stage2 OTHER.kseg --out M.kseg
    python scripts/combine_stages.py --stage1 A.kseg --stage2 A.kseg B.kseg --out M.kseg

With several ``--stage2`` networks the new stage 2 is their ensemble (``kitseg.networks.StageEnsemble``:
the mean of their class probabilities, each network weighing the same unless ``--stage2-mix``
gives one share per network, e.g. ``--stage2-mix 2 1 1``). A file whose stage 2 is an ensemble
gives all its members, or only one with ``FILE@K`` (K counts from 0):

    python scripts/combine_stages.py --stage1 M.kseg --stage2 M.kseg C.kseg --out M_plus_C.kseg
    python scripts/combine_stages.py --stage1 M.kseg --stage2 M.kseg@1 --out M_member1.kseg

An ensemble whose members weigh differently is taken whole only with ``--stage2-mix``, so that
its shares are never dropped unnoticed.

Used when a fine-tuning round improves stage 1 (where a false kidney piece starts: stage 2 only
looks inside stage 1's mask) before its stage 2 is done or better. Both files must share the
preprocessing, label map and mask settings, or the networks would read another image than the
one they were trained on; the one allowed difference is how many neighbouring slices stage 2
sees (``stage2_context_slices``): a stage 2 that sees fewer is widened to exactly the same
network on the wider input, so it can join an ensemble with one that sees more. The new file's
provenance names both sources, with their weight SHA-256s and the part of their own provenance
that tells how the stage taken was made, so `kits-seg info` tells where each stage came from.

``--mask-radius-mm R`` gives the new file stage 2's mask as a ball of R mm (the threshold kept),
whatever radius its sources were trained with; their radii may then differ. Stage 2 reads the
image inside the mask, so measure first (``stage2_compare_study.py --mask-radius-mm R``).
"""

from __future__ import annotations

import argparse
import sys
from datetime import date
from pathlib import Path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stage1", type=Path, required=True, help="model file whose stage 1 is taken")
    parser.add_argument("--stage2", nargs="+", required=True,
                        help="model file(s) whose stage 2 is taken (FILE@K: member K of its ensemble); "
                             "several networks make an ensemble")
    parser.add_argument("--stage2-mix", type=float, nargs="+", default=None, metavar="SHARE",
                        help="with several stage-2 networks: how much each counts in the mean, one number "
                             ">= 0 per network (default: all the same)")
    parser.add_argument("--out", type=Path, required=True, help="new model file (not overwritten)")
    parser.add_argument("--mask-radius-mm", type=float, default=None, metavar="R",
                        help="the new file's stage-2 mask: a ball of R mm (the sources' radii may differ)")
    args = parser.parse_args()

    from dataclasses import replace

    from kitseg.checkpoint import StageModel, load_bundle, read_metadata, save_bundle, stage_lineage
    from kitseg.config import MaskConfig
    from kitseg.networks import build_network
    from kitseg.networks.ensemble import normalised_mix
    from kitseg.pipeline import widen_stage2

    sources = [_split_member(text) for text in args.stage2]
    first = load_bundle(args.stage1)
    seconds = [load_bundle(path) for path, _ in sources]
    stages = [(args.stage1, "stage 1", first.stage1)] + [(p, "stage 2", b.stage2) for (p, _), b in zip(sources, seconds)]
    for path, name, stage in stages:
        if stage is None:
            raise SystemExit(f"{path}: has no {name}")
    # Stage 2 may see neighbouring slices (stage2_context_slices); any other difference would make
    # a network read another image than the one it was trained on.
    context = max(b.preprocessing.stage2_context_slices for b in seconds)
    preprocessing = replace(first.preprocessing, stage2_context_slices=context)
    for (path, _), second in zip(sources, seconds):
        if not second.preprocessing.matches_except_stage2_context(preprocessing):
            raise SystemExit(f"{args.stage1} and {path} differ in preprocessing: their stages cannot be combined")
        if first.label_map != second.label_map:
            raise SystemExit(f"{args.stage1} and {path} differ in label_map: their stages cannot be combined")
        same_mask = first.mask.threshold == second.mask.threshold if args.mask_radius_mm is not None else first.mask == second.mask
        if not same_mask:
            raise SystemExit(f"{args.stage1} and {path} differ in mask: their stages cannot be combined "
                             "(--mask-radius-mm sets one mask for the joined file)")

    def source(path: Path, key: str, member: int | None = None) -> dict:
        meta = read_metadata(path)
        record = {"file": path.name, "weights_sha256": meta["stages"][key]["weights_sha256"],
                  "provenance": stage_lineage(meta["provenance"], f"stage{key}")}
        return record if member is None else {**record, "member": member}

    stage2_sources = [source(path, "2", member) for path, member in sources]
    provenance = {
        "command": "python scripts/combine_stages.py " + " ".join(sys.argv[1:]),
        "date": date.today().isoformat(),
        "combined_from": {"stage1": source(args.stage1, "1"),
                          "stage2": stage2_sources[0] if len(stage2_sources) == 1 else stage2_sources},
    }
    members = []
    for (path, member), bundle in zip(sources, seconds):
        networks = bundle.stage2.members
        if member is not None:
            if not 0 <= member < len(networks):
                raise SystemExit(f"{path}: its stage 2 has {len(networks)} network(s); there is no member {member}")
            networks = networks[member:member + 1]
        elif "mix" in bundle.stage2.kwargs and args.stage2_mix is None:
            raise SystemExit(f"{path}: its stage 2 weighs its members {bundle.stage2.kwargs['mix']}; "
                             "give --stage2-mix for the new ensemble, one share per network")
        # A stage 2 that sees fewer neighbours, rebuilt to compute the same on the wider input.
        own = bundle.preprocessing.stage2_context_slices
        members += [widen_stage2(network, own, context) for network in networks]
    if args.stage2_mix is not None and len(members) == 1:
        raise SystemExit("--stage2-mix weighs the networks of an ensemble; one stage-2 network was given")
    if args.stage2_mix is not None and len(args.stage2_mix) != len(members):
        raise SystemExit(f"--stage2-mix gives {len(args.stage2_mix)} share(s) for {len(members)} stage-2 network(s)")
    if args.stage2_mix is not None:
        try:
            normalised_mix(args.stage2_mix, len(members))
        except ValueError as error:
            raise SystemExit(f"--stage2-mix: {error}") from None
    stage2 = members[0]
    if len(members) > 1:
        specs = [{"architecture": m.architecture, "kwargs": m.kwargs} for m in members]
        ensemble = build_network("ensemble", members=specs, mix=args.stage2_mix)
        for slot, member in zip(ensemble.members, members):
            slot.load_state_dict(member.module.state_dict())
        stage2 = StageModel.from_module(ensemble.eval())
    mask = first.mask if args.mask_radius_mm is None else MaskConfig(first.mask.threshold, args.mask_radius_mm, "mm")
    combined = replace(seconds[0], preprocessing=preprocessing, mask=mask, stage1=first.stage1, stage2=stage2,
                       provenance=provenance)
    print(f"wrote {save_bundle(combined, args.out, overwrite=False)}")
    return 0


def _split_member(text: str) -> tuple[Path, int | None]:
    """``FILE`` or ``FILE@K`` (member K of FILE's ensemble stage 2)."""
    path, at, member = text.rpartition("@")
    if not at or Path(text).exists() or not member.isdigit():
        return Path(text), None
    return Path(path), int(member)


if __name__ == "__main__":
    sys.exit(main())
