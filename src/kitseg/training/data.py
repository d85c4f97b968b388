"""Training data: KiTS-layout cases (or nnU-Net's raw layout) on the stage grid, sampled as 2D slices.

Cases are preprocessed once with the same code as inference (:func:`kitseg.preprocess.prepare`),
so phantoms and real KiTS19 data take exactly the path a user's CT takes at prediction time, and
cached as ``.npy`` files (float16 image, uint8 labels) that training maps into memory rather
than reads: the 150 KiTS19 geometries at native in-plane resolution (the ``paper`` preset) are
2.9 G voxels on the stage grid, 23 GB per process once float32 images, labels, masks and y1 were
held in memory, more than many GPU workstations' RAM; mapped, the kernel keeps what sampling
touches, and ``torchrun`` ranks on one machine share the pages instead of holding a copy each.
"""

from __future__ import annotations

import errno
import glob
import hashlib
import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from ..atomic import atomic_path, require_free_space
from ..config import KITS_LABELS, ConfigError, MaskConfig, PreprocessingConfig, apply_label_mapping
from ..geometry import source_grid_for
from ..io import (KITS21_LABELS, CaseInput, InputError, discover_inputs, is_case_image, name_a_few,
                  layout_hint, nnunet_training_cases, read_ct, read_labels)
from ..morphology import dilate_ball
from ..parallel import one_blas_thread, stop_workers
from ..pipeline import neighbour_indices
from ..preprocess import StageGrid, prepare
from .config import TUMOR_SAMPLING

log = logging.getLogger(__name__)


@dataclass
class StageCase:
    """One case on the stage grid.

    image: normalized intensities (Zs, Ys, Xs), float16 as prepared for training (float32 is
    accepted: tests build cases by hand); labels: uint8, same shape. Both are read-only
    memory maps of the cache when the case came from one: index them, and cast what is cut out.
    cache_stem: where arrays derived from the case (training masks) are cached beside it; None
    keeps them in memory.
    """

    name: str
    image: np.ndarray
    labels: np.ndarray
    spacing: tuple[float, float, float]
    cache_stem: Path | None = None

    @property
    def foreground_slices(self) -> np.ndarray:
        return np.flatnonzero((self.labels > 0).any(axis=(1, 2)))

    @property
    def tumor_slices(self) -> np.ndarray:
        return np.flatnonzero((self.labels == 2).any(axis=(1, 2)))


def labels_to_stage(labels: np.ndarray, grid: StageGrid, num_classes: int = 3) -> np.ndarray:
    """Resample a label map like predictions come back: per-class fractions, then argmax."""
    fractions = np.stack([grid.to_stage((labels == c).astype(np.uint8)) for c in range(num_classes)])
    return np.argmax(fractions, axis=0).astype(np.uint8)


def training_mask(case: StageCase, mask: MaskConfig) -> np.ndarray:
    """Where stage 2 trains: the labelled foreground dilated by the mask's ball, as the paper trains.

    Cached beside a cached case (one file per mask recipe) and returned memory-mapped.
    """
    if case.cache_stem is None:
        return dilate_ball(case.labels > 0, mask.radius, mask.dilation_spacing(case.spacing))
    recipe = _digest(mask.to_dict(), 12)
    path = _beside(case.cache_stem, f".mask-{recipe}.npy")
    if not path.is_file():
        mask_array = dilate_ball(case.labels > 0, mask.radius, mask.dilation_spacing(case.spacing))
        try:
            save_npy(path, mask_array)
        except OSError as exc:  # a shared cache prepared by someone else, read-only here: keep it in memory
            if exc.errno not in (errno.EACCES, errno.EPERM, errno.EROFS):
                raise
            log.warning("%s: not writable; %s's training mask stays in memory", path.parent, case.name)
            return mask_array
    return np.load(path, mmap_mode="r")


def _beside(stem: Path, ending: str) -> Path:
    """``stem`` + ``ending`` (not ``with_suffix``: a case's own name may hold a dot)."""
    return stem.with_name(stem.name + ending)


def save_npy(path: Path, array: np.ndarray) -> None:
    """``np.save``, atomically: a file that exists is whole (a run resumes by what exists)."""
    with atomic_path(path, ".npy") as tmp:
        np.save(tmp, array)


def _digest(ident, length: int = 16) -> str:
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:length]


def _file_stamp(path: Path, located: bool = False) -> list:
    """A file's name, size and modification time, not where it lies: a data folder moved or copied
    with its times (``cp -a``, ``rsync -a``: prepared on one machine, trained on another) is
    the same data, and its cases are not prepared again. ``located``: its full path instead of
    its name, as keys were made before 2026-12-07."""
    stat = path.stat()
    return [str(path.resolve()) if located else path.name, stat.st_size, stat.st_mtime_ns]


def _cache_key(case: CaseInput, config: PreprocessingConfig, mapping: dict[int, int] | None = None,
               located: bool = False) -> str:
    """Changes with the CT file, the label file (a user's corrections), the preprocessing recipe
    and the label mapping (none: the key cases prepared before the mapping existed have)."""
    extra = [sorted(mapping.items())] if mapping else []
    return _digest([*_file_stamp(case.image_path, located), *_file_stamp(case.labels_path, located),
                    config.preparation_key(), *extra])


def _cache_source(case: CaseInput, config: PreprocessingConfig, mapping: dict[int, int] | None) -> dict:
    """What a cache entry was prepared from, less the files' stamps: two entries alike here but
    for their keys are one case's files before and after a change."""
    return {"image": str(case.image_path.resolve()), "labels": str(case.labels_path.resolve()),
            "recipe": _digest([config.preparation_key(), sorted(mapping.items()) if mapping else []])}


def _replaced_entries(stem: Path, name: str, source: dict) -> list[Path]:
    """The JSON files of the cache entries ``stem`` replaces: the same files and recipe under an
    earlier key (the files changed since: a user's corrections). Another recipe's entry, or another
    folder's case of the same name, is another run's; entries written before the source was
    recorded (2026-12-07) cannot be told apart and are none of these."""
    replaced = []
    for meta_path in stem.parent.glob(f"{glob.escape(name)}-*.json"):
        old = meta_path.name[: -len(".json")]
        if old == stem.name or not re.fullmatch(re.escape(name) + r"-[0-9a-f]{16}", old):
            continue
        try:
            if json.loads(meta_path.read_text()).get("source") == source:
                replaced.append(meta_path)
        except (OSError, ValueError, AttributeError):
            continue
    return replaced


def settle_replaced_entries(inputs: list[CaseInput], config: PreprocessingConfig, cache_dir: Path,
                            mapping: dict[int, int] | None = None, prune: bool = False) -> None:
    """Once the cases are prepared: remove the entries their present ones replace where ``prune``
    (a run's own cache: no other job reads it, and a KiTS19 case at the paper's grid is tens of
    MB); in a shared ``--cache`` another job may still be training on one (over NFS, removing it
    would kill that job), so they stay, named in a warning for the user to delete."""
    kept, kept_bytes = [], 0
    for case in inputs:
        if case.labels_path is None:
            continue
        stem = cache_stem(case, config, cache_dir, mapping)
        if not _is_prepared(stem):  # nothing replaces them yet
            continue
        for meta_path in _replaced_entries(stem, case.name, _cache_source(case, config, mapping)):
            old = meta_path.name[: -len(".json")]
            # The JSON first: the entry stops looking prepared before its arrays go.
            files = [meta_path, *(f for f in cache_dir.glob(f"{glob.escape(old)}.*") if f != meta_path)]
            if not prune:
                kept.append(f"{old}.*")
                for f in files:
                    try:
                        kept_bytes += f.stat().st_size
                    except OSError:  # removed meanwhile (another job, the user)
                        pass
                continue
            try:
                for f in files:
                    f.unlink(missing_ok=True)
            except OSError as exc:  # in use (Windows keeps mapped files): left, said
                log.warning("%s: could not remove this outdated cache entry (%s)", meta_path, exc.strerror or exc)
            else:
                log.info("%s: removed the cache entry of its files before they changed", old)
    if kept:
        log.warning("%s: %d entr%s of cases whose files changed since stay%s in this shared cache (%.0f MB), as "
                    "another run may still read them; delete them when none does: %s", cache_dir, len(kept),
                    "y" if len(kept) == 1 else "ies", "s" if len(kept) == 1 else "", kept_bytes / 1e6,
                    name_a_few(kept, 3))


def _legacy_cache_key(case: CaseInput, config: PreprocessingConfig) -> str:
    """The key of the cache's format before 2026-12-04 (one ``.npz`` per case), which missed the labels."""
    return _digest([*_file_stamp(case.image_path, located=True), config.preparation_key()])


def _require_labels(case: CaseInput) -> None:
    if case.labels_path is None:
        raise InputError(f"{case.image_path}: training needs its labels ({_LABELS_WANTED})")


def cache_stem(case: CaseInput, config: PreprocessingConfig, cache_dir: Path,
                mapping: dict[int, int] | None = None) -> Path:
    """Where the case is (or would be) prepared in ``cache_dir``: its name and its files' key, read
    from their stamps. An entry prepared before 2026-12-07, keyed by the files' paths too, is still
    the case's while they lie where they did: neither it nor the y1 and records naming it are
    made again."""
    _require_labels(case)
    stem = cache_dir / f"{case.name}-{_cache_key(case, config, mapping)}"
    if not _is_prepared(stem):
        located = cache_dir / f"{case.name}-{_cache_key(case, config, mapping, located=True)}"
        if _is_prepared(located):
            return located
    return stem


def _is_prepared(stem: Path) -> bool:
    return _beside(stem, ".json").is_file()  # written last


def cache_folder(run_dir: Path, cache_dir: Path | None = None) -> Path:
    """Where a run's prepared cases live: ``--cache`` if given, else ``RUN/cache``."""
    return Path(cache_dir) if cache_dir is not None else Path(run_dir) / "cache"


def load_stage_case(case: CaseInput, config: PreprocessingConfig, cache_dir: Path | None,
                    mapping: dict[int, int] | None = None) -> StageCase:
    """One case on the stage grid: memory-mapped from ``cache_dir`` (prepared first if needed), or in memory."""
    if cache_dir is None:
        _require_labels(case)
        image, labels, spacing = _prepare_arrays(case, config, mapping)
        return StageCase(case.name, image, labels, spacing)
    return open_cached_case(prepare_cached_case(case, config, cache_dir, mapping))


def prepare_cached_case(case: CaseInput, config: PreprocessingConfig, cache_dir: Path,
                        mapping: dict[int, int] | None = None) -> Path:
    """Make sure ``cache_dir`` holds the case on the stage grid; returns the stem of its files.

    ``STEM.image.npy`` (float16), ``STEM.labels.npy`` (uint8) and ``STEM.json`` (name, spacing, shape),
    the JSON written last, so that a preparation cut short leaves no case that looks complete.
    The stem's key changes with the CT file, the label file, the preprocessing recipe and
    ``mapping`` (label values mapped onto KiTS19's; :func:`kitseg.config.label_mapping`).
    """
    stem = cache_stem(case, config, cache_dir, mapping)
    if _is_prepared(stem):
        return stem
    cache_dir.mkdir(parents=True, exist_ok=True)
    legacy = cache_dir / f"{case.name}-{_legacy_cache_key(case, config)}.npz"
    # Converted only if written after the labels last changed: its key did not cover them.
    if not mapping and legacy.is_file() and legacy.stat().st_mtime_ns >= case.labels_path.stat().st_mtime_ns:
        with np.load(legacy, allow_pickle=False) as data:
            image, labels, spacing = data["image"], data["labels"], tuple(float(s) for s in data["spacing"])
    else:
        image, labels, spacing = _prepare_arrays(case, config, mapping)
    save_npy(_beside(stem, ".image.npy"), image)
    save_npy(_beside(stem, ".labels.npy"), labels)
    with atomic_path(_beside(stem, ".json")) as tmp:
        tmp.write_text(json.dumps({"name": case.name, "spacing": list(spacing), "shape": list(image.shape),
                                   "source": _cache_source(case, config, mapping)}))
    legacy.unlink(missing_ok=True)  # converted (the same arrays, now mappable) or out of date
    return stem


def open_cached_case(stem: Path) -> StageCase:
    """A prepared case, its arrays mapped read-only from the cache (pages load as they are used)."""
    meta = json.loads(_beside(stem, ".json").read_text())
    image = np.load(_beside(stem, ".image.npy"), mmap_mode="r")
    labels = np.load(_beside(stem, ".labels.npy"), mmap_mode="r")
    if list(image.shape) != meta["shape"] or labels.shape != image.shape:
        raise InputError(f"{stem}: cached case is inconsistent (image {image.shape}, labels {labels.shape}, "
                         f"recorded {tuple(meta['shape'])}); delete the cache folder to prepare it again")
    return StageCase(meta["name"], image, labels, tuple(meta["spacing"]), cache_stem=stem)


def _prepare_arrays(case: CaseInput, config: PreprocessingConfig,
                    mapping: dict[int, int] | None = None) -> tuple[np.ndarray, np.ndarray, tuple]:
    """(float16 image, uint8 labels, spacing) on the stage grid, read and prepared as at inference;
    the labels' values first mapped by ``mapping``."""
    volume = read_ct(case.image_path)
    labels = read_labels(case.labels_path, like=volume)
    labels.array = apply_label_mapping(labels.array, mapping or {})
    stray = KITS_LABELS.stray_values(labels.array)
    if stray:  # labels_to_stage would make them background without a word (KiTS21's cysts are 3)
        raise InputError(f"{case.labels_path}: holds label {name_a_few(stray, 8)}; training uses 0 (background), "
                         "1 (kidney), 2 (tumor): map the others onto these, e.g. --map-labels 3=1 (KiTS21/23's "
                         "cysts trained as kidney)")
    prepared = prepare(volume, config)
    # float16 keeps normalized intensities to within 1e-3 (a fraction of a HU in the window) at half the bytes.
    return prepared.image.astype(np.float16), labels_to_stage(labels.array, prepared.grid), prepared.grid.spacing


def preparation_workers(processes: int = 1) -> int:
    """Worker processes that prepare cases, per training process (``processes`` on this machine)."""
    # The cores this job may use (a Slurm or cgroup share), not the node's: up to ~2 GB each at the `paper` grid.
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(8, cores // processes))


def phantom_draws(inputs: list[CaseInput]) -> dict | None:
    """How the synthetic cases among ``inputs`` were drawn, from their ``phantom.json``: the distinct
    parameter sets, and each case's seed with the index of its set. With the masks, that redraws
    every case (``kits-seg phantom``), so a model's provenance says what it learnt from, not only
    the data folder's name. None when no case is a phantom (real data)."""
    params: list[dict] = []
    cases: dict[str, list[int]] = {}
    for case in inputs:
        if not is_case_image(case.image_path):
            continue  # only a case folder holds a phantom's record
        record_path = case.image_path.parent / "phantom.json"
        try:
            record = json.loads(record_path.read_text())
            drawn = {"params": record["params"], "label_mapping": record.get("label_mapping") or {}}
            seed = int(record["case_seed"])
        except (OSError, ValueError, KeyError, TypeError):  # not a phantom, or no record of it
            continue
        if drawn not in params:
            params.append(drawn)
        cases[case.name] = [seed, params.index(drawn)]
    return {"params": params, "cases": cases} if cases else None


#: Where a training case's labels are looked for, for messages.
_LABELS_WANTED = (f"case folders' segmentation.nii.gz or KiTS21's {KITS21_LABELS}, or nnU-Net's labelsTr/NAME.nii.gz "
                  "for imagesTr/NAME_0000.nii.gz")


def labelled_inputs(data_dir: Path) -> list[CaseInput]:
    """The training folder's cases that have ground truth: KiTS case folders (``case_XXXXX/imaging.nii.gz``
    with its labels) or nnU-Net's raw layout (``imagesTr``, ``labelsTr``); an error names the folder if
    there are none."""
    data_dir = Path(data_dir)
    if data_dir.is_file():
        raise InputError(f"{data_dir}: is a file; training takes a folder of KiTS case folders, or one with "
                         "nnU-Net's imagesTr and labelsTr")
    found = nnunet_training_cases(data_dir)
    if found is None:
        found = discover_inputs(data_dir)
    inputs = [c for c in found if c.labels_path is not None]
    unlabelled = [c.name for c in found if c.labels_path is None]
    if inputs and unlabelled:
        log.warning("%s: %d case(s) without labels (%s) are not trained on: %s", data_dir, len(unlabelled),
                    _LABELS_WANTED, name_a_few(unlabelled))
    if not inputs:
        raise InputError(f"{data_dir}: no case with labels to train on ({_LABELS_WANTED}){layout_hint(data_dir)}")
    return inputs


def prepare_cases(data_dir: Path, config: PreprocessingConfig, cache_dir: Path, progress: bool = True,
                  workers: int = 1, share: tuple[int, int] = (0, 1),
                  inputs: list[CaseInput] | None = None, mapping: dict[int, int] | None = None) -> list[Path]:
    """Prepare the labelled cases of ``data_dir`` into ``cache_dir``; returns their stems.

    ``share=(k, n)``: only every n-th case from the k-th, so that n processes (``torchrun``
    ranks) prepare a data set together instead of each all of it. Cases prepared already are
    only looked up (no worker starts for them: a resumed run finds them all). ``inputs``: the
    folder's :func:`labelled_inputs`, where the caller has them (found, and warned about, once).
    ``mapping``: label values mapped onto KiTS19's (:func:`kitseg.config.label_mapping`).
    """
    inputs = (labelled_inputs(data_dir) if inputs is None else inputs)[share[0]::share[1]]
    stems = [cache_stem(c, config, cache_dir, mapping) for c in inputs]
    missing = [c for c, stem in zip(inputs, stems) if not _is_prepared(stem)]
    if missing:
        needed = sum(_stage_voxels(c, config) for c in missing) * _CACHE_BYTES_PER_VOXEL
        require_free_space(cache_dir, needed, f"preparing {len(missing)} case(s) into the cache")
    _each_case(prepare_cached_case, missing, config, cache_dir, progress, workers, mapping)
    return stems


_CACHE_BYTES_PER_VOXEL = 3  # float16 image + uint8 labels


def _stage_voxels(case: CaseInput, config: PreprocessingConfig) -> int:
    """Voxels of the case on the stage grid, from the CT's header alone (0 if unreadable: preparing it will say why)."""
    try:
        img = nib.load(case.image_path)
        source = source_grid_for(img.shape[:3], img.affine, case.image_path)
    except (OSError, ValueError, nib.filebasedimages.ImageFileError):
        return 0
    return int(np.prod(StageGrid.for_config(source.internal_shape(), source.internal_affine(), config).shape))


def load_cases(
    data_dir: Path, config: PreprocessingConfig, cache_dir: Path | None, progress: bool = True, workers: int = 1,
    inputs: list[CaseInput] | None = None, mapping: dict[int, int] | None = None,
) -> list[StageCase]:
    """Every case with labels in ``data_dir``, on the stage grid (cached; ``workers`` processes).

    With a cache, the workers write the cases there and this process maps them: nothing large
    travels between processes, and the cases take no memory of their own. ``inputs`` and
    ``mapping``: as for :func:`prepare_cases`.
    """
    inputs = labelled_inputs(data_dir) if inputs is None else inputs
    if cache_dir is not None:
        return [open_cached_case(stem)
                for stem in prepare_cases(data_dir, config, cache_dir, progress, workers, inputs=inputs,
                                          mapping=mapping)]
    return _each_case(load_stage_case, inputs, config, None, progress, workers, mapping)


def _each_case(func, inputs: list[CaseInput], config: PreprocessingConfig, cache_dir: Path | None, progress: bool,
               workers: int, mapping: dict[int, int] | None = None) -> list:
    """``func(case, config, cache_dir, mapping)`` for each case, in ``workers`` processes (one BLAS thread each)."""
    from concurrent.futures import ProcessPoolExecutor

    from tqdm import tqdm

    bar = dict(total=len(inputs), desc="preparing cases", disable=not progress or not inputs)
    if workers <= 1 or len(inputs) <= 1:
        return [func(c, config, cache_dir, mapping) for c in tqdm(inputs, **bar)]
    with ProcessPoolExecutor(max_workers=min(workers, len(inputs)), initializer=one_blas_thread) as pool:
        n = len(inputs)
        try:
            return list(tqdm(pool.map(func, inputs, [config] * n, [cache_dir] * n, [mapping] * n), **bar))
        except KeyboardInterrupt:  # stopped: the cases being prepared are left (the next run prepares them)
            stop_workers(pool)
            raise


def split_cases(names: list[str], val_fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """A reproducible train/validation split by case name."""
    names = sorted(names)
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(names))
    if not 0.0 <= val_fraction < 1.0:
        raise ConfigError(f"the validation fraction must be in [0, 1), got {val_fraction}")
    n_val = max(1, int(round(len(names) * val_fraction))) if len(names) > 1 and val_fraction > 0 else 0
    val = sorted(names[i] for i in order[:n_val])
    return [n for n in names if n not in val], val


def label_map_key(case: StageCase) -> str:
    """Identifies a case's label map: images drawn around one mask (phantoms of other seeds) share it."""
    return hashlib.sha256(repr(case.labels.shape).encode() + case.labels.tobytes()).hexdigest()


_KITS_STEM = re.compile(r"^(case_\d+)(?:_|$)")


def mask_name(case_name: str) -> str:
    """The KiTS19 mask a case is an image of: ``case_XXXXX`` for its twins ``case_XXXXX_<suffix>`` too."""
    stem = _KITS_STEM.match(case_name)
    return stem.group(1) if stem else case_name


def source_keys(case: StageCase) -> tuple[str, ...]:
    """What ties a case to its patient: its label map, and a name ``case_XXXXX_<suffix>`` (another
    image of ``case_XXXXX``, e.g. a phantom twin whose extra tumors changed the label map)."""
    stem = _KITS_STEM.match(case.name)
    return (label_map_key(case),) + ((f"name:{stem.group(1)}",) if stem else ())


def out_of_fold_split(cases: list[StageCase], n_folds: int) -> list[list[StageCase]]:
    """Training cases in ``n_folds`` folds for out-of-fold y1, the images of one patient in one fold.

    A fold model predicts y1 for the cases it did not see; had it seen another image of the same
    mask, it would know the anatomy and its y1 would be better than stage 1's on a new patient.
    Cases sharing any of :func:`source_keys` are one group; groups go to folds in the order of
    their first case. Without such repeats the folds are ``cases[k::n_folds]``.
    """
    parent = list(range(len(cases)))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    first_with: dict[str, int] = {}
    for i, case in enumerate(cases):
        for key in source_keys(case):
            if key in first_with:
                a, b = root(first_with[key]), root(i)
                parent[max(a, b)] = min(a, b)  # the group's root stays its first case
            else:
                first_with[key] = i
    groups: dict[int, list[StageCase]] = {}
    for i, case in enumerate(cases):
        groups.setdefault(root(i), []).append(case)
    ordered = list(groups.values())
    return [[case for group in ordered[k::n_folds] for case in group] for k in range(n_folds)]


def _crop_window(size: int, extent: int, centre: float, rng: np.random.Generator) -> tuple[int, int]:
    """Start/stop of a window of ``size`` along an axis of length ``extent``, around ``centre``."""
    if size >= extent:
        return 0, extent
    start = int(round(centre - size / 2 + rng.uniform(-size / 4, size / 4)))
    start = min(max(start, 0), extent - size)
    return start, start + size


def _pad_to(array: np.ndarray, size: int | None, value: float = 0.0) -> np.ndarray:
    if size is None:
        return array
    pad_y, pad_x = max(0, size - array.shape[-2]), max(0, size - array.shape[-1])
    if pad_y == 0 and pad_x == 0:
        return array
    widths = [(0, 0)] * (array.ndim - 2) + [(0, pad_y), (0, pad_x)]
    return np.pad(array, widths, constant_values=value)


class Stage1Sampler:
    """Batches of (B, 2k+1, H, W) slices with neighbours and (B, H, W) foreground targets."""

    def __init__(self, cases: list[StageCase], context: int, crop: int | None, foreground_fraction: float):
        self.cases, self.context, self.crop, self.fg_fraction = cases, context, crop, foreground_fraction
        self._fg = [c.foreground_slices for c in cases]

    def sample(self, batch_size: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        images, targets = [], []
        for _ in range(batch_size):
            ci = int(rng.integers(len(self.cases)))
            case, fg = self.cases[ci], self._fg[ci]
            z = int(rng.choice(fg)) if fg.size and rng.random() < self.fg_fraction else int(rng.integers(case.image.shape[0]))
            neighbours = np.clip(np.arange(z - self.context, z + self.context + 1), 0, case.image.shape[0] - 1)
            image, target = case.image[neighbours], (case.labels[z] > 0)
            if self.crop is not None:
                ys, xs = np.nonzero(target)
                cy, cx = (ys.mean(), xs.mean()) if ys.size else (rng.uniform(0, target.shape[0]), rng.uniform(0, target.shape[1]))
                y0, y1 = _crop_window(self.crop, target.shape[0], cy, rng)
                x0, x1 = _crop_window(self.crop, target.shape[1], cx, rng)
                image, target = image[:, y0:y1, x0:x1], target[y0:y1, x0:x1]
            images.append(_pad_to(image, self.crop, image.min()))
            targets.append(_pad_to(target, self.crop))
        return _stack_same_size(images).astype(np.float32, copy=False), _stack_same_size(targets).astype(np.int64)


# In-plane blur (stage-grid pixels) of a redrawn tumor's edge: the phantoms' point-spread function
# and the area averaging onto the 2 mm grid soften an edge by about one pixel.
TUMOR_EDGE_SIGMA_PX = 0.75


class Stage2Sampler:
    """Batches of stage-2 inputs: (image, y1, mask, labels) slices, cropped around the mask.

    The mask is the ground-truth foreground dilated by the method's ball (as the paper trains);
    y1 are out-of-fold stage-1 predictions, never the ground truth. image, y1 and mask come as
    (B, 2*context+1, H, W): each sampled slice with its neighbours (edges repeated, as at
    inference); labels are the sampled slice's, (B, H, W).

    ``tumor_contrast`` > 0 (normalized intensity units) redraws the tumor's contrast: in half
    the samples that show tumor, the tumor's intensity is shifted by a uniform draw in
    ``[-tumor_contrast, tumor_contrast]``, its edge blurred as the scanner blurs it. Each mask
    is drawn once as a phantom, so the network could learn that mask's tumor by its intensity;
    this makes it see each tumor darker and brighter (per-label intensity draws, as in SynthSeg).

    ``tumor_sampling`` says how a tumor sample (a share ``tumor_fraction`` of them) is drawn:
    "slice", a slice holding tumor, the crop centred on a random mask pixel of it (a small tumor
    beside a large kidney may fall outside the crop); "lesion", one of the case's tumors (3D
    connected pieces) with equal chance, the crop centred on a random voxel of it, so that a
    2 mL tumor is shown as often as a 500 mL one in the same case. Cases are drawn with equal
    chance either way.
    """

    def __init__(self, cases: list[StageCase], y1: dict[str, np.ndarray], mask: MaskConfig, crop: int | None,
                 tumor_fraction: float, context: int = 0, tumor_contrast: float = 0.0, tumor_sampling: str = "slice"):
        if tumor_sampling not in TUMOR_SAMPLING:
            raise ValueError(f"tumor_sampling must be one of {', '.join(TUMOR_SAMPLING)}, got {tumor_sampling!r}")
        self.cases, self.y1, self.crop, self.tumor_fraction, self.context = cases, y1, crop, tumor_fraction, context
        self.tumor_contrast = tumor_contrast
        self.masks = [training_mask(c, mask) for c in cases]
        self._mask_slices = [np.flatnonzero(m.any(axis=(1, 2))) for m in self.masks]
        self._tumor = [c.tumor_slices for c in cases]
        self._lesions = [tumor_lesions(c.labels) for c in cases] if tumor_sampling == "lesion" else None
        usable = [i for i, s in enumerate(self._mask_slices) if s.size]
        if not usable:
            raise ValueError("no training case has any kidney: stage 2 has nothing to learn from")
        self._usable = usable

    def sample(self, batch_size: int, rng: np.random.Generator) -> tuple[np.ndarray, ...]:
        parts = {"image": [], "y1": [], "mask": [], "labels": []}
        for _ in range(batch_size):
            ci, z, window = self.draw_window(rng)
            case, mask = self.cases[ci], self.masks[ci]
            near = neighbour_indices(np.array([z]), self.context, case.image.shape[0])[0]
            arrays = {"image": case.image[near], "y1": self.y1[case.name][near].astype(np.float32), "mask": mask[near],
                      "labels": case.labels[z], "tumor": case.labels[near] == 2}
            if window is not None:
                y0, y1, x0, x1 = window
                arrays = {k: v[..., y0:y1, x0:x1] for k, v in arrays.items()}
            tumor_here = arrays.pop("tumor")
            if self.tumor_contrast > 0 and tumor_here.any() and rng.random() < 0.5:
                edge = ndimage.gaussian_filter(tumor_here.astype(np.float32), (0, TUMOR_EDGE_SIGMA_PX, TUMOR_EDGE_SIGMA_PX))
                shift = np.float32(rng.uniform(-self.tumor_contrast, self.tumor_contrast))
                arrays["image"] = np.clip(arrays["image"] + shift * edge, -1.0, 1.0)
            for k, v in arrays.items():
                parts[k].append(_pad_to(v, self.crop))
        image, y1, mask, labels = (_stack_same_size(parts[k]) for k in ("image", "y1", "mask", "labels"))
        return image.astype(np.float32, copy=False), y1.astype(np.float32), mask.astype(np.float32), labels.astype(np.int64)

    def draw_window(self, rng: np.random.Generator) -> tuple[int, int, tuple[int, int, int, int] | None]:
        """Where one sample is cut: (case index, slice, (y0, y1, x0, x1) or None for the whole slice)."""
        ci = self._usable[int(rng.integers(len(self._usable)))]
        z, centre = self._pick_slice_and_centre(ci, rng)
        if self.crop is None:
            return ci, z, None
        mask = self.masks[ci]
        if centre is None:
            ys, xs = np.nonzero(mask[z])
            pick = int(rng.integers(ys.size))  # centre on a random mask pixel: both kidneys get seen
            centre = (ys[pick], xs[pick])
        y0, y1 = _crop_window(self.crop, mask.shape[1], centre[0], rng)
        x0, x1 = _crop_window(self.crop, mask.shape[2], centre[1], rng)
        return ci, z, (y0, y1, x0, x1)

    def _pick_slice_and_centre(self, ci: int, rng: np.random.Generator) -> tuple[int, tuple[int, int] | None]:
        """(slice, in-plane crop centre or None for a random mask pixel) of one sample of case ``ci``."""
        tumor = self._tumor[ci]
        if not (tumor.size and rng.random() < self.tumor_fraction):
            return int(rng.choice(self._mask_slices[ci])), None
        if self._lesions is None:
            return int(rng.choice(tumor)), None
        lesions = self._lesions[ci]
        voxels = lesions[int(rng.integers(len(lesions)))]
        z, y, x = (int(v) for v in voxels[int(rng.integers(len(voxels)))])
        return z, (y, x)


def tumor_lesions(labels: np.ndarray) -> list[np.ndarray]:
    """The (N, 3) voxel indices of each 3D connected tumor piece of a stage-grid label map.

    Pieces join by faces (6-connectivity); joining by edges and corners too would merge under 1%
    of the pieces of the training phantoms' tumors (774 against 781 pieces in 300 of them).
    """
    if labels.size == 0:
        return []
    pieces, _ = ndimage.label(labels == 2)
    lesions = []
    for i, box in enumerate(ndimage.find_objects(pieces), start=1):
        offset = np.array([s.start for s in box], np.int32)
        lesions.append(np.argwhere(pieces[box] == i).astype(np.int32) + offset)
    return lesions


def _stack_same_size(arrays: list[np.ndarray]) -> np.ndarray:
    """Stack 2D/3D arrays, padding to the largest (full slices of different cases differ in size)."""
    h = max(a.shape[-2] for a in arrays)
    w = max(a.shape[-1] for a in arrays)
    out = []
    for a in arrays:
        widths = [(0, 0)] * (a.ndim - 2) + [(0, h - a.shape[-2]), (0, w - a.shape[-1])]
        out.append(np.pad(a, widths) if (h, w) != a.shape[-2:] else a)
    return np.stack(out)


# ------------------------------------------------------------------------------- augmentation
def random_affine_grids(batch: int, size: tuple[int, int], rng: np.random.Generator, device) -> torch.Tensor:
    """Sampling grids for a random in-plane rotation (+-15 deg), scale (0.85-1.15) and left-right flip."""
    angle = np.deg2rad(rng.uniform(-15, 15, batch))
    scale = rng.uniform(0.85, 1.15, batch)
    flip = np.where(rng.random(batch) < 0.5, -1.0, 1.0)  # kidneys are bilateral: mirror images are plausible
    theta = np.zeros((batch, 2, 3), np.float32)
    theta[:, 0, 0] = np.cos(angle) / scale * flip
    theta[:, 0, 1] = -np.sin(angle) / scale
    theta[:, 1, 0] = np.sin(angle) / scale * flip
    theta[:, 1, 1] = np.cos(angle) / scale
    theta[:, :, 2] = rng.uniform(-0.05, 0.05, (batch, 2))
    return F.affine_grid(torch.from_numpy(theta).to(device), [batch, 1, *size], align_corners=False)


def warp(x: torch.Tensor, grid: torch.Tensor, mode: str, fill: float = 0.0) -> torch.Tensor:
    """Resample (B, C, H, W) with a grid; outside the image takes ``fill``."""
    out = F.grid_sample(x - fill, grid, mode=mode, padding_mode="zeros", align_corners=False)
    return out + fill


def augment_intensity(image: torch.Tensor, rng: np.random.Generator, max_noise: float = 0.05) -> torch.Tensor:
    """Contrast/brightness jitter and noise in normalized units (scanner and protocol variation).

    ``max_noise``: the noise's standard deviation is drawn uniformly up to this (0.05: 15 HU in
    the default window; ``TrainConfig.augment_noise_sigma``).
    """
    b = image.shape[0]
    shape = (b,) + (1,) * (image.ndim - 1)
    scale = torch.from_numpy(rng.uniform(0.85, 1.15, b).astype(np.float32)).view(shape).to(image.device)
    shift = torch.from_numpy(rng.uniform(-0.1, 0.1, b).astype(np.float32)).view(shape).to(image.device)
    sigma = torch.from_numpy(rng.uniform(0.0, max_noise, b).astype(np.float32)).view(shape).to(image.device)
    if image.device.type == "cpu":  # numpy's stream: CPU runs recorded earlier repeat bit for bit
        noise = torch.from_numpy(rng.standard_normal(image.shape).astype(np.float32))
    else:
        # Drawn where the image is, from a seed the step's generator gives (resuming stays exact): on
        # a GPU, numpy's draw for a `paper` stage-1 batch (12 x 3 x 512 x 512) took longer than the step.
        generator = torch.Generator(image.device).manual_seed(int(rng.integers(2**63)))
        noise = torch.randn(image.shape, generator=generator, device=image.device)
    return image * scale + shift + sigma * noise

