"""Writing a layer back onto its CT file's exact grid (shared by the npe2 writer and the widget).

Layers on the CT's internal grid go straight to :func:`kitseg.io.write_labels`; layers on the
stage grid (``y1``, the mask, class probabilities) are first resampled to the CT's grid with
the stage grid's own matrices (:meth:`kitseg.preprocess.StageGrid.iter_to_source`), slice by
slice so a thin-slice CT never needs a float32 copy of itself. The engine's writers refuse to
replace the input CT and write atomically.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from ._layers import LayerGeometry

#: What each kind of layer is called in output file names (kitseg.outputs naming).
_SUFFIX = {"y1": "y1", "mask": "mask", "probability": "probs"}


class SaveError(Exception):
    """The layer cannot be saved (no source grid, wrong kind...); the message says why.

    Not a ValueError: napari takes a writer's ValueError for "this writer does not apply" and
    shows "not a valid writer" in place of the message.
    """


def default_filename(geometry: LayerGeometry, layer_name: str = "") -> str:
    """KiTS19-style names: ``prediction_00042.nii.gz``, ``NAME_labels.nii.gz``, ``NAME_y1.nii.gz``...

    A layer set aside as ``labels (edited)`` (the user's corrections, kept from a newer run) is
    offered ``..._edited``, not the name the new result would take; so is a label map opened from
    a file (``NAME_labels_edited``: its own name is an input, never written over). Spaces (the
    sample's "synthetic case") become underscores."""
    stem = f"prediction_{geometry.case_id}" if geometry.case_id else geometry.ct_name.replace(" ", "_")
    if geometry.source_holds != "ct":  # a result opened from its own file: that name, which is an input
        # One name per class of a _probs file, whose layers the reader names "NAME_probs P(kidney)".
        part = layer_name.removeprefix(geometry.ct_name).strip().replace(" ", "_")
        return f"{stem}{'_' + part if geometry.kind == 'probability' and part else ''}_edited.nii.gz"
    if geometry.kind == "labels" and geometry.read_from is not None:  # a DICOM SEG opened: its file is an input
        return f"{stem}_labels_edited.nii.gz"
    set_aside = re.search(r"\(edited( \d+)?\)", layer_name)
    edited = f"_edited{(set_aside.group(1) or '').strip()}" if set_aside else ""
    if geometry.kind in _SUFFIX:
        suffix = _SUFFIX[geometry.kind]
        if geometry.kind == "probability" and layer_name:
            suffix = layer_name.replace(" ", "_")
        return f"{stem}_{suffix}{edited}.nii.gz"
    return f"{stem}{edited}.nii.gz" if geometry.case_id else f"{stem}_labels{edited}.nii.gz"


def default_directory(geometry: LayerGeometry) -> Path:
    path = getattr(geometry.source, "path", None)
    if path is not None:
        folder = Path(path).parent
        return folder.parent if folder.name.startswith("case_") else folder
    return Path.cwd()


def with_output_suffix(path: str | os.PathLike) -> Path:
    """``path`` as an output file name: a DICOM SEG's (``.dcm``), or a NIfTI's (``.nii.gz`` added
    where it has no NIfTI suffix); a folder is refused."""
    from kitseg.io import is_nifti

    path = Path(path)
    if path.is_dir():  # checked before the suffix: `out/` must not become a file `out.nii.gz` beside it
        raise SaveError(f"{path}: is a folder; choose a file name")
    return path if is_nifti(path) or is_dicom_seg_name(path) else path.with_name(path.name + ".nii.gz")


def is_dicom_seg_name(path: str | os.PathLike) -> bool:
    return Path(path).suffix.lower() == ".dcm"


def from_dicom_series(geometry: LayerGeometry | None) -> bool:
    """The layer's CT was read from a DICOM series, which a DICOM SEG of its labels can reference."""
    from kitseg.io import is_dicom_series

    path = getattr(getattr(geometry, "source", None), "path", None)
    return geometry is not None and geometry.source_holds == "ct" and path is not None and is_dicom_series(Path(path))


def refuse_input_file(geometry: LayerGeometry | None, path: str | os.PathLike) -> None:
    """Raise :class:`SaveError` if ``path`` is the file the layer's grid was read from: napari-kits
    never replaces its input (the CT, a case's ground truth, or a result opened to be corrected)."""
    path = Path(path)
    if geometry is None or not path.exists():
        return
    source_path = getattr(geometry.source, "path", None)
    inputs = [(source_path, "the input CT" if geometry.source_holds == "ct"
               else f"the {geometry.source_holds} file it was opened from"),
              (geometry.read_from, f"the {geometry.kind.replace('_', '-')} file it was opened from")]
    for input_path, what in inputs:
        if same_file(path, input_path):
            raise SaveError(f"{path}: refusing to overwrite {what}; choose another name")


def same_file(path: Path, other: str | os.PathLike | None) -> bool:
    """``path`` (which exists) is the file ``other`` names, by another name or link too."""
    return other is not None and Path(other).exists() and os.path.samefile(path, other)


def refuse_open_files(path: str | os.PathLike, layers: Iterable[Any]) -> None:
    """Raise :class:`SaveError` if ``path`` is the file any of ``layers`` was read from: a label
    map opened beside its CT must not be saved over that CT (or over another layer's file)."""
    from ._layers import geometry_of

    path = with_output_suffix(path)
    if not path.exists():
        return
    for layer in layers:
        geometry = geometry_of(layer)
        if geometry is not None:  # (napari's own source of a CT that a SEG brought in is the SEG)
            sources = [getattr(geometry.source, "path", None), geometry.read_from]
        else:
            sources = [getattr(getattr(layer, "source", None), "path", None)]
        if any(same_file(path, source) for source in sources):
            raise SaveError(f"{path}: refusing to overwrite the file of the open layer '{layer.name}'; "
                            "choose another name")


def viewer_layers() -> list[Any]:
    """The layers of the napari viewer in use (none outside napari)."""
    try:
        from napari import current_viewer
    except ImportError:
        return []
    viewer = current_viewer()
    return list(viewer.layers) if viewer is not None else []


def save_layer(data: np.ndarray, geometry: LayerGeometry | None, path: str | os.PathLike, overwrite: bool = False,
               layer_name: str | None = None, run: dict | None = None) -> Path:
    """Write a plugin layer's data as NIfTI on the CT file's grid, or as a DICOM SEG; returns the path written.

    ``layer_name`` names the layer in a refusal (napari's File > Save shows it with no other word);
    ``run``: the layer's ``metadata[RUN_KEY]``, what a run wrote into it (a SEG of it unchanged is
    "automatic", and names the model).

    Raises:
        SaveError: the layer carries no CT geometry (it was not made by napari-kits).
        SaveError: ``path`` is the file the layer's grid was read from.
        kitseg.io.InputError: ``path`` is not a NIfTI name.
        FileExistsError: ``path`` exists and ``overwrite`` is False.
    """
    from kitseg.io import write_labels
    from kitseg.outputs import write_probability, write_stage_mask, write_stage_probability

    if geometry is None:
        raise SaveError(
            "this layer has no CT geometry: only layers opened or made by napari-kits "
            "(CT, labels, y1, mask) can be written on the CT's grid"
        )
    path = with_output_suffix(path)
    refuse_input_file(geometry, path)
    data = np.asarray(data)
    if is_dicom_seg_name(path):
        return _save_dicom_seg(data, geometry, path, overwrite, layer_name, run)
    if geometry.kind == "mask" and geometry.on_stage_grid:
        return write_stage_mask(data, geometry.stage_grid, geometry.source, path, overwrite=overwrite)
    if geometry.kind in ("y1", "probability") and geometry.on_stage_grid:
        return write_stage_probability(
            np.asarray(data, np.float32), geometry.stage_grid, geometry.source, path, overwrite=overwrite
        )
    if geometry.kind in ("y1", "probability"):  # a probability map re-opened from a file: on the CT's grid
        return write_probability(data, geometry.source, path, overwrite=overwrite)
    if geometry.kind in ("labels", "ground_truth"):
        from kitseg.config import KITS_LABELS
        from kitseg.io import name_a_few

        # Values the layer's file held are the user's convention (KiTS23's cysts): kept. One painted
        # anew would be scored as kidney by another tool without a word.
        stray = [v for v in KITS_LABELS.stray_values(data) if v not in geometry.file_labels]
        if stray:
            layer = f"the layer '{layer_name}'" if layer_name else "the layer"
            raise SaveError(f"{layer} holds label {name_a_few(stray, 8)}: KiTS19 labels are 0 "
                            "(background), 1 (kidney), 2 (tumor); paint those voxels with 1 or 2, or erase them, then save")
        return write_labels(data, geometry.source, path, overwrite=overwrite)
    raise SaveError(f"a {geometry.kind!r} layer is not a result; save labels, y1, the mask or probabilities")


def _save_dicom_seg(data: np.ndarray, geometry: LayerGeometry, path: Path, overwrite: bool,
                    layer_name: str | None, run: dict | None) -> Path:
    """Labels as a DICOM SEG over the series their CT was read from, recorded as made (``run``: how
    the layer's labels were made, a run's or a SEG's): "automatic" while they are as a run (or an
    automatic SEG) gave them, "semiautomatic" once painted, "manual" for a person's SEG (painted
    on, still a person's); labels of unknown making (a NIfTI opened) as semiautomatic."""
    from kitseg.dicom_seg import write_dicom_seg
    from kitseg.io import InputError

    from ._layers import checksum

    layer = f"'{layer_name}'" if layer_name else "the layer"
    if geometry.kind != "labels":
        raise SaveError(f"{path}: only labels are saved as a DICOM SEG; save {layer} as .nii.gz")
    if not from_dicom_series(geometry):
        raise SaveError(f"{path}: {layer} is not on a CT read from a DICOM series, which a DICOM SEG must "
                        "reference; save it as .nii.gz (kits-seg dicom-seg LABELS SERIES converts a saved file)")
    try:
        made = run.get("algorithm_type", "automatic") if run else "semiautomatic"
        if made == "automatic" and checksum(data) != run.get("checksum"):
            made = "semiautomatic"
        return write_dicom_seg(data, geometry.source, geometry.source.path, path, overwrite=overwrite,
                               algorithm_type=made, model=(run or {}).get("model"))
    except InputError as error:  # the series' headers lack what a SEG references; the labels hold a 3
        raise SaveError(str(error)) from error
