"""npe2 reader: a CT as a NIfTI file, a KiTS case folder (with its ground truth, if any), or a
DICOM series (its folder, or its files: read by :mod:`kitseg.dicom`); labels as a DICOM SEG over
its series (:func:`kitseg.dicom_seg.read_dicom_seg`).

A NIfTI that holds a label map (whole numbers 0..255 stored as any type, a few of them or
constant over regions: a KiTS19 ``segmentation.nii.gz``, a saved prediction, another tool's
organ map; :func:`kitseg.io.label_map_values`) opens as a labels layer, a saved probability
map (values in 0..1: a ``_y1``) as a probability image and a ``_probs`` file (channels last)
as one per class, so results and references can be
re-opened over their CT and neither is offered as a CT to segment. All axis handling is the
engine's (:mod:`kitseg.io`).
"""

from __future__ import annotations

import os
import re
from functools import partial
from pathlib import Path
from typing import Callable

import numpy as np

from ._layers import (
    KITS21_CYST,
    RUN_KEY,
    LayerGeometry,
    checksum,
    ct_layer_data,
    geometry_of,
    ground_truth_layer_data,
    labels_layer_kwargs,
    probability_layer_kwargs,
)


#: KiTS21's per-annotator masks (``segmentations/tumor_instance-1_annotation-2.nii.gz``): 1 where
#: one kidney, tumor or cyst is, as one annotator drew it; their 1 is no KiTS19 kidney.
_KITS21_INSTANCE = re.compile(r"^(kidney|tumor|cyst)_instance-\d+_annotation-\d+$")
_KITS21_CLASS = {"kidney": 1, "tumor": 2, "cyst": KITS21_CYST}


def _single_path(path: str | os.PathLike | list) -> Path | None:
    """The one thing to read: a path, or of several, the DICOM series their files belong to."""
    if isinstance(path, (list, tuple)):
        if len(path) != 1:
            from kitseg.io import is_dicom_file

            files = [Path(p) for p in path]
            if files and len({f.parent for f in files}) == 1 and all(is_dicom_file(f) for f in files):
                return files[0]  # a series' files, selected together in File > Open: the series
            return None
        path = path[0]
    return Path(path)


def napari_get_reader(path: str | os.PathLike | list) -> Callable | None:
    """The reader function for ``path``, or ``None`` when this plugin cannot read it."""
    p = _single_path(path)
    if p is None:
        return None
    from kitseg.io import case_image_file, dicom_series_folders, is_dicom_seg, is_dicom_series, is_nifti

    if p.is_dir():
        if case_image_file(p) is not None or is_dicom_series(p):
            return read_kits
        # A study's folder: said which folders to open, where napari would only say "refused".
        series = [sub.name for sub in dicom_series_folders(p)]
        return partial(_refuse_study, series=series) if series else None
    if p.suffix.lower() == ".dcm" and not isinstance(path, (list, tuple)) and not is_dicom_seg(p):
        # napari hands the files of a selection over one by one: each would read the whole series.
        return _refuse_slice_file if is_dicom_series(p) else None
    return read_kits if is_nifti(p) or is_dicom_series(p) else None  # a DICOM SEG passes: read_kits reads it


def _refuse_slice_file(path: str | os.PathLike) -> list:
    from kitseg.io import InputError

    folder = Path(path).parent
    raise InputError(f"{path}: one slice of a DICOM series: open its folder, {folder} (File > Open Folder), to read "
                     f"the series (napari-kits {path} reads the series of one file)")


def _refuse_study(path: str | os.PathLike | list, series: list[str]) -> list:
    from kitseg.io import InputError, name_a_few

    raise InputError(f"{_single_path(path)}: holds {len(series)} DICOM series folders ({name_a_few(series)}): "
                     "open one of them (File > Open Folder)")


def _looks_like_probability(array: np.ndarray) -> bool:
    """A saved y1 (uint8 with slope 1/255, read as float): values in 0..1, which no CT in HU has."""
    return array.dtype.kind == "f" and array.min() >= 0.0 and array.max() <= 1.0


def read_kits(path: str | os.PathLike | list) -> list[tuple]:
    """Read a CT (and ground truth) as napari LayerData tuples, in the internal orientation."""
    from kitseg.config import KITS_LABELS
    from kitseg.geometry import strip_nifti_suffix
    from kitseg.dicom import series_name, series_of_file
    from kitseg.io import (InputError, as_labels, case_from_folder, is_case_image, is_dicom_seg, is_dicom_series,
                           is_result_name,
                           label_map_values, nifti_shape, read_ct, read_labels, read_volume)

    p = _single_path(path)
    if isinstance(path, (list, tuple)) and len(path) > 1 and len({series_of_file(Path(f)) for f in path} - {None}) > 1:
        raise InputError(f"{p.parent}: the files chosen belong to several series; open one series at a time")
    if is_dicom_seg(p):
        return _dicom_seg_layers(p)
    if is_dicom_series(p):
        return [ct_layer_data(read_ct(p), series_name(p))]  # named as the CLI names its results
    if p.is_dir():
        case = case_from_folder(p)
        ct = read_volume(case.image_path)
        layers = [ct_layer_data(ct, case.name, case.case_id)]
        if case.labels_path is not None:
            gt = read_labels(case.labels_path, like=ct)  # checks it lies on the CT's grid
            # The CT's grid (identical) so a save can never land on the input CT unnoticed.
            layers.append(ground_truth_layer_data(ct.like(gt.array), case.name, case.case_id, case.labels_path))
        return layers

    name = strip_nifti_suffix(p.name)
    if len(nifti_shape(p)) == 4:  # class probabilities, channels last (`kits-seg predict --save-intermediates`)
        return _probability_layers(p, name)
    volume = read_volume(p)
    if is_case_image(p):  # a case folder's CT opened alone: named after its case, as the folder is
        case = case_from_folder(p.parent)
        return [ct_layer_data(volume, case.name, case.case_id)]
    probability = _looks_like_probability(volume.array)
    # A y1 where stage 1 found nothing is all zeros, which looks like empty labels: its name says otherwise.
    if label_map_values(volume.array) is not None and not (probability and name.endswith("_y1")):
        labels = as_labels(volume)  # checked as read_labels checks it, without reading the file again
        beyond = tuple(KITS_LABELS.stray_values(labels.array))
        kits = max(beyond, default=0) <= KITS21_CYST  # KiTS19's values, or KiTS21/23's with their cysts
        instance = _KITS21_INSTANCE.match(name) if not beyond else None
        # One instance of one structure is no reference to score a whole result against unasked.
        geometry = LayerGeometry("labels", labels.source, None, name, source_holds="labels",
                                 offered_as_reference=kits and not is_result_name(p) and not instance,
                                 file_labels=beyond)
        # KiTS colours up to KiTS21's cysts (3, magenta); another tool's classes get napari's own.
        kwargs = labels_layer_kwargs(name, geometry, labels.affine, kits_colors=kits,
                                     shows=_KITS21_CLASS[instance.group(1)] if instance else None)
        return [(labels.array, kwargs, "labels")]
    if probability:  # shown over its CT, never offered as a CT to segment
        return [_probability_layer(volume.array, volume, name, name)]
    return [ct_layer_data(volume, name)]


def _dicom_seg_layers(path: Path) -> list[tuple]:
    """A DICOM SEG's kidney and tumor as labels on its CT series' grid, and the series itself unless
    it is open already (a SEG alone has no CT to be shown over or segmented): the series found
    beside the SEG, or among the DICOM CTs open in the viewer. A model's SEG (automatic) is a result
    to correct; one a person drew or corrected, a reference to score against. How it was made goes
    with the layer (``RUN_KEY``), so that a SEG saved from it says so; saved, it goes to a new file."""
    from kitseg.dicom import read_dicom_series, series_name
    from kitseg.dicom_seg import read_dicom_seg, referenced_series_uids

    from ._save import from_dicom_series, viewer_layers

    geometries = [geometry_of(layer) for layer in viewer_layers()]
    open_series = [Path(g.source.path) for g in geometries if g is not None and g.kind == "ct" and from_dicom_series(g)]
    # Its series open already (known by UID, wherever it was opened from): read onto that CT's grid.
    referenced = referenced_series_uids(path)
    opened = next((series for series in open_series if _series_uid(series) in referenced), None)
    seg = read_dicom_seg(path, series=opened)
    ct_name = series_name(seg.series)
    geometry = LayerGeometry("labels", seg.labels.source, None, ct_name, read_from=path,
                             offered_as_reference=not seg.automatic)
    kwargs = labels_layer_kwargs(path.stem, geometry, seg.labels.affine)
    # Saved again, another tool's automatic labels are not napari-kits' model's: semiautomatic.
    made = seg.algorithm_type if seg.by_napari_kits or not seg.automatic else "semiautomatic"
    kwargs["metadata"][RUN_KEY] = {"checksum": checksum(seg.labels.array), "model": None, "algorithm_type": made}
    layers = [(seg.labels.array, kwargs, "labels")]
    if opened is None:
        layers.insert(0, ct_layer_data(read_dicom_series(seg.series, seg.geometry), ct_name))
    return layers


def _series_uid(series: Path) -> str | None:
    """The SeriesInstanceUID of a series (its folder, or a file of it), from one slice's header."""
    from kitseg.dicom import series_of_file
    from kitseg.io import dicom_files

    for file in [series] if series.is_file() else dicom_files(series):
        found = series_of_file(file)
        if found is not None:  # (None: a SEG kept in the series' folder)
            return found[0]
    return None


def _probability_layer(array: np.ndarray, volume, file_stem: str, layer_name: str, colormap: str = "inferno") -> tuple:
    """A probability map read from a file (``volume``: its grid), placed over its CT."""
    geometry = LayerGeometry("probability", volume.source, None, file_stem, source_holds="probability")
    return (array, probability_layer_kwargs(layer_name, geometry, volume.affine, colormap=colormap), "image")


def _probability_layers(path: Path, name: str) -> list[tuple]:
    """One probability image per foreground class of a ``_probs`` file, over its CT."""
    from kitseg.config import KITS_LABELS
    from kitseg.io import InputError, read_probabilities

    probs = read_probabilities(path)
    if probs.array.min() < 0.0 or probs.array.max() > 1.0:  # a multi-phase CT, say: not a result of this tool
        raise InputError(f"{path}: a 4D volume whose values are not probabilities (0..1); napari-kits reads "
                         "3D CTs and the class probabilities it writes")
    channels = probs.array.shape[3]
    classes = KITS_LABELS.names if channels == len(KITS_LABELS.names) else [f"class {k}" for k in range(channels)]
    colormaps = {"kidney": "red", "tumor": "yellow"}
    return [
        _probability_layer(np.ascontiguousarray(probs.array[..., k]), probs, name, f"{name} P({classes[k]})",
                           colormaps.get(classes[k], "magma"))
        for k in range(1, channels)  # background is 1 - the rest
    ]
