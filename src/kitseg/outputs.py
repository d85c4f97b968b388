"""Writing a segmentation's results next to each other, on the CT's own grid.

Names are a contract other tools rely on: a KiTS19 case folder ``case_XXXXX`` gives
``prediction_XXXXX.nii.gz`` (the KiTS19 submission name); a file ``NAME.nii.gz`` gives
``NAME_labels.nii.gz``; intermediates add ``_y1``, ``_mask`` and ``_probs`` to the stem.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .geometry import SourceGrid
from .io import INTERMEDIATES, CaseInput, read_labels, write_labels, write_on_source_grid
from .pipeline import Segmentation
from .preprocess import StageGrid


def output_paths(case: CaseInput, out_dir: Path, intermediates: bool, dicom_seg: bool = False) -> list[Path]:
    """The labels, the intermediates if asked for, and last, for a DICOM series with ``dicom_seg``,
    the labels as a DICOM SEG (``NAME_labels.dcm``)."""
    paths = [out_dir / f"{case.output_name}.nii.gz"]
    if intermediates:
        paths += [out_dir / f"{case.intermediate_name(what)}.nii.gz" for what in INTERMEDIATES]
    if dicom_seg and case.is_dicom_series:
        paths.append(out_dir / f"{case.output_name}.dcm")
    return paths


def probability_to_source_uint8(grid: StageGrid, stage: np.ndarray) -> np.ndarray:
    """Resample stage-grid probabilities (..., Zs, Ys, Xs) in [0, 1] onto the source grid as uint8 0..255.

    Channels (if any) move last, as NIfTI stores vector data. uint8 keeps a 1059-slice CT's
    three probability maps under 1 GB; the file carries slope 1/255 so viewers show 0..1.
    """
    channels = stage.shape[:-3]
    out = np.empty(grid.source_shape + channels, np.uint8)
    for i, plane in grid.iter_to_source(stage):
        plane = _probability_uint8(plane)
        out[i] = np.moveaxis(plane, 0, -1) if channels else plane
    return out


def _probability_uint8(probability: np.ndarray) -> np.ndarray:
    """0..1 as 0..255, rounded: what the files' slope 1/255 reads back."""
    return np.clip(probability * 255.0 + 0.5, 0, 255).astype(np.uint8)


def write_probability(probability: np.ndarray, source: SourceGrid, path: Path, overwrite: bool = False) -> Path:
    """Write a probability map already on the CT's internal grid (uint8, slope 1/255), as the stage maps are."""
    return write_on_source_grid(_probability_uint8(np.asarray(probability, np.float32)), source, path,
                                overwrite=overwrite, scale=1.0 / 255.0)


def write_stage_probability(stage: np.ndarray, grid: StageGrid, source: SourceGrid, path: Path,
                            overwrite: bool = False) -> Path:
    """Write stage-grid probabilities (y1, or class channels first) on the CT's grid (uint8, slope 1/255)."""
    data = probability_to_source_uint8(grid, stage)
    return write_on_source_grid(data, source, path, overwrite=overwrite, scale=1.0 / 255.0)


def write_stage_mask(mask: np.ndarray, grid: StageGrid, source: SourceGrid, path: Path, overwrite: bool = False) -> Path:
    """Write a stage-grid 0/1 mask on the CT's grid: linear resampling, then >= 0.5."""
    resampled = probability_to_source_uint8(grid, (np.asarray(mask) > 0).astype(np.float32))
    # uint8 q = round(255 p) is >= 128 exactly when p >= 0.5.
    return write_labels((resampled >= 128).astype(np.uint8), source, path, overwrite=overwrite)


def write_prediction(
    result: Segmentation, case: CaseInput, out_dir: Path, intermediates: bool = False, overwrite: bool = False,
    keep_existing: bool = False, dicom_seg: bool = False, model: str | None = None,
) -> list[Path]:
    """Write the labels (and the intermediates) of one case; returns the paths written.

    ``keep_existing``: leave the outputs that exist as they are and write only the missing ones
    (``kits-seg predict --skip-existing``: what an interrupted run wrote is whole, and what a user
    corrected stays). ``dicom_seg``: a DICOM series' labels also as a DICOM SEG over it, written
    last (the NIfTI is there if the series' headers cannot be referenced), naming ``model``; of
    the labels file kept, where one is (it may hold the user's corrections).
    """
    source = result.prepared.volume.source
    grid = result.prepared.grid
    labels_path, *rest = output_paths(case, out_dir, intermediates, dicom_seg)
    writers = [(labels_path, lambda path: write_labels(result.labels, source, path, overwrite=overwrite))]
    if intermediates:
        y1_path, mask_path, probs_path = rest[:3]
        writers += [(y1_path, lambda path: write_stage_probability(result.y1, grid, source, path, overwrite)),
                    (mask_path, lambda path: write_stage_mask(result.mask, grid, source, path, overwrite)),
                    (probs_path, lambda path: write_stage_probability(result.probs, grid, source, path, overwrite))]
    if dicom_seg and case.is_dicom_series:  # last in output_paths, and written last
        writers.append((rest[-1], lambda path: _write_seg(result, case, labels_path, path, overwrite,
                                                          keep_existing, model)))
    return [write(path) for path, write in writers if not (keep_existing and path.exists())]


def _write_seg(result: Segmentation, case: CaseInput, labels_path: Path, path: Path, overwrite: bool,
               keep_existing: bool, model: str | None) -> Path:
    """The SEG of the labels file where one was kept (``--skip-existing``: it may hold a person's
    corrections, recorded as semiautomatic where it differs from the model's), else of the result."""
    from .dicom_seg import write_dicom_seg

    labels, algorithm_type = result.labels, "automatic"
    if keep_existing and labels_path.exists():
        kept = read_labels(labels_path, like=result.prepared.volume).array  # on the CT's grid, checked again
        if not np.array_equal(kept, labels):  # corrected, or made with other options: semiautomatic either way
            labels, algorithm_type = kept, "semiautomatic"
    return write_dicom_seg(labels, result.prepared.volume.source, case.image_path, path, overwrite=overwrite,
                           model=model, algorithm_type=algorithm_type)
