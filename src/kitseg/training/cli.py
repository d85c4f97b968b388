"""``kits-seg train``: argument parsing for training (the loop lives in :mod:`.loop`)."""

from __future__ import annotations

import argparse
import json
import logging
import shlex
import sys
from pathlib import Path

from ..cli import _non_negative_int, _positive_int, add_map_labels_argument, parse_map_labels
from ..config import ConfigError
from .config import PRESETS, TrainConfig, preset


def add_train_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train",
        help="train both stages on KiTS19-layout data",
        description="Train stage 1 (with out-of-fold twins for stage 2's inputs) and stage 2 on a folder of "
        "KiTS-layout cases (real KiTS19, KiTS21, KiTS23, `kits-seg phantom` output) or a data set in nnU-Net's raw "
        "layout (imagesTr, labelsTr). Rerun the same command to resume. "
        "Multi-GPU / multi-node: torchrun --nproc-per-node N -m kitseg.cli train ...",
    )
    p.add_argument("--data", type=Path, required=True, help="folder of case_XXXXX/{imaging,segmentation}.nii.gz (KiTS21: "
                   "aggregated_MAJ_seg.nii.gz), or nnU-Net's raw layout (imagesTr, labelsTr)")
    p.add_argument("--out", type=Path, required=True, help="run folder (resumes if it holds a run)")
    p.add_argument("--preset", default="paper", choices=sorted(PRESETS), help="recipe (default: paper)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, mps")
    p.add_argument("--val-fraction", type=float, default=None,
                   help="share of cases held out for validation (default 0.2)")
    p.add_argument("--val-cases", nargs="+", default=None, help="explicit validation case names")
    p.add_argument("--cache", type=Path, default=None, help="preprocessed-case cache (default: RUN/cache)")
    p.add_argument("--seed", type=_non_negative_int, default=None,
                   help="seed of the split, the initial weights and the sampling (default: the preset's)")
    p.add_argument("--stage1-steps", type=_positive_int, default=None,
                   help="optimizer steps of stage 1, over all processes (default: the preset's)")
    p.add_argument("--stage2-steps", type=_positive_int, default=None,
                   help="optimizer steps of stage 2, over all processes (default: the preset's)")
    p.add_argument("--steps-per-epoch", type=_positive_int, default=None,
                   help="steps between validations and checkpoints (default: the preset's)")
    p.add_argument("--stage2-context-slices", type=_non_negative_int, default=None, metavar="N",
                   help="neighbouring slices on each side that stage 2 also sees (0: the paper's 3-channel input)")
    add_map_labels_argument(p, "train on label values of another convention mapped onto", "as kidney (kept in the run's "
                            "recipe)")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=JSON",
                   help='override any config field, its value as JSON (a text field takes plain text; a JSON '
                        'object changes only the keys it names), e.g. --set learning_rate=3e-4 --set '
                        'tumor_sampling=lesion --set \'stage1_kwargs={"base_channels":16}\'')
    p.add_argument("--init-from", type=Path, default=None, metavar="MODEL.kseg",
                   help="fine-tune: start stage 1 and stage 2 from this model's weights (it must match the recipe; "
                   "e.g. the shipped model with --preset cpu)")
    p.add_argument("--keep-stage1", action="store_true",
                   help="with --init-from: keep that model's stage 1 as this run's (not trained further); "
                   "only the out-of-fold stage-1 models and stage 2 are trained")
    p.add_argument("--prepare-only", action="store_true",
                   help="prepare the cases into the cache (RUN/cache, or --cache) and stop, e.g. on a CPU node "
                   "before the GPU job: the same command without this flag then trains on them")
    p.add_argument("--no-progress", action="store_true", help="no progress bars (logs of batch jobs)")
    p.set_defaults(func=cmd_train)


def parse_settings(items: list[str], config: TrainConfig) -> dict:
    """``--set FIELD=JSON`` items as {field: value}, checked against ``config``'s fields.

    A text field also takes its text unquoted (``--set lr_schedule=poly``). An object changes the
    keys it names: ``--set 'stage1_kwargs={"base_channels":16}'`` keeps the preset's depth and norm
    (replaced whole, the network's own defaults would come in unseen).
    """
    current = config.to_dict()
    changes = {}
    for item in items:
        field, equals, value = item.partition("=")
        if not equals or not field:
            raise ConfigError(f"--set {item}: expected FIELD=JSON, e.g. --set learning_rate=3e-4")
        if field == "preset":  # the recipe's name: it would label a model with a recipe it did not follow
            raise ConfigError(f"--set {item}: choose the recipe with --preset; --set changes its fields")
        if not hasattr(config, field):
            raise ConfigError(f"--set {item}: unknown field {field!r}; fields: {', '.join(config.to_dict())}")
        try:
            parsed = json.loads(value)
        except ValueError as exc:
            if isinstance(getattr(config, field), str):  # a text field: --set lr_schedule=poly
                changes[field] = value
                continue
            raise ConfigError(f"--set {item}: {value!r} is no JSON value ({exc}); {field} is "
                              f"{json.dumps(current[field])} in this recipe") from None
        if isinstance(current[field], dict) and isinstance(parsed, dict):
            earlier = changes.get(field)  # an object set before in this command, else the recipe's
            parsed = {**(earlier if isinstance(earlier, dict) else current[field]), **parsed}
        changes[field] = parsed
    return changes


def cmd_train(args: argparse.Namespace) -> int:
    from .loop import process_rank, train

    config = preset(args.preset)
    changes = {k: v for k, v in {
        "seed": args.seed, "stage1_steps": args.stage1_steps, "stage2_steps": args.stage2_steps,
        "steps_per_epoch": args.steps_per_epoch}.items() if v is not None}
    changes.update(parse_settings(args.set, config))
    if args.map_labels is not None:
        changes["label_mapping"] = parse_map_labels(args.map_labels)  # TrainConfig keeps it with JSON's text keys
    if args.stage2_context_slices is not None:
        preprocessing = changes.get("preprocessing", config.preprocessing.to_dict())
        changes["preprocessing"] = {**preprocessing, "stage2_context_slices": args.stage2_context_slices}
    if changes:
        try:
            config = type(config).from_dict({**config.to_dict(), **changes})
        except (TypeError, ValueError) as exc:  # a value of the wrong kind, e.g. learning_rate="x"
            raise ConfigError(f"--set {', '.join(args.set)}: {exc}" if args.set else str(exc)) from None
    if args.prepare_only:
        from .data import cache_folder, labelled_inputs, prepare_cases, preparation_workers, settle_replaced_entries
        from .loop import check_run_folder_outside, check_val_cases, run_case_names

        check_run_folder_outside(args.out, args.data)
        inputs = labelled_inputs(args.data)
        check_val_cases(args.val_cases, inputs, args.data)  # wrong now, not in the GPU job that follows
        in_run = run_case_names(args.out, config)  # a run begun already: its recipe and cases
        if in_run is not None:
            inputs = [c for c in inputs if c.name in in_run]
        cache, mapping = cache_folder(args.out, args.cache), config.labels_mapped()
        stems = prepare_cases(args.data, config.preprocessing, cache, not args.no_progress, preparation_workers(),
                              inputs=inputs, mapping=mapping)
        settle_replaced_entries(inputs, config.preprocessing, cache, mapping, prune=args.cache is None)
        print(f"{len(stems)} cases prepared in {cache}")
        return 0
    from ..device import get_device

    try:
        device = get_device(args.device, announce=False)  # an unknown or absent device fails now, not after the data is prepared
    except (ValueError, RuntimeError) as exc:
        raise ConfigError(str(exc)) from None
    rank = process_rank()
    # The default recipe, on a CPU: said before days go (a few steps, to try it out, are no matter).
    if device.type == "cpu" and args.preset == "paper" and config.stage1_steps + config.stage2_steps >= 10000 \
            and rank == 0:
        logging.getLogger(__name__).warning(
            "the paper preset (%d + %d steps on the native in-plane grid) is meant for a GPU: on a CPU it runs for "
            "days; --preset cpu trains a coarser model in about an hour", config.stage1_steps, config.stage2_steps)
    if rank > 0:  # the processes of a run say the same: rank 0 speaks for them, the others only of errors
        logging.getLogger().setLevel(logging.ERROR)
    command = "kits-seg " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    model = train(args.data, args.out, config, device=args.device, val_fraction=args.val_fraction,
                  val_cases=args.val_cases, cache_dir=args.cache, progress=not args.no_progress, command=command,
                  init_from=args.init_from, keep_stage1=args.keep_stage1)
    if rank == 0:
        print(f"model: {model}")
    return 0
