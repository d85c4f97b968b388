"""Engine volumes <-> napari layer data: placement in world space and the metadata writers need.

napari world coordinates here are millimetres along the CT's own internal axes (slice, row,
column = axis codes I, P, L; see :mod:`kitseg.geometry`): a layer's ``scale`` is its voxel
spacing and its ``translate`` is its origin projected onto those axes. The stage grid (5 mm
slices) has the same axis directions as its CT, so the same projection places ``y1`` and the
mask exactly over the CT without resampling them. An oblique scan is shown in its own
(rotated) frame, as every slice viewer does; distances stay in mm.

Every layer the plugin creates carries ``layer.metadata[META_KEY]``, a :class:`LayerGeometry`,
so the writer can put the pixels back on the source file's exact grid.

No Qt and no torch here: the reader, writer and sample data import this module.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

META_KEY = "kitseg"
#: ``layer.metadata[RUN_KEY]``: how a layer's labels were made, by a run or as a DICOM SEG read says:
#: ``{"checksum": checksum(labels), "model": file name or None, "algorithm_type": "automatic",
#: "semiautomatic" or "manual"}``; a SEG saved of automatic labels unchanged is automatic still.
RUN_KEY = "kitseg_run"

#: The abdominal soft-tissue window W400/L40, as (min, max) HU.
ABDOMEN_WINDOW = (-160.0, 240.0)

Kind = Literal["ct", "ground_truth", "labels", "y1", "mask", "probability"]

#: Any other value (napari's brush paints whatever number is picked): magenta, seen at once,
#: since scoring and saving refuse it; transparent, it would look like erased kidney.
STRAY_COLOR = "#ff00ff"
#: KiTS21/23 label cysts 3: in a reference they lie within the KiTS19 kidney region (label > 0),
#: as KiTS21's "kidney and masses" counts them and ``kits-seg evaluate --map-labels 3=1`` scores them.
KITS21_CYST = 3
#: Label colours: kidney red, tumor yellow (KiTS19 values); background transparent.
LABEL_COLORS: dict[int | None, str] = {None: STRAY_COLOR, 0: "transparent", 1: "#ff2020", 2: "#ffd400"}
#: The stage-2 region of interest: a quiet cyan wash that does not hide the CT.
MASK_COLORS: dict[int | None, str] = {None: STRAY_COLOR, 0: "transparent", 1: "#00b4ff"}


@dataclass(frozen=True)
class LayerGeometry:
    """Where a layer's pixels come from, and how to write them back.

    Attributes:
        kind: what the layer holds (the writer resamples ``y1``/``mask``/``probability`` layers).
        source: the CT file's :class:`kitseg.geometry.SourceGrid` (shape, affine, reorientation).
        stage_grid: the :class:`kitseg.preprocess.StageGrid` for layers on the 5 mm stage grid,
            else ``None`` (the layer is on the CT's internal grid).
        ct_name: name of the CT layer the layer belongs to (output file names derive from it).
        case_id: the KiTS19 case number ("00042") when the CT came from a case folder.
        source_holds: what the file at ``source.path`` holds: the CT, or for a result opened
            from a file (to correct it, or show it over its CT), that result's kind.
        read_from: the layer's own file where it is not ``source.path`` (a case folder's ground
            truth, placed on its CT's grid): an input too, never written over.
        offered_as_reference: a label map opened from a file that the widget may score results
            against unasked: KiTS19 values (0, 1, 2; KiTS21/23's cysts, 3, too) and not named as a result; another
            tool's organ map or a saved prediction opened to correct is scored against only when
            chosen. A case's ground truth (kind ``ground_truth``) always is.
        file_labels: the values beyond KiTS19's 0, 1, 2 that the layer's file held when it was
            read (KiTS21/23's cysts, 3; another tool's classes): saved back as they were, where a
            value painted anew is refused (``kitseg.config.KITS_LABELS.stray_values``).
    """

    kind: Kind
    source: Any
    stage_grid: Any = None
    ct_name: str = "volume"
    case_id: str | None = None
    source_holds: Kind = "ct"
    read_from: Any = None
    offered_as_reference: bool = False
    file_labels: tuple[int, ...] = ()

    @property
    def on_stage_grid(self) -> bool:
        return self.stage_grid is not None

    def with_kind(self, kind: Kind, stage_grid: Any = None) -> "LayerGeometry":
        return LayerGeometry(kind, self.source, stage_grid, self.ct_name, self.case_id, self.source_holds)


def checksum(labels: np.ndarray) -> tuple:
    """A cheap fingerprint of a label array (about 0.1 s for a 1000-slice CT), to notice edits."""
    import zlib

    labels = np.ascontiguousarray(labels)
    return labels.shape, labels.dtype.str, zlib.crc32(labels.data)


def placement(affine: np.ndarray) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """``(scale, translate)`` of an internal-orientation array with voxel -> world ``affine``.

    scale = column norms (mm per voxel); translate = the origin projected onto the unit axes,
    so two grids with parallel axes (a CT and its stage grid) overlay in napari's world.
    """
    affine = np.asarray(affine, dtype=np.float64)
    columns = affine[:3, :3]
    scale = np.linalg.norm(columns, axis=0)
    axes = columns / scale
    translate = axes.T @ affine[:3, 3]
    return tuple(float(s) for s in scale), tuple(float(t) for t in translate)


def geometry_of(layer_or_metadata: Any) -> LayerGeometry | None:
    """The :class:`LayerGeometry` of a layer, a layer's metadata dict or LayerData kwargs, if any."""
    metadata = getattr(layer_or_metadata, "metadata", layer_or_metadata)
    if not isinstance(metadata, dict):
        return None
    if META_KEY not in metadata and isinstance(metadata.get("metadata"), dict):
        metadata = metadata["metadata"]  # LayerData kwargs
    geometry = metadata.get(META_KEY)
    return geometry if isinstance(geometry, LayerGeometry) else None


def ct_layer_data(volume: Any, name: str, case_id: str | None = None) -> tuple:
    """napari LayerData for a CT :class:`kitseg.geometry.Volume` (abdominal window, gray)."""
    scale, translate = placement(volume.affine)
    geometry = LayerGeometry("ct", volume.source, None, name, case_id)
    kwargs = {
        "name": name,
        "scale": scale,
        "translate": translate,
        "colormap": "gray",
        "contrast_limits": ABDOMEN_WINDOW,
        "metadata": {META_KEY: geometry},
    }
    return (volume.array, kwargs, "image")


def labels_layer_kwargs(name: str, geometry: LayerGeometry, affine: np.ndarray, opacity: float = 0.5,
                        kits_colors: bool = True, shows: int | None = None) -> dict:
    """A labels layer in the KiTS19 colours; ``kits_colors=False`` (another tool's map of many
    classes, opened to look at) keeps napari's own colour per value; ``shows``: the one KiTS
    class a 0/1 map's 1 stands for (KiTS21's per-annotator instance masks), in that class's colour."""
    scale, translate = placement(affine)
    colors = MASK_COLORS if geometry.kind == "mask" else LABEL_COLORS
    if shows is not None:
        colors = {**colors, 1: colors.get(shows, STRAY_COLOR)}
    return {
        "name": name,
        "scale": scale,
        "translate": translate,
        **({"colormap": dict(colors)} if kits_colors else {}),
        "opacity": opacity,
        "metadata": {META_KEY: geometry},
    }


def probability_layer_kwargs(
    name: str, geometry: LayerGeometry, affine: np.ndarray, colormap: str = "inferno"
) -> dict:
    """A translucent 0..1 probability overlay (additive: zero probability shows the CT as is)."""
    scale, translate = placement(affine)
    return {
        "name": name,
        "scale": scale,
        "translate": translate,
        "colormap": colormap,
        "contrast_limits": (0.0, 1.0),
        "opacity": 0.6,
        "blending": "additive",
        "metadata": {META_KEY: geometry},
    }


def ground_truth_layer_data(labels: Any, ct_name: str, case_id: str | None = None, read_from: Any = None) -> tuple:
    """napari LayerData for a reference label map :class:`~kitseg.geometry.Volume` (``read_from``: its file)."""
    from kitseg.config import KITS_LABELS

    geometry = LayerGeometry("ground_truth", labels.source, None, ct_name, case_id, read_from=read_from,
                             file_labels=tuple(KITS_LABELS.stray_values(labels.array)))
    kwargs = labels_layer_kwargs(f"{ct_name} ground truth", geometry, labels.affine, opacity=0.45)
    return (labels.array, kwargs, "labels")

