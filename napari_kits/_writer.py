"""npe2 writers: a result layer as NIfTI on its CT file's exact grid, or labels of a DICOM
series as a DICOM SEG over it (a ``.dcm`` name).

napari's own save dialog has already asked before replacing a file, so these overwrite; the
writer still refuses to replace the file a layer was read from (the CT, or a
result opened to be corrected), or that of any layer open in the viewer.
"""

from __future__ import annotations

from typing import Any

from ._layers import RUN_KEY, geometry_of
from ._save import SaveError, refuse_open_files, save_layer, viewer_layers, with_output_suffix


def write_labels(path: str, data: Any, meta: dict) -> list[str]:
    """Labels (the result, a corrected result, the mask) -> ``path`` (.nii.gz / .nii; .dcm: a DICOM SEG)."""
    return _write(path, data, meta)


def write_probability(path: str, data: Any, meta: dict) -> list[str]:
    """A probability layer (y1, class probabilities) -> ``path``, uint8 with slope 1/255."""
    return _write(path, data, meta)


def _write(path: str, data: Any, meta: dict) -> list[str]:
    try:
        refuse_open_files(path, viewer_layers())
        metadata = meta.get("metadata", {})
        return [str(save_layer(data, geometry_of(metadata), path, overwrite=True, layer_name=meta.get("name"),
                               run=metadata.get(RUN_KEY)))]
    except ValueError as error:  # napari would show "not a valid writer" in place of the message
        target = str(with_output_suffix(path))
        raise SaveError(str(error) if str(error).startswith(target) else f"{target}: {error}") from error
