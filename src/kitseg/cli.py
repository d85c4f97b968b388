"""``kits-seg``: the command-line front end. Each subcommand is a thin layer over the engine."""

from __future__ import annotations

import argparse
import logging
import math
import os
import signal
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from .config import MIRROR_MODES, SEG_ALGORITHM_TYPES, TUMOR_SLICE_SMOOTHING, check_tumor_slice_smoothing

log = logging.getLogger("kitseg")


class CliError(Exception):
    """A user-facing error: printed as one line, exit status 2."""


def _non_negative_int(text: str) -> int:
    """An argparse type: a whole number of at least 0 (a seed)."""
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a whole number of at least 0, not {text!r}")
    return value


def _positive_int(text: str) -> int:
    """An argparse type: a whole number of at least 1."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number of at least 1, not {text!r}")
    return value


def _slice_weight(text: str) -> float:
    """argparse type of --tumor-smoothing: a neighbour slice's weight, in [0, 0.5)."""
    try:
        return check_tumor_slice_smoothing(float(text))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a neighbouring slice's weight in [0, 0.5), not {text!r}") from None


# ---------------------------------------------------------------------------- predict
def add_mirror_option(parser: argparse.ArgumentParser) -> None:
    """``--mirror [stage2|both]`` (a bare ``--mirror`` mirrors both stages), for Segmenter(mirror=...)."""
    parser.add_argument(
        "--mirror",
        nargs="?",
        const="both",
        default="off",
        choices=MIRROR_MODES,
        help="test-time mirroring: also run each slice mirrored left-right and average; 'stage2' (stage 2 only) "
        "or 'both' (the default of a bare --mirror; twice the network time). Default: off",
    )


def _add_predict(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "predict",
        help="segment kidneys and tumors",
        description="Segment a NIfTI CT, a KiTS case folder, a DICOM series (its folder, or one of its files), or "
        "a folder of these (nnU-Net's imagesTr too). A case folder case_XXXXX gives prediction_XXXXX.nii.gz; a file "
        "NAME.nii.gz gives NAME_labels.nii.gz; a DICOM series in folder NAME gives NAME_labels.nii.gz, a NIfTI on "
        "the series' grid.",
    )
    p.add_argument("input", type=Path, help="a .nii/.nii.gz file, a case folder, a DICOM series, or a folder of "
                   "these")
    p.add_argument("-o", "--output", type=Path, required=True, help="output folder (created if missing)")
    p.add_argument("--weights", type=Path, default=None, help="model file (.kseg); default: the shipped model")
    p.add_argument("--device", default="auto", help="auto (cuda > mps > cpu), cpu, cuda, cuda:1, mps")
    p.add_argument("--batch-size", type=_positive_int, default=8, help="slices per network batch (default 8)")
    p.add_argument("--threshold", type=float, default=None, help="stage-1 threshold (default: the model's)")
    p.add_argument("--radius", type=float, default=None, help="mask dilation radius (default: the model's)")
    p.add_argument("--radius-mm", action="store_true", help="the radius is in mm, not stage-grid voxels")
    p.add_argument(
        "--stage2-level",
        type=int,
        default=None,
        metavar="K",
        help=(
            "UNet++ pruned inference: only the depth-K sub-network (faster, less accurate: on 30 phantoms with "
            "a single network of 2026-12-03, K=2 made stage 2 2.7x faster and tumor Dice 0.45 -> 0.42; on the "
            "sample with the shipped model 0.41 -> 0.21); default: all heads ensembled"
        ),
    )
    add_mirror_option(p)
    p.add_argument(
        "--tumor-smoothing",
        type=_slice_weight,
        default=None,
        metavar="W",
        help="decide kidney or tumor on stage 2's probabilities averaged with the neighbouring slices', weights "
        f"(W, 1-2W, W); 0 decides each slice alone (default {TUMOR_SLICE_SMOOTHING:g}; foreground is the plain argmax's "
        "either way; tuned for the shipped model)",
    )
    p.add_argument(
        "--save-intermediates",
        action="store_true",
        help="also write y1 (stage-1 probability), the dilated mask and the class probabilities",
    )
    p.add_argument(
        "--dicom-seg",
        action="store_true",
        help="for a DICOM series, also write its labels as a DICOM SEG over it (NAME_labels.dcm: segments "
        "'kidney' and 'kidney tumor', those found), which PACS and DICOM viewers show over the series; "
        "`kits-seg dicom-seg` converts labels corrected afterwards",
    )
    p.add_argument(
        "--no-cleanup",
        action="store_true",
        help="keep every predicted piece and tumor call; by default pieces with no kidney voxel, under 10%% "
        "of the largest piece's size, above or below the kidneys' slices, or holding under 10%% as much "
        "kidney as the piece with most are removed, and tumor pieces under 20%% of their kidney's largest "
        "are relabelled kidney (kitseg.postprocess)",
    )
    replace = p.add_mutually_exclusive_group()
    replace.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    replace.add_argument("--skip-existing", action="store_true",
                         help="segment only the cases whose outputs are not all there, and write only the missing "
                         "ones: an existing file is never replaced (to finish a folder run that was interrupted; "
                         "outputs are written whole or not at all)")
    p.set_defaults(func=cmd_predict)


def cmd_predict(args: argparse.Namespace) -> int:
    from .config import MaskConfig
    from .dicom import NoImageSlices
    from .io import InputError, ct_grid, discover_inputs
    from .pipeline import Segmenter

    cases = discover_inputs(args.input)
    args.seg_for = set()  # the CTs whose labels go into a DICOM SEG too (--dicom-seg: the series it can reference)
    without_images, grids = [], {}
    for case in cases:  # the headers, before minutes of work: a file that is no CT at all fails now
        try:
            grids[case.image_path] = ct_grid(case.image_path)
        except NoImageSlices as exc:  # a study's scout or dose-report series, beside its CT series
            if len(cases) == 1:
                raise
            log.warning("%s: not segmented", exc)
            without_images.append(case)
    cases = [case for case in cases if case not in without_images]
    if not cases:
        raise CliError(f"{args.input}: none of its DICOM series holds image slices: nothing to segment")
    if args.dicom_seg:
        from .dicom_seg import SeriesNotReferenceable, check_can_write_seg, check_seg_source

        check_can_write_seg()
        refused: list[str] = []
        if not any(case.is_dicom_series for case in cases):
            raise CliError(f"--dicom-seg: {args.input} holds no DICOM series; a DICOM SEG references the series "
                           "it segments (NIfTI results are written without the option)")
        for case in cases:  # headers an anonymiser stripped of what a SEG references: said before the work
            if not case.is_dicom_series:
                continue
            try:
                check_seg_source(case.image_path)
            except SeriesNotReferenceable as exc:
                refused.append(f"{exc.path}: {exc.reason}")
                continue
            args.seg_for.add(case.image_path)
        if refused and not args.seg_for:  # --dicom-seg asked for, and no SEG could be written: an error
            raise CliError(f"{'; '.join(refused)}; run without --dicom-seg for NIfTI labels")
        for reason in refused:
            log.warning("%s: its labels are written as NIfTI only, with no DICOM SEG", reason)
    _check_output_folder(args.output)
    if args.skip_existing:
        cases = _cases_left_to_do(cases, args, grids)
        if not cases:
            print(f"{args.output}: every case has its outputs already; nothing to do")
            return 0
    _check_outputs_free(cases, args)
    failed, count = [], len(cases)
    if args.skip_existing:  # a finished run given --dicom-seg afterwards: its SEGs from the kept labels, no model
        seg_only = [case for case in cases if _seg_alone_missing(case, args)]
        for case in seg_only:
            start = time.perf_counter()
            try:
                labels_path, seg_path = _seg_of_kept_labels(case, args)
            except InputError as exc:
                if count == 1:
                    raise
                print(f"kits-seg: error: {exc}", file=sys.stderr)
                failed.append(case.name)
                continue
            print(f"{case.name}: {seg_path.name} from the kept {labels_path.name}, not segmented again "
                  f"({time.perf_counter() - start:.1f} s)")
        cases = [case for case in cases if case not in seg_only]
    if not cases:
        return _report_failed(failed, count)
    try:
        segmenter = Segmenter.from_file(
            args.weights, device=args.device, batch_size=args.batch_size, stage2_level=args.stage2_level,
            mirror=args.mirror,
            **({} if args.tumor_smoothing is None else {"tumor_slice_smoothing": args.tumor_smoothing}),
        )
    except (ValueError, RuntimeError) as exc:  # a --device or --stage2-level this model or machine cannot take
        raise CliError(str(exc)) from exc
    model_mask = segmenter.bundle.mask
    mask_config = MaskConfig(
        threshold=model_mask.threshold if args.threshold is None else args.threshold,
        radius=model_mask.radius if args.radius is None else args.radius,
        radius_unit="mm" if args.radius_mm else ("voxels" if args.radius is not None else model_mask.radius_unit),
    )
    _say_mask_rule(mask_config, model_mask, args)
    made = not args.output.exists()
    _make_output_folder(args.output)
    try:
        failed = _segment_cases(cases, failed, count, segmenter, mask_config, args)
    finally:  # a folder this run made and left empty (its one CT refused, or interrupted) is not left behind
        if made and args.output.is_dir() and not any(args.output.iterdir()):
            args.output.rmdir()
    return _report_failed(failed, count)


def _segment_cases(cases: list, failed: list[str], count: int, segmenter, mask_config,
                   args: argparse.Namespace) -> list[str]:
    """Segment and write each case; the names of those that failed (with ``failed``'s). A failure is
    raised where the run has one case (``count``), said and passed over where it has more."""
    from tqdm import tqdm

    from .io import InputError, label_map_values, read_ct
    from .metrics import describe_found
    from .outputs import write_prediction
    from .pipeline import Progress, Segmentation
    from .postprocess import CleanupRules
    from .weights import DEFAULT_WEIGHTS

    log.info("device: %s; %d case(s)", segmenter.device, len(cases))
    for case in cases:
        start = time.perf_counter()
        try:
            volume = read_ct(case.image_path)
            values = label_map_values(volume.array)
            if values is not None:  # segmenting it would "succeed" with nothing found
                held = (", ".join(map(str, values)) if len(values) <= 8
                        else f"{len(values)} whole numbers from {values[0]} to {values[-1]}, constant over regions")
                raise InputError(f"{case.image_path}: holds only the values {held}: a label map, not a CT")
        except InputError as exc:  # one unreadable CT of a batch: say so, and segment the others
            if count == 1:
                raise
            tqdm.write(f"kits-seg: error: {exc}", file=sys.stderr)
            failed.append(case.name)
            continue
        result = None
        with tqdm(desc=case.name, unit="step", leave=False, disable=None) as bar:
            for item in segmenter.iter_segment(volume, mask_config, None if args.no_cleanup else CleanupRules()):
                if isinstance(item, Segmentation):
                    result = item
                elif isinstance(item, Progress):
                    bar.set_postfix_str(item.step)
                    bar.total = item.total
                    bar.n = item.done
                    bar.refresh()
        assert result is not None
        try:
            written = write_prediction(result, case, args.output, args.save_intermediates, args.overwrite,
                                       keep_existing=args.skip_existing, dicom_seg=_with_seg(case, args),
                                       model=(args.weights or DEFAULT_WEIGHTS).name)
        except InputError as exc:  # the SEG, whose headers highdicom refused: the NIfTI is on disk
            message = f"{exc} (the NIfTI labels are on disk)" if _with_seg(case, args) else str(exc)
            if count == 1:
                raise InputError(message) from None
            tqdm.write(f"kits-seg: error: {message}", file=sys.stderr)
            failed.append(case.name)
            continue
        tqdm.write(f"{case.name}: {describe_found(result.labels, volume.spacing)}; "
                   f"{', '.join(p.name for p in written)} ({time.perf_counter() - start:.1f} s)")
    return failed


def _report_failed(failed: list[str], count: int) -> int:
    if failed:
        raise CliError(f"{len(failed)} of {count} case(s) could not be read as a CT, or their outputs not be "
                       f"written: {', '.join(failed)}")
    return 0


def _with_seg(case, args) -> bool:
    """``case``'s labels go into a DICOM SEG too (``--dicom-seg``, a series whose headers allow one)."""
    return case.image_path in args.seg_for


def _seg_alone_missing(case, args) -> bool:
    """Of ``case``'s outputs only the DICOM SEG is missing (``--skip-existing``)."""
    from .outputs import output_paths

    if not _with_seg(case, args):
        return False
    *others, seg_path = output_paths(case, args.output, args.save_intermediates, True)
    return not seg_path.exists() and all(path.is_file() for path in others)


def _seg_of_kept_labels(case, args) -> tuple[Path, Path]:
    """The SEG of a case's kept labels, without segmenting it again: recorded as semiautomatic, as
    whether a person corrected them is not known, and naming no model (which made them is not known)."""
    from .dicom_seg import write_dicom_seg
    from .io import read_labels
    from .outputs import output_paths

    labels_path, seg_path = output_paths(case, args.output, False, True)
    labels = read_labels(labels_path)  # its grid is the series' (checked by _cases_left_to_do)
    write_dicom_seg(labels.array, labels.source, case.image_path, seg_path, algorithm_type="semiautomatic")
    return labels_path, seg_path


def _cases_left_to_do(cases, args, grids: dict) -> list:
    """--skip-existing: the cases whose outputs are not all written yet (an output on disk is whole:
    each is written atomically). ``grids``: each CT's (shape, affine), from :func:`kitseg.io.ct_grid`."""
    from .geometry import source_grid_for
    from .io import InputError, check_same_grid, ct_grid
    from .outputs import output_paths

    left = [c for c in cases if not all(p.is_file() for p in output_paths(c, args.output, args.save_intermediates,
                                                                          _with_seg(c, args)))]
    for case in cases:
        # Outputs are named after their CT: another CT's of the same name (SE000001 of another study)
        # must neither pass for done nor be completed with this CT's.
        existing = [p for p in output_paths(case, args.output, True, _with_seg(case, args)) if p.is_file()]
        if not existing:
            continue
        shape, affine = grids[case.image_path]
        for path in existing:
            if path.suffix == ".dcm":  # a SEG: of this series?
                from .dicom_seg import referenced_series, series_uid

                if referenced_series(path) != series_uid(case.image_path):
                    raise CliError(f"{path}: exists, and references another series than {case.image_path}: the "
                                   "result of another series of the same name? Choose another -o/--output")
                continue
            written_shape, written_affine = ct_grid(path, channels_ok=True)
            try:  # compared as read: labels a user saved back in another axis order (ITK-SNAP) are this CT's still
                check_same_grid(source_grid_for(written_shape[:3], written_affine), source_grid_for(shape, affine))
            except InputError:
                raise CliError(f"{path}: exists, on another grid than {case.image_path} ({written_shape} against "
                               f"{shape}): the result of another CT of the same name? Choose another "
                               "-o/--output") from None
        if _with_seg(case, args):
            labels_path, seg_path = output_paths(case, args.output, False, True)
            if labels_path.is_file() and not seg_path.is_file():
                _check_kept_labels(labels_path)  # its SEG is made from it: a value a SEG cannot hold is said now
    if len(left) < len(cases):
        log.info("%s: %d of %d case(s) have all their outputs already and are left as they are (--skip-existing)",
                 args.output, len(cases) - len(left), len(cases))
    return left


def _check_kept_labels(path: Path) -> None:
    from .config import KITS_LABELS
    from .io import name_a_few, read_labels

    stray = KITS_LABELS.stray_values(read_labels(path).array)  # read as uint8: no value below 0
    if stray:
        raise CliError(f"{path}: holds label {name_a_few(stray, 8)}, which a DICOM SEG of kidney (1) and tumor (2) "
                       "cannot: relabel them (0 erases), or run without --dicom-seg")


def _say_mask_rule(mask, model_mask, args) -> None:
    """Say the stage-2 mask rule in use where the options changed the model's, and warn where a
    bare number reads in another unit than the model's own rule."""
    if args.radius is not None and not args.radius_mm and model_mask.radius_unit == "mm":
        log.warning("--radius %g is read in stage-grid voxels; this model's own radius is in mm (%s): add "
                    "--radius-mm for mm", args.radius, model_mask.describe())
    if args.radius_mm and args.radius is None and model_mask.radius_unit != "mm":
        log.warning("--radius-mm without --radius reads the model's radius of %g %s as %g mm", model_mask.radius,
                    model_mask.radius_unit, model_mask.radius)
    if args.radius_mm and args.radius is None and model_mask.radius_unit == "mm":
        log.info("--radius-mm without --radius: the model's own radius, %g mm, applies", model_mask.radius)
    if mask != model_mask:
        log.info("stage-2 mask: %s (the model's: %s)", mask.describe(), model_mask.describe())


def _check_output_folder(folder: Path, option: str = "-o/--output") -> None:
    """Before minutes of segmentation: the output folder can be made and written to (made only
    once the model has loaded: a run refused before then leaves nothing behind)."""
    if folder.exists() and not folder.is_dir():
        raise CliError(f"{folder}: is a file; {option} takes a folder")
    if not folder.exists() and folder.name.lower().endswith((".nii", ".nii.gz", ".dcm")):
        raise CliError(f"{folder}: {option} takes a folder, which the outputs are named in; name it without "
                       "a file's suffix")
    existing = next(p for p in (folder, *folder.absolute().parents) if p.exists())
    if not existing.is_dir():
        raise CliError(f"{folder}: cannot create the output folder ({existing} is a file)")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise CliError(f"{folder}: the output folder is not writable" if existing == folder
                       else f"{folder}: cannot create the output folder ({existing} is not writable)")


def _make_output_folder(folder: Path) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise CliError(f"{folder}: cannot create the output folder ({exc.strerror or exc})") from exc


def _check_outputs_free(cases, args) -> None:
    """Fail before any work if two inputs would write the same output (``x.nii`` and ``x.nii.gz``)
    or, unless --overwrite, an output would replace a file."""
    from .outputs import output_paths

    writer: dict[Path, Path] = {}
    for case in cases:
        for out in output_paths(case, args.output, args.save_intermediates, _with_seg(case, args)):
            if out in writer:
                raise CliError(f"{writer[out]} and {case.image_path} would both be written to {out}: "
                               "rename one, or segment them into different -o folders")
            writer[out] = case.image_path
    folders = [p for p in writer if p.is_dir()]
    if folders:
        raise CliError(f"{folders[0]}: is a folder, where an output file would go; move it or choose another -o folder")
    for out in writer:
        if out.suffix == ".dcm":
            from .dicom_seg import check_seg_output

            check_seg_output(out)  # a scout or a CT slice named so is never replaced, said before the work

    def file_id(path: Path) -> tuple[int, int]:  # one file under any name (a symbolic or hard link)
        stat = path.stat()
        return stat.st_dev, stat.st_ino

    inputs = {file_id(case.image_path): case.image_path for case in cases if case.image_path.is_file()}
    for out in writer:  # a link to a CT where its labels would go: never written through, --overwrite or not
        if out.exists() and file_id(out) in inputs:
            raise CliError(f"{out}: is the input {inputs[file_id(out)]} (a link to it?), where an output would go; "
                           "move it or choose another -o folder")
    if args.skip_existing:  # the outputs that exist stay; only the missing ones are written
        return
    if args.overwrite:
        _warn_stale_intermediates(cases, args)
        return
    taken = [p for p in writer if p.exists()]
    if taken:
        more = f" and {len(taken) - 1} more" if len(taken) > 1 else ""
        raise CliError(f"{taken[0]} exists already{more}; pass --overwrite to replace, or --skip-existing to "
                       "segment only the cases without outputs")


def _warn_stale_intermediates(cases, args) -> None:
    """Replacing labels without --save-intermediates leaves an earlier run's intermediates beside
    them, describing another result: say so (they are the user's files; nothing is deleted)."""
    from .io import name_a_few
    from .outputs import output_paths

    stale_segs = [p for c in cases if not _with_seg(c, args) and c.is_dicom_series
                  for p in output_paths(c, args.output, False, True)[1:] if p.exists()]
    if stale_segs:  # what a PACS would be sent beside the new labels
        log.warning("%s: %d DICOM SEG(s) of an earlier run stay as they were and will not match the new labels "
                    "(%s); pass --dicom-seg to write them anew", args.output, len(stale_segs),
                    name_a_few([p.name for p in stale_segs], 3))
    if args.save_intermediates:
        return
    stale = [p for c in cases for p in output_paths(c, args.output, True)[1:] if p.exists()]
    if stale:
        log.warning("%s: %d intermediate file(s) of an earlier run stay as they were and will not match the new "
                    "labels (%s); pass --save-intermediates to write them anew", args.output, len(stale),
                    name_a_few([p.name for p in stale], 3))


# ---------------------------------------------------------------------------- evaluate
def _add_evaluate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "evaluate",
        help="KiTS19 Dice of predictions against ground truth",
        description="Score predictions with the KiTS19 definitions (kidney: label>0; tumor: label==2). "
        "prediction_XXXXX.nii.gz pairs with GT/case_XXXXX/segmentation.nii.gz (KiTS21: aggregated_MAJ_seg.nii.gz); "
        "NAME_labels.nii.gz with GT/NAME.nii.gz or GT/NAME/segmentation.nii.gz (or aggregated_MAJ_seg.nii.gz); "
        "NAME_0000_labels.nii.gz (nnU-Net's imagesTr/NAME_0000.nii.gz) also with GT/NAME.nii.gz (its labelsTr; "
        "a data set's folder stands for its labelsTr).",
    )
    p.add_argument("--pred", type=Path, required=True, help="a prediction file or folder")
    p.add_argument("--gt", type=Path, required=True, help="a ground-truth file or folder (KiTS case folders, "
                   "or label files as nnU-Net's labelsTr)")
    p.add_argument("--csv", type=Path, default=None, help="write per-case scores and the means here")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --csv file")
    p.add_argument(
        "--empty-value",
        type=_empty_dice,
        default=1.0,
        help="Dice when prediction and truth are both empty (default 1; the official script gives NaN)",
    )
    p.add_argument(
        "--found-share",
        type=_share,
        default=None,
        help="a reference tumor counts as found when at least this share of its voxels is labelled tumor "
        "(default 0.5)",
    )
    add_map_labels_argument(p, "score label values of another convention, in the ground truth and the predictions "
                               "alike, as", "within the kidney region (3=0 leaves them out of it)")
    p.add_argument("--map-gt-labels", nargs="+", default=None, metavar="FROM=TO",
                   help="the ground truth's label values mapped instead of by --map-labels (which then maps the "
                   "predictions only): another tool's reference, e.g. --map-gt-labels 2=1 3=1 '*=0' for "
                   "TotalSegmentator's kidneys (* is every other value but 0); where nothing maps to 2, tumor is "
                   "not scored")
    p.add_argument("--series", type=Path, nargs="+", default=[], metavar="FOLDER",
                   help="where the CT series that DICOM SEG files segment are, when not beside the SEGs: series "
                   "folders, or folders of them")
    p.set_defaults(func=cmd_evaluate)


def parse_map_labels(pairs: list[str] | None, option: str = "--map-labels", files: str = "every file") -> dict[int, int]:
    """``--map-labels`` as {from: to}; remapping a KiTS19 class itself (``2=1``) is allowed, and said
    (``--map-gt-labels`` maps another tool's values, whose 1 and 2 are not KiTS19's: not said)."""
    from .config import KITS_LABELS, label_mapping, mapped_class

    mapping = label_mapping(pairs, option) if pairs else {}
    own = [f"{k}={mapped_class(mapping, k)}" for k in range(len(KITS_LABELS.names)) if mapped_class(mapping, k) != k]
    if own and option == "--map-labels":
        log.warning("--map-labels %s changes KiTS19's own classes (0 background, 1 kidney, 2 tumor) in %s",
                    " ".join(own), files)
    return mapping


def add_map_labels_argument(parser: argparse.ArgumentParser, use: str, cysts: str) -> None:
    """``--map-labels FROM=TO ...`` (:func:`kitseg.config.label_mapping`), for ``evaluate``, ``train`` and ``phantom``."""
    parser.add_argument("--map-labels", nargs="+", default=None, metavar="FROM=TO",
                        help=f"{use} KiTS19's 0 (background), 1 (kidney), 2 (tumor), e.g. --map-labels 3=1 for "
                        f"KiTS21/23's cysts {cysts}; '*=TO' maps every value not named but 0; the files are not "
                        "changed")


def _empty_dice(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not (math.isnan(value) or 0.0 <= value <= 1.0):
        raise argparse.ArgumentTypeError(f"must be a Dice in [0, 1] or nan, got {text}")
    return value


def _share(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be a number in (0, 1], got {text}")
    return value


def _series_folders(given: list[Path]) -> list[Path]:
    """``evaluate --series``: folders, each a series' or a study's (its series folders are looked in)."""
    for folder in given:
        if not folder.is_dir():
            raise CliError(f"--series {folder}: {'is no folder' if folder.exists() else 'does not exist'}; give "
                           "the folder of a DICOM series, or of several")
    return given


def cmd_evaluate(args: argparse.Namespace) -> int:
    from .evaluation import evaluate_pairs, match_predictions, unpaired_references
    from .io import is_dicom_seg, name_a_few
    from .config import describe_label_mapping, tumor_left_unlabelled
    from .metrics import DEFAULT_FOUND_SHARE, MIN_TUMOR_ML, aggregate, write_scores_csv

    mapping = parse_map_labels(args.map_labels, files="the predictions" if args.map_gt_labels else "every file")
    gt_mapping = (mapping if args.map_gt_labels is None
                  else parse_map_labels(args.map_gt_labels, "--map-gt-labels"))
    series_near = _series_folders(args.series)
    pairs, unmatched = match_predictions(args.pred, args.gt)
    if args.csv is not None:
        _check_report_path(args.csv, [p for pair in pairs for p in (pair.prediction, pair.reference)], args.overwrite)
    if unmatched:
        log.warning("%s: %d prediction(s) have no ground truth and are not scored: %s", args.pred, len(unmatched),
                    name_a_few(unmatched, 3))
    unscored = unpaired_references(pairs, args.pred, args.gt)
    if unscored:
        more = f" and {len(unscored) - 3} more" if len(unscored) > 3 else ""
        log.warning("%s: %d case(s) have no prediction and are not scored: %s%s", args.gt, len(unscored),
                    ", ".join(unscored[:3]), more)
    found_share = DEFAULT_FOUND_SHARE if args.found_share is None else args.found_share
    if mapping:
        log.info("labels scored as %s", describe_label_mapping(mapping))
    if gt_mapping is not mapping:
        log.info("the ground truth's labels scored as %s", describe_label_mapping(gt_mapping))
    # (A DICOM SEG reference is read by its codes, its tumor segment as tumor, whatever the mapping.)
    tumor_scored = not tumor_left_unlabelled(gt_mapping) or any(is_dicom_seg(pair.reference) for pair in pairs)
    if not tumor_scored:
        log.warning("mapped as %s, the ground truth holds no tumor (2): tumor is not scored (nan), the kidney region is",
                    describe_label_mapping(gt_mapping))
    scores = evaluate_pairs(pairs, empty_value=args.empty_value, found_share=found_share, mapping=mapping,
                            gt_mapping=gt_mapping, series_near=series_near)
    width = max([24, *(len(s.case) + 2 for s in scores)])  # long series names keep the columns in line
    header = (f"{'case':<{width}}{'kidney':>9}{'tumor':>9}{'composite':>11}{'kidney mL':>11}{'tumor mL':>10}"
              f"{'found':>8}{'false':>7}")
    print(header)
    for s in scores:
        print(
            f"{s.case:<{width}}{s.kidney_dice:>9.4f}{s.tumor_dice:>9.4f}{s.composite_dice:>11.4f}"
            f"{s.kidney_ml:>11.1f}{s.tumor_ml:>10.1f}"
            + (f"{f'{s.tumors_found}/{s.ref_tumors}':>8}{s.false_tumors:>7}" if tumor_scored else f"{'n/a':>8}{'n/a':>7}")
        )
    means = aggregate(scores)
    print(
        f"{'mean (' + str(len(scores)) + ')':<{width}}{means['kidney_dice']:>9.4f}{means['tumor_dice']:>9.4f}"
        f"{means['composite_dice']:>11.4f}"
    )
    left_out = {name: means[f"{name}_dice_n_nan"] for name in ("kidney", "tumor", "composite")}
    if any(left_out.values()):  # a mean of fewer cases than the row's count says
        print("means over the cases not nan: " + ", ".join(f"{name} {len(scores) - n} of {len(scores)}"
                                                         for name, n in left_out.items()))
    rate = means["tumors_found_rate"]
    if tumor_scored:
        print(f"tumors found (a tumor counts when at least {found_share:g} of it is labelled tumor): "
              f"{sum(s.tumors_found for s in scores)} of {sum(s.ref_tumors for s in scores)}"
              f"{'' if math.isnan(rate) else f' ({100 * rate:.0f}%)'}; false tumor pieces: "
              f"{sum(s.false_tumors for s in scores)}, {sum(s.false_tumor_ml for s in scores):.1f} mL "
              f"(pieces under {MIN_TUMOR_ML:g} mL not counted)")
    else:
        print("tumor not scored: the ground truth's labels, mapped, hold no tumor class")
    if args.csv is not None:
        # How the files were scored, in every row: the mappings as typed ("3=1"; empty: none).
        settings = {"label_mapping": describe_label_mapping(mapping),
                    "gt_label_mapping": describe_label_mapping(gt_mapping),
                    "found_share": found_share, "empty_value": args.empty_value}
        write_scores_csv(scores, args.csv, settings, files=[(str(p.prediction), str(p.reference)) for p in pairs])
        print(f"wrote {args.csv}")
    return 0


def _check_report_path(path: Path, inputs: list[Path], overwrite: bool) -> None:
    """Before any scoring: the report must not replace an input, a folder, or (without --overwrite) a file."""
    from .io import is_nifti

    if path.is_dir():
        raise CliError(f"{path}: is a folder; --csv takes a file name")
    if path.exists() and any(path.resolve() == p.resolve() for p in inputs):
        raise CliError(f"{path}: is one of the files being scored; refusing to write the report over it")
    if is_nifti(path) or path.suffix.lower() in (".kseg", ".npz", ".npy"):  # a CT or model, even --overwrite
        raise CliError(f"{path}: is named as an image or model file; --csv takes a CSV file name (scores.csv)")
    if path.exists() and path.suffix.lower() not in (".csv", ".tsv", ".txt"):  # .mha, .nrrd, .json...: not ours
        raise CliError(f"{path}: exists and is no CSV file; refusing to replace it with the report")
    if path.exists() and not overwrite:
        raise CliError(f"{path} exists already; pass --overwrite to replace")
    if not path.parent.is_dir():
        raise CliError(f"{path.parent}: no such folder for --csv")
    if not os.access(path.parent, os.W_OK):  # said now, not after the scoring
        raise CliError(f"{path.parent}: cannot be written to (read-only?); choose another folder for --csv")


# ---------------------------------------------------------------------------- dicom-seg
def _add_dicom_seg(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "dicom-seg",
        help="write a label map as a DICOM SEG over its CT series, or a DICOM SEG as a NIfTI label map",
        description="Write a label map on a DICOM series' grid (as `predict` writes it, corrected or not) as a "
        "DICOM SEG object that references the series, for a PACS or a DICOM viewer: segments 'kidney' and "
        "'kidney tumor', those found, numbered in that order. The labels must be on the series' own grid; values "
        "other than 0, 1, 2 are refused. Given a DICOM SEG instead (this tool's, or another's with kidney or "
        "kidney tumor segments), write it as a NIfTI label map on its series' grid (1 kidney, 2 tumor).",
    )
    p.add_argument("labels", type=Path, help="the label map (.nii/.nii.gz) on the series' grid; or a DICOM SEG (.dcm) "
                   "to write as NIfTI")
    p.add_argument("series", type=Path, nargs="?", default=None,
                   help="the CT series: its folder, or one of its files (for a SEG given: by default the series it "
                   "references, found beside it)")
    p.add_argument("-o", "--output", type=Path, default=None,
                   help="the SEG file (.dcm), or for a SEG given, the NIfTI file; default: beside the input, named "
                   "as it is (LABELS_NAME.dcm, SEG_NAME.nii.gz; a SEG in a series' folder: beside the folder)")
    p.add_argument("--algorithm-type", choices=SEG_ALGORITHM_TYPES, default="semiautomatic",
                   help="who made the labels, as the SEG records it: the model alone (automatic), the model's "
                   "labels corrected by a person (semiautomatic, the default), or a person (manual)")
    p.add_argument("--model", default=None, help="the model file's name, recorded in the SEG (automatic and "
                   "semiautomatic)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    p.set_defaults(func=cmd_dicom_seg)


def cmd_dicom_seg(args: argparse.Namespace) -> int:
    from .dicom_seg import check_can_write_seg, write_dicom_seg
    from .io import dicom_series_folders, is_dicom_seg, is_dicom_series, is_nifti, read_labels, strip_nifti_suffix

    check_can_write_seg()
    if not args.labels.is_file():
        raise CliError(f"{args.labels}: no such file (a NIfTI label map, or a DICOM SEG)")
    if args.series is not None and not args.series.exists():
        raise CliError(f"{args.series}: no such file or folder (the series: its folder, or one of its files)")
    if is_dicom_seg(args.labels):
        return _seg_to_nifti(args)
    if not is_nifti(args.labels):
        raise CliError(f"{args.labels}: neither a NIfTI label map (.nii/.nii.gz) nor a DICOM SEG")
    if args.series is None:
        raise CliError(f"{args.labels}: give the DICOM series the labels were made on (kits-seg dicom-seg LABELS SERIES)")
    if not is_dicom_series(args.series) and not (args.series.is_dir() and dicom_series_folders(args.series)):
        # (a study's folder passes: reading it names its series folders)
        raise CliError(f"{args.series}: is no DICOM series (its folder, or one of its files): a SEG references the "
                       "DICOM series the labels were made on")
    output = args.output or args.labels.with_name(strip_nifti_suffix(args.labels.name) + ".dcm")
    labels = read_labels(args.labels)
    written = write_dicom_seg(labels.array, labels.source, args.series, output, overwrite=args.overwrite,
                              algorithm_type=args.algorithm_type, model=args.model)
    print(f"wrote {written}")
    return 0


def _seg_to_nifti(args: argparse.Namespace) -> int:
    """``kits-seg dicom-seg SEG.dcm [SERIES]``: the SEG's kidney and tumor as NIfTI on the series' grid."""
    from .dicom_seg import read_dicom_seg
    from .io import is_dicom_series, is_nifti, write_labels

    # SEGs named by their UID (1.2.840...): the whole name kept, as two would otherwise share one.
    stem = args.labels.stem if args.labels.suffix.lower() == ".dcm" else args.labels.name
    # Beside the SEG; not into a series' folder, though, where a NIfTI would be taken for its CT.
    seg_folder = args.labels.absolute().parent
    folder = seg_folder.parent if is_dicom_series(seg_folder) else seg_folder
    output = args.output or folder / (stem + ".nii.gz")
    if not is_nifti(output):
        raise CliError(f"{output}: a DICOM SEG is written out as NIfTI: name the output .nii.gz")
    if output.is_dir():
        raise CliError(f"{output}: is a folder; name the output file (-o OUT.nii.gz)")
    if output.exists() and not args.overwrite:  # said before the series is read
        raise CliError(f"{output} exists already; pass --overwrite to replace it, or -o to name another file")
    seg = read_dicom_seg(args.labels, args.series)
    written = write_labels(seg.labels.array, seg.labels.source, output, overwrite=args.overwrite)
    print(f"wrote {written} (the labels of {args.labels} on the grid of {seg.series})")
    return 0


# ---------------------------------------------------------------------------- info
def _add_info(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("info", help="version, devices and model metadata")
    p.add_argument("model", type=Path, nargs="?", default=None, metavar="MODEL.kseg",
                   help="a model file, as --weights gives it")
    p.add_argument("--weights", type=Path, default=None, help="a model file (.kseg); default: the shipped model")
    p.add_argument("--json", action="store_true",
                   help="print the model's whole metadata as JSON (training commands, case lists, hashes) instead")
    p.set_defaults(func=cmd_info)


def cmd_info(args: argparse.Namespace) -> int:
    import json

    import torch

    from . import __version__
    from .checkpoint import load_bundle, model_summary, provenance_summary, read_metadata
    from .device import describe_devices
    from .weights import default_weights_path

    if args.model is not None and args.weights is not None and args.model != args.weights:
        raise CliError(f"two models given ({args.model} and --weights {args.weights}); info reads one")
    args.weights = args.weights or args.model
    if not args.json:
        print(f"kitseg {__version__} (torch {torch.__version__}, python {sys.version.split()[0]})")
        print(f"devices: {describe_devices()}")
    try:
        path = args.weights or default_weights_path()
    except FileNotFoundError as exc:
        if args.json:
            raise CliError(f"no model to describe: {exc}") from exc
        print(f"weights: none ({exc})")
        return 0
    meta = read_metadata(path)
    if args.json:
        print(json.dumps(meta, indent=2, sort_keys=True))
    else:
        print(f"weights: {path}")
        for what, text in model_summary(meta).items():
            print(f"  {what}: {text}")
        for line in provenance_summary(meta):
            print(f"  {line}")
        print("  (training commands, case lists and hashes: kits-seg info --json)")
    load_bundle(path)  # the metadata can read well in a file whose weights predict would refuse: say so
    return 0


# ---------------------------------------------------------------------------- phantom
def _add_phantom(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "phantom",
        help="synthetic CT around real KiTS19 masks",
        description="Read KiTS-layout masks (DIR/case_XXXXX/segmentation.nii.gz, or KiTS21's "
        "aggregated_MAJ_seg.nii.gz) and write KiTS19-layout "
        "cases with a synthetic CT in HU (imaging.nii.gz) and the mask, on the same grid.",
    )
    p.add_argument("--masks", type=Path, required=True, help="folder of KiTS case folders with masks "
                   "(segmentation.nii.gz, or KiTS21's aggregated_MAJ_seg.nii.gz)")
    p.add_argument("--out", type=Path, required=True, help="output folder")
    p.add_argument("--seed", type=_non_negative_int, default=0,
                   help="draw seed (default 0); each case's own seed comes from this and its name, so a case "
                   "looks the same whatever the order, subset or --workers")
    p.add_argument("--cases", nargs="+", default=None, help="case folder names (default: all)")
    p.add_argument("--overwrite", action="store_true", help="regenerate cases that exist already")
    p.add_argument(
        "--workers",
        type=_positive_int,
        default=1,
        metavar="N",
        help="draw N cases at once in N processes (the same images as one; each holds its case in memory: "
        "peak 0.7 GB for a median KiTS19 mask, 1.8 GB for the largest of cases 0-149)",
    )
    p.add_argument(
        "--params",
        default=None,
        metavar="JSON",
        help='randomization ranges and switches to change: a JSON file, or the object itself, e.g. '
        '\'{"noise_sigma_hu": [5, 15], "adrenal_probability": 0, "medulla": "blobs"}\' '
        "(kitseg.phantom.params.PhantomParams; the rest keep their defaults)",
    )
    add_map_labels_argument(p, "draw masks of another convention, their values mapped onto", "drawn as kidney "
                            "(recorded in each case's phantom.json; the masks written hold the mapped values)")
    p.set_defaults(func=cmd_phantom)


def cmd_phantom(args: argparse.Namespace) -> int:
    from .phantom.realistic import MaskReadError, generate_phantom_dataset, plan_phantom_dataset

    if not args.masks.is_dir():
        raise CliError(f"{args.masks}: no such folder")
    if args.out.exists() and args.out.resolve() == args.masks.resolve():
        raise CliError(f"{args.out}: is the --masks folder; the phantoms' masks would replace the real ones there")
    params = _read_phantom_params(args.params) if args.params else None
    mapping = parse_map_labels(args.map_labels)
    try:
        cases, drawn = plan_phantom_dataset(args.masks, args.out, args.cases, args.overwrite)
        generate_phantom_dataset(
            args.masks, args.out, cases=cases, seed=args.seed, progress=True, overwrite=args.overwrite,
            params=params, workers=args.workers, mapping=mapping,
        )
    except (MaskReadError, FileNotFoundError, FileExistsError, NotADirectoryError) as exc:
        raise CliError(str(exc)) from exc
    kept = len(cases) - len(drawn)
    print(f"drew {len(drawn)} case(s) into {args.out}"
          + (f"; {kept} already there, kept (--overwrite draws them again)" if kept else ""))
    return 0


def _read_phantom_params(text: str):
    """``--params``: a JSON object written inline (it starts with ``{``) or the path of a file holding one."""
    import json

    from .phantom.params import PhantomParams

    inline = text.lstrip().startswith("{")
    where = "--params" if inline else text
    try:
        data = json.loads(text if inline else Path(text).read_text())
    except (OSError, ValueError) as exc:
        raise CliError(f"{where}: cannot read phantom parameters as JSON ({exc})") from exc
    if not isinstance(data, dict):
        raise CliError(f"{where}: phantom parameters must be a JSON object of field: value")
    try:
        return PhantomParams.from_dict(data)
    except (TypeError, ValueError) as exc:
        raise CliError(f"{where}: {exc}") from exc


# ---------------------------------------------------------------------------- sample
def _add_sample(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "sample",
        help="write the built-in synthetic sample case",
        description="Write the built-in sample case (synthetic abdomen CT with a kidney tumor, made by this "
        "package's phantom generator) as a KiTS19 case folder OUT/case_00000 (imaging + segmentation).",
    )
    p.add_argument("--out", type=Path, required=True, help="folder to write case_00000/ into")
    p.add_argument("--seed", type=_non_negative_int, default=0,
                   help="draw seed of the synthetic case (default 0: the sample the README and the plugin show)")
    p.set_defaults(func=cmd_sample)


def cmd_sample(args: argparse.Namespace) -> int:
    from .io import case_image_file, case_labels_file
    from .phantom import make_sample_case

    _check_output_folder(args.out, "--out")
    folder = args.out / "case_00000"
    # A KiTS19 case folder often holds its mask before its image (packed or not): neither is ever replaced or hidden.
    taken = [path.name for path in (case_image_file(folder), case_labels_file(folder)) if path is not None]
    if taken:
        raise CliError(f"{folder}: holds {' and '.join(taken)} already; write the sample into another --out folder")
    make_sample_case(seed=args.seed).save_case_folder(folder)
    print(f"wrote {folder}")
    return 0


# ---------------------------------------------------------------------------- main
def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(
        prog="kits-seg", description="Kidney and kidney-tumor segmentation in abdominal CT (KiTS19 two-stage method)."
    )
    parser.add_argument("--version", action="version", version=f"kits-seg {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log more")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_predict(sub)
    _add_evaluate(sub)
    _add_dicom_seg(sub)
    _add_info(sub)
    _add_phantom(sub)
    _add_sample(sub)
    from .training.cli import add_train_parser

    add_train_parser(sub)
    return parser


class _BarSafeHandler(logging.StreamHandler):
    """Log lines on lines of their own above a progress bar (through tqdm), not glued to its end."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            from tqdm import tqdm

            tqdm.write(self.format(record), file=self.stream)
        except Exception:  # as logging's own handlers do: a failed log line never stops the work
            self.handleError(record)


def main(argv: Sequence[str] | None = None) -> int:
    from .interrupt import stop_on_signals

    with stop_on_signals():
        return _main(argv)


def _main(argv: Sequence[str] | None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s", handlers=[_BarSafeHandler()])
    if not args.verbose:  # highdicom says each attribute it copies into a SEG at INFO
        logging.getLogger("highdicom").setLevel(logging.WARNING)
    from .checkpoint import CheckpointError
    from .config import ConfigError
    from .interrupt import Terminated
    from .io import InputError

    try:
        status = args.func(args)
        sys.stdout.flush()  # so that a closed pipe shows here, in the handler below, not at exit
        return status
    except (CliError, InputError, CheckpointError, ConfigError, FileExistsError, FileNotFoundError) as exc:
        print(f"kits-seg: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:
        terminated = isinstance(exc, Terminated)  # SIGTERM (kitseg.interrupt)
        print(f"kits-seg: {'stopped (SIGTERM)' if terminated else 'interrupted'}", file=sys.stderr)
        return 128 + (signal.SIGTERM if terminated else signal.SIGINT)
    except BrokenPipeError:
        # The reader went away (`kits-seg info | head`): stop quietly, as Unix tools do; point stdout
        # at /dev/null so that the interpreter's own flush at exit does not fail again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except OSError as exc:  # the system's refusal (disk full, no permission), not a fault of the tool
        where = f": {exc.filename}" if exc.filename else ""
        print(f"kits-seg: error: {exc.strerror or exc}{where}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
