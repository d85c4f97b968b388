"""Labels written as a DICOM Segmentation (SEG) object over the CT series they were made from.

A radiology team's PACS and viewers (OHIF, 3D Slicer, Horos...) show a SEG over its CT by the
references it carries: the study, the frame of reference, and each frame's source slice. The
label map must therefore lie on the series' own grid, as :func:`kitseg.dicom.read_dicom_series`
reads it; it is checked, and each frame is tied to its slice in position order.

highdicom builds the object: the SEG IOD has some twenty required modules and per-frame
functional groups that PACS validate, and highdicom, written by members of the DICOM
standards community, validates them; writing them by hand with pydicom would be longer and
less trustworthy. Segments: 1 kidney, 2 kidney tumor (KiTS19's labels), coded in SNOMED CT.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from . import __version__
from .atomic import atomic_path
from .dicom import SeriesGeometry, series_geometry, series_of_file
from .geometry import SourceGrid
from .io import InputError, is_nifti, name_a_few

#: Who made the labels, in DICOM's terms (Segment Algorithm Type): a model alone, or a model's
#: labels a person corrected (what the plugin saves), or a person alone.
ALGORITHM_TYPES = ("automatic", "semiautomatic", "manual")
#: Patient and study attributes a CT must carry, if empty (DICOM type 2), that anonymisers
#: sometimes drop altogether; the SEG copies them, so those missing are copied as empty.
_TYPE2_COPIED = ("PatientID", "PatientName", "PatientBirthDate", "PatientSex", "AccessionNumber", "StudyID",
                 "StudyDate", "StudyTime", "ReferringPhysicianName")
#: What ties a SEG to its CT in a PACS (type 1): without it no viewer could place the SEG.
_REQUIRED = ("StudyInstanceUID", "FrameOfReferenceUID", "SOPInstanceUID", "SOPClassUID")
_SEG_SERIES_NUMBER_OFFSET = 1000  # the SEG lists beside its CT in a PACS: CT series 3, SEG series 1003


def _highdicom():
    try:
        import highdicom
    except ImportError:
        raise InputError("writing DICOM SEG needs highdicom: pip install highdicom") from None
    return highdicom


def check_can_write_seg() -> None:
    """Raise :class:`InputError` now, before minutes of work, if highdicom is missing."""
    _highdicom()


def _segment_descriptions(algorithm_type: str, model: str | None) -> list:
    hd = _highdicom()
    from pydicom.sr.coding import Code

    kidney = Code("64033007", "SCT", "Kidney")
    algorithm = dict(
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues[algorithm_type.upper()],
        algorithm_identification=None,
    )
    if algorithm_type != "manual":  # required for the others, forbidden for a person's own drawing
        algorithm["algorithm_identification"] = hd.AlgorithmIdentificationSequence(
            name="napari-kits", version=__version__, family=Code("123109", "DCM", "Artificial Intelligence"),
            parameters={"model": model} if model else None)
    return [
        hd.seg.SegmentDescription(
            segment_number=1, segment_label="kidney",
            segmented_property_category=Code("123037004", "SCT", "Anatomical Structure"),
            segmented_property_type=kidney, **algorithm),
        hd.seg.SegmentDescription(
            segment_number=2, segment_label="kidney tumor",
            segmented_property_category=Code("49755003", "SCT", "Morphologically Altered Structure"),
            segmented_property_type=Code("108369006", "SCT", "Neoplasm"), anatomic_regions=[kidney], **algorithm),
    ]


def _source_headers(geometry: SeriesGeometry) -> list:
    """The series' slice headers in position order (the SEG's frames follow them), read anew (what is
    put back is the SEG's business): the type 2 attributes an anonymiser dropped put back empty, the
    SOP UIDs it blanked taken from the file meta; one without what ties a SEG to it is refused."""
    import pydicom

    headers = []
    for item in geometry.slices:
        ds = pydicom.dcmread(item.path, stop_before_pixels=True, force=True)
        meta = getattr(ds, "file_meta", {})
        for keyword in ("SOPClassUID", "SOPInstanceUID"):  # blanked by some anonymisers, kept in the file meta
            if not _given(ds, keyword) and _given(meta, f"MediaStorage{keyword}"):
                setattr(ds, keyword, getattr(meta, f"MediaStorage{keyword}"))
        missing = [keyword for keyword in _REQUIRED if not _given(ds, keyword)]
        if missing:
            raise InputError(f"{item.path}: has no {' or '.join(missing)} (an anonymiser removed it?), which a DICOM "
                             "SEG must reference to be shown over its CT; save the labels as NIfTI instead")
        for keyword in _TYPE2_COPIED:
            if keyword not in ds:
                setattr(ds, keyword, None)
        headers.append(ds)
    return headers


def _given(ds, keyword: str) -> bool:
    return bool(str(getattr(ds, keyword, "") or "").strip())


def write_dicom_seg(labels: np.ndarray, source: SourceGrid, series: str | os.PathLike, path: str | os.PathLike, *,
                    overwrite: bool = False, algorithm_type: str = "automatic", model: str | None = None) -> Path:
    """Write ``labels`` (internal orientation, on ``source``, the series' grid; values 0, 1, 2) as
    a DICOM SEG at ``path`` (``.dcm``) referencing the CT series ``series`` (its folder, or one of
    its files: its series). Returns the path written.

    ``algorithm_type``: one of :data:`ALGORITHM_TYPES`; ``model``: the model file's name, recorded
    as the algorithm's parameter. Written atomically; an existing file is replaced only with
    ``overwrite``, and never one of the series' own files.

    Raises:
        InputError: the labels are not on the series' grid or hold other values than 0, 1, 2; the
            series' headers lack what a SEG must reference; ``path`` does not end in ``.dcm``.
        FileExistsError: ``path`` exists and ``overwrite`` is False.
    """
    hd = _highdicom()
    series, path = Path(series), Path(path)
    if algorithm_type not in ALGORITHM_TYPES:
        raise ValueError(f"algorithm_type must be one of {', '.join(ALGORITHM_TYPES)}, not {algorithm_type!r}")
    if path.suffix.lower() != ".dcm":
        raise InputError(f"{path}: a DICOM SEG file name must end in .dcm")
    geometry = series_geometry(series)
    if any(path.exists() and os.path.samefile(path, item.path) for item in geometry.slices):
        raise InputError(f"{path}: is a slice of the series {geometry.folder}; choose another name")
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path}: exists already (pass overwrite=True / --overwrite to replace it)")
    # Named by their file where they were read from one (kits-seg dicom-seg), else as "the labels".
    what = source.path if source.path is not None and is_nifti(Path(source.path)) else "the labels"
    grid = (geometry.columns, geometry.rows, len(geometry.slices))
    if tuple(source.shape) != grid or not np.allclose(source.affine, geometry.affine, atol=1e-3):
        raise InputError(f"{what}: on another grid than the series {geometry.folder} ({tuple(source.shape)} against "
                         f"{grid} voxels, or placed elsewhere); a SEG holds labels of its own series only: {path} "
                         "not written")
    labels = np.asarray(labels)
    stray = sorted(set(np.unique(labels).tolist()) - {0, 1, 2})
    if stray:
        raise InputError(f"{what}: holds label {name_a_few(stray, 8)}; a SEG of napari-kits holds kidney (1) and "
                         f"tumor (2): relabel the others (0 erases), or save as NIfTI: {path} not written")
    frames = source.to_source(labels.astype(np.uint8)).transpose(2, 1, 0)  # (column, row, slice) -> (slice, row, column)
    headers = _source_headers(geometry)
    number = str(getattr(headers[0], "SeriesNumber", "") or "").strip()
    segmentation = hd.seg.Segmentation(
        source_images=headers,
        omit_empty_frames=bool(frames.any()),  # no frame at all is no SEG: an empty one keeps them all
        pixel_array=np.ascontiguousarray(frames),
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=_segment_descriptions(algorithm_type, model),
        series_instance_uid=hd.UID(),
        series_number=_SEG_SERIES_NUMBER_OFFSET + (int(number) if number.isdigit() else 0),
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer="napari-kits",
        manufacturer_model_name="kits-seg",
        software_versions=__version__,
        device_serial_number="none",
        series_description="kidney and tumor (napari-kits)",
        content_label="KIDNEY_TUMOR",
    )
    with atomic_path(path, suffix=".dcm") as temporary:
        segmentation.save_as(temporary)
    return path


def series_uid(series: str | os.PathLike) -> str:
    """The SeriesInstanceUID of a series (its folder, or one of its files)."""
    return series_of_file(series_geometry(Path(series)).slices[0].path)[0]


def referenced_series(path: str | os.PathLike) -> str:
    """The SeriesInstanceUID of the CT series a SEG file references (what ``--skip-existing`` checks)."""
    import pydicom

    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        return str(ds.ReferencedSeriesSequence[0].SeriesInstanceUID)
    except Exception as exc:  # pydicom raises several kinds for a damaged or foreign file
        raise InputError(f"{path}: cannot be read as a DICOM SEG of a series ({exc})") from None
