"""Realistic synthetic CT around real KiTS19 kidney/tumor masks (the SynthSeg idea).

The real label map fixes the kidneys and the tumor; everything else is drawn per case: an
abdomen placed consistently around the kidneys (:mod:`.anatomy`), the inside of the kidneys
and the tumor's look (:mod:`.kidney`), and what scanners and protocols vary: contrast phase,
noise level and texture, blur, calibration, field of view (:mod:`.params`). A network trained
on many such draws must learn shape and context, not one intensity (Billot et al., SynthSeg,
Medical Image Analysis 2023).

Arrays are (Z, Y, X) in the internal orientation (axis codes I, P, L).
"""

from __future__ import annotations

import contextlib
import dataclasses
import glob
import json
import logging
import os
import re
import shutil
import zlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from scipy import ndimage

from ..config import apply_label_mapping, label_mapping_text
from ..geometry import Volume, voxel_spacing
from ..io import KITS21_LABELS, InputError, case_image_file, case_labels_file, layout_hint, name_a_few, read_labels
from ..parallel import one_blas_thread, stop_workers
from ._grid import _axis_weights, block_any, coarse_factors, coarse_shape, upsample_axis
from ._nifti import IMAGING_NAME, SEGMENTATION_NAME, save_nifti_atomic
from .anatomy import build_abdomen, find_kidneys, make_frame
from .extra_tumors import add_synthetic_tumors
from .kidney import TumorLook, foreground_crop, kidney_crop_hu
from .params import PhantomParams, Protocol, sample_protocol

logger = logging.getLogger(__name__)

HU_MIN, HU_MAX = -1024, 3071
_SLAB = 16  # slices assembled at a time: bounds the memory of the full-resolution steps
_EXTRA_TUMOR_STREAM = 2  # second seed word of the extra tumors' random stream


class MaskReadError(ValueError):
    """A KiTS19 mask could not be read or is not a label map (0, 1, 2)."""


def synthesize_ct(
    labels: np.ndarray,
    spacing: tuple[float, float, float],
    rng: np.random.Generator,
    params: PhantomParams | None = None,
) -> np.ndarray:
    """A synthetic CT (int16 HU) whose kidneys and tumor are exactly ``labels``.

    Args:
        labels: (Z, Y, X) label map in the internal orientation: 0 background, 1 kidney, 2 tumor.
        spacing: (sz, sy, sx) voxel size in mm.
        rng: the source of every random choice (same generator state, same image).
        params: the ranges to draw from; defaults to :class:`PhantomParams()`.

    Returns:
        (Z, Y, X) int16 array in Hounsfield units, clipped to [-1024, 3071].
    """
    image, _ = synthesize_ct_with_protocol(labels, spacing, rng, params)
    return image


def synthesize_ct_with_protocol(
    labels: np.ndarray,
    spacing: tuple[float, float, float],
    rng: np.random.Generator,
    params: PhantomParams | None = None,
) -> tuple[np.ndarray, Protocol]:
    """:func:`synthesize_ct`, also returning the drawn :class:`Protocol` (phase, tissue HU, noise...)."""
    image, protocol, _ = _synthesize(labels, spacing, rng, params)
    return image, protocol


def _synthesize(
    labels: np.ndarray,
    spacing: tuple[float, float, float],
    rng: np.random.Generator,
    params: PhantomParams | None = None,
) -> tuple[np.ndarray, Protocol, TumorLook | None]:
    """The image, its protocol and its tumor's look (None when no label map region was painted)."""
    params = PhantomParams() if params is None else params
    labels = _check_labels(labels)
    spacing = tuple(float(s) for s in spacing)
    if len(spacing) != 3 or not all(np.isfinite(s) and s > 0 for s in spacing):
        raise ValueError(f"spacing must be three positive numbers in mm (sz, sy, sx), got {spacing}")
    protocol = sample_protocol(rng, params)
    shape = labels.shape
    cs = params.coarse_spacing_mm
    factors = coarse_factors(spacing, (1.5 * cs, cs, cs))
    cspacing = tuple(d * f for d, f in zip(spacing, factors))
    cshape = coarse_shape(shape, factors)
    coords = tuple((np.arange(c) * f + (f - 1) / 2) * d for c, f, d in zip(cshape, factors, spacing))
    foreground = block_any(labels > 0, factors)
    kidneys = find_kidneys(foreground, coords, image_centre_x=(shape[2] - 1) / 2 * spacing[2])
    extent = tuple(n * d for n, d in zip(shape, spacing))
    frame = make_frame(kidneys, extent, rng)
    coarse = build_abdomen(foreground, coords, cspacing, frame, protocol, params, rng)
    if factors[0] == 1 and protocol.slice_blur_fraction > 0.2:
        coarse = ndimage.gaussian_filter1d(coarse, protocol.slice_blur_fraction, axis=0, truncate=3.0)

    crop = foreground_crop(labels, spacing, margin_mm=8.0)
    crop_hu, look = None, None
    if crop is not None:
        background = _upsample_region(coarse, factors, shape, crop)
        crop_hu, look = kidney_crop_hu(labels[crop], background, spacing, crop[2].start * spacing[2],
                                 frame.spine_x, protocol, params, rng)

    fov = _fov_outside(shape, spacing, rng) if protocol.fov_circle else None
    noise_factor = 2 if spacing[1] < 0.9 and spacing[2] < 0.9 else 1
    out = np.empty(shape, dtype=np.int16)
    for start in range(0, shape[0], _SLAB):
        zs = slice(start, min(start + _SLAB, shape[0]))
        slab = _upsample_region(coarse, factors, shape, (zs, slice(0, shape[1]), slice(0, shape[2])))
        if crop_hu is not None:
            lo, hi = max(zs.start, crop[0].start), min(zs.stop, crop[0].stop)
            if lo < hi:
                slab[lo - start: hi - start, crop[1], crop[2]] = crop_hu[lo - crop[0].start: hi - crop[0].start]
        slab += protocol.noise_sigma_hu * _correlated_noise(rng, slab.shape, protocol.noise_correlation_px, noise_factor)
        slab *= protocol.hu_scale
        slab += protocol.hu_offset
        if fov is not None:
            slab[:, fov] = HU_MIN
        np.clip(slab, HU_MIN, HU_MAX, out=slab)
        out[zs] = np.rint(slab)
    return out, protocol, look


def _check_labels(labels: np.ndarray) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.ndim != 3:
        raise ValueError(f"labels must be a 3D (Z, Y, X) array, got shape {labels.shape}")
    if not (np.issubdtype(labels.dtype, np.integer) or labels.dtype == bool):
        if not np.all(np.isfinite(labels)) or np.any(labels != np.round(labels)):
            raise ValueError("labels must hold integer values 0, 1, 2")
    low, high = int(labels.min(initial=0)), int(labels.max(initial=0))
    if low < 0 or high > 2:
        hint = " (KiTS21/23 masks: label 3 is a cyst; --map-labels 3=1 draws it as kidney)" if high == 3 and low >= 0 else ""
        raise ValueError(f"labels must be 0 (background), 1 (kidney) or 2 (tumor); found values in [{low}, {high}]{hint}")
    return labels.astype(np.uint8, copy=False)


def _upsample_region(coarse: np.ndarray, factors, shape, region: tuple[slice, ...]) -> np.ndarray:
    """The fine-grid values of ``coarse`` (linear interpolation) over ``region`` only."""
    out = coarse
    # Restrict the coarse array to the rows it needs first, so the work scales with the region.
    for axis in (0, 1, 2):
        i0, i1, _ = _axis_weights(shape[axis], coarse.shape[axis], factors[axis])
        sl = region[axis]
        lo, hi = int(i0[sl].min()), int(i1[sl].max()) + 1
        out = np.take(out, np.arange(lo, hi), axis=axis)
        region = region[:axis] + ((sl, lo),) + region[axis + 1:]
    for axis in (2, 1, 0):
        sl, lo = region[axis]
        i0, i1, w = _axis_weights(shape[axis], coarse.shape[axis], factors[axis])
        out = _lerp(out, axis, i0[sl] - lo, i1[sl] - lo, w[sl])
    return out.astype(np.float32, copy=False)


def _lerp(array: np.ndarray, axis: int, i0: np.ndarray, i1: np.ndarray, w: np.ndarray) -> np.ndarray:
    shape = [1] * array.ndim
    shape[axis] = len(w)
    a0 = np.take(array, i0, axis=axis)
    a1 = np.take(array, i1, axis=axis)
    a1 -= a0
    a1 *= w.reshape(shape)
    a0 += a1
    return a0


def _correlated_noise(rng: np.random.Generator, shape: tuple[int, int, int], correlation_px: float,
                      factor: int) -> np.ndarray:
    """Unit-variance noise, correlated in-plane over ``correlation_px`` pixels (CT noise texture).

    Drawn on a grid ``factor`` times coarser in-plane (fewer random numbers), smoothed there and
    up-sampled; the slice axis stays uncorrelated, as in reconstructed CT.
    """
    nz, ny, nx = shape
    small = (nz, -(-ny // factor), -(-nx // factor))
    noise = rng.standard_normal(small, dtype=np.float32)
    sigma = max(correlation_px / factor, 0.0)
    if sigma > 0.25:
        noise = ndimage.gaussian_filter(noise, (0, sigma, sigma), mode="wrap", truncate=3.0)
    if factor > 1:
        noise = upsample_axis(noise, 2, factor, nx)
        noise = upsample_axis(noise, 1, factor, ny)
    std = float(noise[:, ::3, ::3].std())
    noise /= max(std, 1e-6)
    return noise


def _fov_outside(shape, spacing, rng: np.random.Generator) -> np.ndarray:
    """(Y, X) mask of pixels outside the scanner's reconstruction circle."""
    ny, nx = shape[1], shape[2]
    radius = 0.5 * min(ny * spacing[1], nx * spacing[2]) * float(rng.uniform(0.97, 1.03))
    y = (np.arange(ny) - (ny - 1) / 2) * spacing[1]
    x = (np.arange(nx) - (nx - 1) / 2) * spacing[2]
    return (y[:, None] ** 2 + x[None, :] ** 2) > radius**2


# ---------------------------------------------------------------------------- files and datasets


@dataclasses.dataclass(frozen=True)
class _Mask:
    volume: Volume  # internal orientation
    affine: np.ndarray  # the file's own affine
    source_array: np.ndarray  # uint8, the file's grid


def read_kits_mask(path: Path, mapping: dict[int, int] | None = None) -> _Mask:
    """Read a KiTS19 segmentation (any integer type, e.g. uint16) as uint8 labels 0/1/2, its
    values first mapped by ``mapping`` (KiTS21/23's cysts: ``{3: 1}``; :func:`kitseg.config.label_mapping`)."""
    path = Path(path)
    try:
        volume = read_labels(path)  # the engine's reader: geometry, dtype and range checks
    except InputError as exc:
        raise MaskReadError(f"cannot read the mask {exc}") from exc
    volume.array = apply_label_mapping(volume.array, mapping or {})
    try:
        volume.array = _check_labels(volume.array)
    except ValueError as exc:
        raise MaskReadError(f"the mask {path} is not a KiTS19 label map: {exc}") from exc
    return _Mask(volume, volume.source.affine, volume.to_source())


def generate_phantom_case(mask_path: Path, out_folder: Path, seed: int,
                          params: PhantomParams | None = None, mapping: dict[int, int] | None = None) -> Path:
    """Write a phantom case in KiTS19 layout around the real mask ``mask_path``.

    ``out_folder/imaging.nii.gz`` (int16 HU) and ``out_folder/segmentation.nii.gz`` (the mask as
    uint8, with the tumors ``params.extra_tumors`` adds) share the mask's shape, affine and
    orientation code (and qform). ``out_folder/phantom.json`` records the draw (:func:`draw_record`):
    the contrast phase and scanner settings, the tumor's look and its measured contrast, so that
    scores can be read by what a case shows. All three are drawn into a hidden folder beside
    ``out_folder`` and then moved into place: a new case is renamed in whole; a redraw's files are
    swapped in (the old image removed, the mask and the record, the image last), so a folder with
    ``imaging.nii.gz`` always holds a matching set. ``mapping``: the mask's values mapped onto
    KiTS19's first (:func:`read_kits_mask`); the phantom's mask holds the mapped values.
    Returns ``out_folder``.
    """
    mask = read_kits_mask(Path(mask_path), mapping)
    volume = mask.volume
    if not volume.array.any():
        logger.warning("%s: the mask holds no kidney: its phantom is an abdomen without kidneys", mask_path)
    spacing = voxel_spacing(volume.affine)
    params = PhantomParams() if params is None else params
    labels, labels_in_source = volume.array, mask.source_array
    extra_tumors = 0
    if params.extra_tumors[1] > 0:
        # A stream of its own, so that the case's protocol (drawn first) stays the mask's own.
        tumor_rng = np.random.default_rng([seed, _EXTRA_TUMOR_STREAM])
        extra_tumors = int(tumor_rng.integers(params.extra_tumors[0], params.extra_tumors[1] + 1))
        labels = add_synthetic_tumors(labels, spacing, tumor_rng, extra_tumors, params.extra_tumor_ml)
        labels_in_source = volume.like(labels).to_source()
    rng = np.random.default_rng(seed)
    ct, protocol, look = _synthesize(labels, spacing, rng, params)
    logger.debug("phantom %s: phase %s, noise %.1f HU", mask_path, protocol.phase, protocol.noise_sigma_hu)
    record = draw_record(Path(mask_path), seed, params, protocol, look, extra_tumors,
                         measure_tumor_contrast(ct, labels, spacing), mapping)
    out_folder = Path(out_folder)
    out_folder.parent.mkdir(parents=True, exist_ok=True)
    # Drawn whole into a hidden folder of its own, then moved into place: a killed run leaves
    # no half case, and the old case of a redraw stays intact until the last moment.
    partial = out_folder.parent / f"{_PARTIAL_PREFIX}{out_folder.name}.{os.getpid()}"
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir()
    source = volume.source  # its orientation code and qform: the phantom claims what the mask claims
    save_nifti_atomic(labels_in_source, mask.affine, partial / SEGMENTATION_NAME,
                      xform_code=source.xform_code, qform=source.qform)
    (partial / RECORD_NAME).write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")
    save_nifti_atomic(volume.like(ct).to_source(), mask.affine, partial / IMAGING_NAME,
                      xform_code=source.xform_code, qform=source.qform)
    try:
        os.rename(partial, out_folder)  # a new case appears whole
    except OSError:
        if not out_folder.is_dir():
            raise
        # A redraw (or another process drew it meanwhile): swap the files in, the image last,
        # so the old image never stays beside the new mask. Other files in the folder are kept.
        (out_folder / IMAGING_NAME).unlink(missing_ok=True)
        os.replace(partial / SEGMENTATION_NAME, out_folder / SEGMENTATION_NAME)
        os.replace(partial / RECORD_NAME, out_folder / RECORD_NAME)
        os.replace(partial / IMAGING_NAME, out_folder / IMAGING_NAME)
        shutil.rmtree(partial, ignore_errors=True)
    return out_folder


#: Hidden folders a case is drawn into before it is renamed into place (left by a killed run).
_PARTIAL_PREFIX = ".partial-"

#: Each phantom case's record of its draw, beside its image and mask.
RECORD_NAME = "phantom.json"
RECORD_FORMAT = "kitseg-phantom-record"
#: The kidney around a tumor whose mean HU the record compares with the tumor's.
CONTRAST_SHELL_MM = 5.0


def measure_tumor_contrast(ct: np.ndarray, labels: np.ndarray, spacing: tuple[float, float, float],
                           shell_mm: float = CONTRAST_SHELL_MM) -> dict[str, float] | None:
    """What the drawn image shows of the tumor (label 2): its volume, its mean HU and spread,
    and the mean HU of the kidney (label 1) within ``shell_mm`` of it, noise included.

    How far the tumor stands out from the kidney beside it is what a reader (or a network) can go
    by; the drawn look alone does not say it, since blur, noise and calibration come after.
    None when the mask holds no tumor; the kidney's value is None when no kidney lies that near.
    """
    tumor = labels == 2
    box = foreground_crop(tumor, spacing, margin_mm=shell_mm + max(spacing))
    if box is None:
        return None
    tumor, kidney, hu = tumor[box], labels[box] == 1, ct[box].astype(np.float64)
    shell = kidney & (ndimage.distance_transform_edt(~tumor, sampling=spacing) <= shell_mm)
    voxel_ml = float(np.prod(spacing)) / 1000.0
    return {
        "tumor_ml": round(float(tumor.sum()) * voxel_ml, 3),
        "tumor_hu_mean": round(float(hu[tumor].mean()), 1),
        "tumor_hu_sd": round(float(hu[tumor].std()), 1),
        "kidney_near_tumor_hu_mean": round(float(hu[shell].mean()), 1) if shell.any() else None,
        "shell_mm": shell_mm,
    }


def draw_record(mask_path: Path, case_seed: int, params: PhantomParams, protocol: Protocol,
                look: TumorLook | None, extra_tumors: int, measured: dict[str, float] | None,
                mapping: dict[int, int] | None = None) -> dict:
    """The JSON record of one phantom case (``phantom.json``).

    ``case_seed`` with ``params`` (and the ``label_mapping`` of the mask, where one was given)
    redraws the case (:func:`generate_phantom_case`); the
    protocol, the tumor's look (None without a tumor) and the measured contrast say what it shows.
    """
    from .. import __version__

    def rounded(value):
        if isinstance(value, float):
            return round(value, 3)
        if isinstance(value, dict):
            return {k: rounded(v) for k, v in value.items()}
        return value

    record = {
        "format": RECORD_FORMAT,
        "kitseg_version": __version__,
        "mask": str(mask_path),
        "case_seed": int(case_seed),
        "extra_tumors": int(extra_tumors),
        "protocol": rounded(dataclasses.asdict(protocol)),
        "tumor_look": rounded(dataclasses.asdict(look)) if look is not None and measured is not None else None,
        "measured_tumor": measured,
        "params": params.to_dict(),
    }
    if mapping:
        record["label_mapping"] = label_mapping_text(mapping)
    return record


def _remove_leftovers(folder: Path) -> None:
    """Remove what a killed run had begun of this case: its partial folders (not those of a process
    still drawing it) and temporary files in the case folder."""
    for partial in folder.parent.glob(f"{glob.escape(_PARTIAL_PREFIX + folder.name)}.*"):
        pid = partial.name.rsplit(".", 1)[-1]
        if pid.isdigit() and int(pid) != os.getpid() and _process_alive(int(pid)):
            continue
        shutil.rmtree(partial, ignore_errors=True)
    for name in (IMAGING_NAME, SEGMENTATION_NAME):
        for temporary in folder.glob(f"{glob.escape('.' + name)}.*"):
            temporary.unlink(missing_ok=True)


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True  # someone else's process (or no way to tell): leave its folder alone
    return True


def is_complete_case(folder: Path) -> bool:
    """A case folder this generator finished, or a user's whole case (unpacked too): both files (the
    image is always written last); one is never written beside the other, which it would hide."""
    return case_image_file(folder) is not None and case_labels_file(folder) is not None


def _check_out_folders(masks_dir: Path, folders: list[Path], overwrite: bool) -> None:
    """Refuse output case folders that are the masks' own, or that hold a mask this tool did not write."""
    masks_root = masks_dir.resolve()
    into_masks = [str(f) for f in folders if f.exists() and f.resolve().parent == masks_root]
    if into_masks:
        raise FileExistsError(f"{', '.join(into_masks)}: case folder(s) of --masks {masks_dir} (linked?): "
                              "the phantoms would be written over the real masks")
    if overwrite:
        return  # a mask file there is replaced (a link is replaced, not what it points to)
    foreign = [str(case_labels_file(f)) for f in folders if case_labels_file(f) and case_image_file(f) is None]
    if foreign:
        raise FileExistsError(
            f"{name_a_few(foreign)}: a mask without its image, which this tool "
            "does not leave (it writes a case whole), so it may be yours: not replaced. Choose another --out, "
            "or pass --overwrite to draw these cases again")


def case_seed(seed: int, case_id: str) -> int:
    """The seed of one case: a function of (seed, case id) only, not of the order of generation.

    ``case_XXXXX`` keys on its number (the draws made so far); any other name on the whole name,
    so that ``case_00001_v2`` and ``case_00012`` get draws of their own.
    """
    if seed < 0:
        raise ValueError(f"the seed must be a whole number >= 0, got {seed}")
    number = re.fullmatch(r"case_(\d+)", case_id)
    key = int(number.group(1)) if number else zlib.crc32(case_id.encode())
    return int(np.random.SeedSequence([int(seed), key]).generate_state(1)[0])


def plan_phantom_dataset(masks_dir: Path, out_dir: Path, cases: list[str] | None = None,
                         overwrite: bool = False) -> tuple[list[str], list[str]]:
    """The cases a dataset run covers and, of those, the ones it will draw (the rest are there
    already); raises, naming the problem, for a run that must not start."""
    masks_dir, out_dir = Path(masks_dir), Path(out_dir)
    if not masks_dir.is_dir():
        raise FileNotFoundError(f"masks folder not found: {masks_dir}")
    if cases is None:
        folders = [p for p in sorted(masks_dir.iterdir()) if p.is_dir() and not p.name.startswith(".")]
        cases = [p.name for p in folders if case_labels_file(p)]
        if not cases:
            nnunet = (" (nnU-Net's label files are not read here: put each NAME.nii.gz into a folder NAME as "
                      f"{SEGMENTATION_NAME})" if masks_dir.name.startswith("labels") or (masks_dir / "labelsTr").is_dir()
                      else layout_hint(masks_dir))
            raise FileNotFoundError(f"no case_XXXXX/{SEGMENTATION_NAME} (or KiTS21's {KITS21_LABELS}) "
                                    f"under {masks_dir}{nnunet}")
        without = [p.name for p in folders if p.name.startswith("case_") and not case_labels_file(p)]
        if without:  # KiTS21 cases with their annotators' own maps only, a copy cut short
            logger.warning("%s: %d case folder(s) without %s or %s are not drawn: %s", masks_dir, len(without),
                           SEGMENTATION_NAME, KITS21_LABELS, name_a_few(without))
    else:
        cases = list(dict.fromkeys(cases))  # a case named twice is drawn once
        missing = [c for c in cases if not case_labels_file(masks_dir / c)]
        if missing:
            raise FileNotFoundError(f"no {SEGMENTATION_NAME} (or KiTS21's {KITS21_LABELS}) for case(s) "
                                    f"{', '.join(missing)} under {masks_dir}")
    if out_dir.exists() and not out_dir.is_dir():
        raise NotADirectoryError(f"{out_dir}: is a file, not an output folder")
    _check_out_folders(masks_dir, [out_dir / case for case in cases], overwrite)
    return cases, [case for case in cases if overwrite or not is_complete_case(out_dir / case)]


def iter_phantom_dataset(
    masks_dir: Path,
    out_dir: Path,
    cases: list[str] | None = None,
    seed: int = 0,
    overwrite: bool = False,
    params: PhantomParams | None = None,
    workers: int = 1,
    mapping: dict[int, int] | None = None,
) -> Iterator[tuple[int, int, Path]]:
    """Generate phantoms case by case, yielding ``(done, total, case_folder)`` after each.

    A generator so that a GUI worker can show progress and stop between cases. ``workers > 1``
    draws that many cases at once in worker processes (the same images: each case's seed is its
    own); stopping early cancels the cases not yet started. A mask that cannot be read or is no
    KiTS19 label map does not stop the others: after the last case, one ``MaskReadError`` names
    every such mask. ``mapping``: as for :func:`generate_phantom_case`.
    """
    if workers < 1:
        raise ValueError(f"workers must be at least 1, not {workers}")
    masks_dir, out_dir = Path(masks_dir), Path(out_dir)
    cases, drawn = plan_phantom_dataset(masks_dir, out_dir, cases, overwrite)
    folders = [out_dir / case for case in cases]
    todo = [(case_labels_file(masks_dir / case), out_dir / case, case_seed(seed, case), params, mapping)
            for case in drawn]
    for folder in folders:
        _remove_leftovers(folder)
    to_draw = {job[1] for job in todo}
    done = 0
    for folder in folders:
        if folder not in to_draw:
            logger.info("skipping %s: already written", folder)
            done += 1
            yield done, len(folders), folder
    unreadable: dict[str, str] = {}  # case -> why its mask cannot be used
    with contextlib.closing(_draw_cases(todo, workers)) as drawn_cases:  # closed early: the pool stops
        for folder, refusal in drawn_cases:
            if refusal is not None:
                unreadable[folder.name] = refusal
                continue
            done += 1
            yield done, len(folders), folder
    if unreadable:
        raise MaskReadError(
            f"{len(unreadable)} of {len(folders)} case(s) not drawn, their masks not usable "
            f"({done} other case(s) are in {out_dir}):\n  " + "\n  ".join(unreadable[c] for c in sorted(unreadable)))


def _draw_case(mask_path: Path, out_folder: Path, seed: int, params: PhantomParams | None,
               mapping: dict[int, int] | None = None) -> tuple[Path, str | None]:
    """``generate_phantom_case``, with an unusable mask returned as (folder, why) rather than raised."""
    try:
        return generate_phantom_case(mask_path, out_folder, seed, params, mapping), None
    except MaskReadError as exc:
        return Path(out_folder), str(exc)


def _draw_cases(todo: list[tuple], workers: int) -> Iterator[tuple[Path, str | None]]:
    """``_draw_case`` of each job, in this process or ``workers`` processes, as each finishes."""
    if workers == 1 or len(todo) <= 1:
        for job in todo:
            yield _draw_case(*job)
        return
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

    pool = ProcessPoolExecutor(max_workers=min(workers, len(todo)), initializer=one_blas_thread)
    try:
        pending = {pool.submit(_draw_case, *job) for job in todo}
        while pending:
            finished, pending = wait(pending, return_when=FIRST_COMPLETED)
            for future in finished:
                yield future.result()  # any other error of a worker is raised here
    except (KeyboardInterrupt, GeneratorExit):  # stopped: the cases being drawn are left (a rerun draws them)
        stop_workers(pool)
        raise
    finally:
        pool.shutdown(wait=True, cancel_futures=True)  # after an error: the cases being drawn are finished


def generate_phantom_dataset(
    masks_dir: Path,
    out_dir: Path,
    cases: list[str] | None = None,
    seed: int = 0,
    progress: bool = True,
    overwrite: bool = False,
    params: PhantomParams | None = None,
    workers: int = 1,
    mapping: dict[int, int] | None = None,
) -> list[Path]:
    """Phantoms for every case (or ``cases``) of a KiTS19 masks folder: ``out_dir/case_XXXXX/``.

    Per-case seeds come from (``seed``, case id), so a case looks the same whatever the order,
    subset or number of ``workers`` (processes drawing cases at once). Cases already written are
    skipped unless ``overwrite``. ``mapping``: as for :func:`generate_phantom_case`. Returns the
    case folders, in the order of ``cases``.
    """
    steps = iter_phantom_dataset(masks_dir, out_dir, cases, seed, overwrite, params, workers, mapping)
    folders: list[Path] = []
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(cases) if cases is not None else None, desc="phantoms", unit="case")
        with bar:
            for done, total, folder in steps:
                bar.total = total
                bar.update(1)
                folders.append(folder)
    else:
        folders = [folder for _, _, folder in steps]
    # Workers finish in any order; the caller gets the order of ``cases`` (by name by default).
    position = {name: i for i, name in enumerate(cases)} if cases is not None else {}
    return sorted(folders, key=lambda folder: (position.get(folder.name, 0), folder.name))
