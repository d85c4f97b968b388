"""Labels written as a DICOM Segmentation (SEG) object over the CT series they were made from.

A radiology team's PACS and viewers (OHIF, 3D Slicer, Horos...) show a SEG over its CT by the
references it carries: the study, the series, the frame of reference, and each frame's source
slice. The label map must therefore lie on the series' own grid, as
:func:`kitseg.dicom.read_dicom_series` reads it; it is checked, and each frame is tied to its
slice in position order.

highdicom builds the object: the SEG IOD has some twenty required modules and per-frame
functional groups that PACS validate, and highdicom, written by members of the DICOM
standards community, validates them; writing them by hand with pydicom would be longer and
less trustworthy. Segments: kidney and kidney tumor (KiTS19's labels 1 and 2), coded in
SNOMED CT as DICOM's CID 7150/7151 have them.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path

import numpy as np

from . import __version__
from .atomic import atomic_path
from .config import SEG_ALGORITHM_TYPES
from .dicom import SeriesGeometry, series_geometry
from .geometry import SourceGrid, source_grid_for
from .io import InputError, is_dicom_file, is_nifti, name_a_few

log = logging.getLogger(__name__)

#: Patient and study attributes a CT must carry, if empty (DICOM type 2), that anonymisers
#: sometimes drop altogether; the SEG copies them, so those missing are copied as empty.
_TYPE2_COPIED = ("PatientID", "PatientName", "PatientBirthDate", "PatientSex", "AccessionNumber", "StudyID",
                 "StudyDate", "StudyTime", "ReferringPhysicianName")
#: What ties a SEG to its CT in a PACS (type 1): without it no viewer could place the SEG.
_REQUIRED = ("StudyInstanceUID", "SeriesInstanceUID", "FrameOfReferenceUID", "SOPInstanceUID", "SOPClassUID")
#: Shared by every slice of one series (a SEG references one study, in one frame of reference).
_SHARED = ("StudyInstanceUID", "SeriesInstanceUID", "FrameOfReferenceUID")
_SEG_SERIES_NUMBER_OFFSET = 1000  # the SEG lists beside its CT in a PACS: CT series 3, SEG series 1003
#: The segments' labels by KiTS19 value, and the colours viewers show them in (the plugin's).
SEGMENT_LABELS = {1: "kidney", 2: "kidney tumor"}
_DISPLAY_RGB = {1: (255, 32, 32), 2: (255, 212, 0)}
#: Type 2 attributes copied into the SEG whose value must parse as its kind (a date, a time, M/F/O);
#: a malformed one, which highdicom refuses, is copied empty.
_FORMATS = {"StudyDate": "DA", "PatientBirthDate": "DA", "StudyTime": "TM"}
_MAX_LENGTH = {"AccessionNumber": 16, "StudyID": 16, "PatientID": 64}  # SH, SH, LO


def _highdicom():
    try:
        import highdicom
    except ImportError:
        raise InputError("writing DICOM SEG needs highdicom: pip install highdicom") from None
    return highdicom


def check_can_write_seg() -> None:
    """Raise :class:`InputError` now, before minutes of work, if highdicom is missing."""
    _highdicom()


def _segment_descriptions(values: list[int], algorithm_type: str, model: str | None) -> list:
    """One segment for each of ``values`` (1 kidney, 2 tumor), numbered 1, 2... as the standard asks."""
    hd = _highdicom()
    from pydicom.sr.codedict import codes

    algorithm = {"algorithm_type": hd.seg.SegmentAlgorithmTypeValues[algorithm_type.upper()]}
    if algorithm_type != "manual":  # a person's own drawing names no algorithm
        algorithm["algorithm_identification"] = hd.AlgorithmIdentificationSequence(
            name="napari-kits", version=__version__, family=codes.DCM.ArtificialIntelligence,
            parameters={"model": model} if model else None)
    kinds = {
        1: dict(segment_label=SEGMENT_LABELS[1], segmented_property_category=codes.cid7150.AnatomicalStructure,
                segmented_property_type=codes.SCT.Kidney),
        2: dict(segment_label=SEGMENT_LABELS[2],
                segmented_property_category=codes.cid7150.MorphologicallyAbnormalStructure,
                segmented_property_type=codes.SCT.Neoplasm, anatomic_regions=[codes.SCT.Kidney]),
    }
    return [hd.seg.SegmentDescription(segment_number=number, **kinds[value], **algorithm,
                                      display_color=hd.color.CIELabColor.from_rgb(*_DISPLAY_RGB[value]))
            for number, value in enumerate(values, start=1)]


class SeriesNotReferenceable(InputError):
    """A series whose headers lack what a SEG must reference (``reason``), named by ``path``."""

    def __init__(self, path: Path, reason: str):
        super().__init__(f"{path}: {reason}; save the labels as NIfTI instead")
        self.path, self.reason = path, reason


def _source_headers(geometry: SeriesGeometry, warn: bool = True) -> list:
    """The series' slice headers in position order (the SEG's frames follow them), read anew (what is
    put back is the SEG's business): the type 2 attributes an anonymiser dropped put back empty, the
    SOP UIDs it blanked taken from the file meta, and SliceThickness, where missing, the step between
    slices. A series without what ties a SEG to it, or whose slices disagree on it, is refused."""
    import pydicom

    headers, malformed = [], {}
    for item in geometry.slices:
        ds = pydicom.dcmread(item.path, stop_before_pixels=True, force=True)
        meta = getattr(ds, "file_meta", {})
        for keyword in ("SOPClassUID", "SOPInstanceUID"):  # blanked by some anonymisers, kept in the file meta
            if not _given(ds, keyword) and _given(meta, f"MediaStorage{keyword}"):
                setattr(ds, keyword, getattr(meta, f"MediaStorage{keyword}"))
        missing = [keyword for keyword in _REQUIRED if not _given(ds, keyword)]
        if missing:
            raise SeriesNotReferenceable(item.path, f"has no {' or '.join(missing)} (an anonymiser removed it?), "
                                                    "which a DICOM SEG must reference to be shown over its CT")
        for keyword in _TYPE2_COPIED:
            if keyword not in ds or not _well_formed(ds, keyword):
                if keyword in ds:
                    malformed.setdefault(keyword, str(getattr(ds, keyword)))
                setattr(ds, keyword, None)
        if not _given(ds, "SliceThickness"):  # type 2 in CT; the SEG's pixel measures need a value
            ds.SliceThickness = f"{float(np.linalg.norm(geometry.affine[:3, 2])):.6g}"
        if headers:  # the series check allowed rounding noise between slices; highdicom wants them equal
            ds.ImageOrientationPatient = headers[0].ImageOrientationPatient
            ds.PixelSpacing = headers[0].PixelSpacing
        headers.append(ds)
    for keyword in _SHARED:
        values = {str(getattr(ds, keyword)) for ds in headers}
        if len(values) > 1:
            raise SeriesNotReferenceable(geometry.folder, f"its slices name {len(values)} different {keyword}s; a "
                                                          "DICOM SEG references one")
    instances = [str(ds.SOPInstanceUID) for ds in headers]
    if len(set(instances)) < len(instances):
        raise SeriesNotReferenceable(geometry.folder, "two of its slices share a SOPInstanceUID, so a SEG's frames "
                                                      "could not say which slice each belongs to")
    if warn and malformed:
        log.warning("%s: malformed %s; the SEG copies them empty", geometry.folder,
                    ", ".join(f"{keyword} ({value!r})" for keyword, value in malformed.items()))
    return headers


def _given(ds, keyword: str) -> bool:
    return bool(str(getattr(ds, keyword, "") or "").strip())


def _well_formed(ds, keyword: str) -> bool:
    """An empty value, or one that parses as its kind (:data:`_FORMATS`; PatientSex: M, F or O)."""
    from pydicom import valuerep

    value = str(getattr(ds, keyword, "") or "").strip()
    if not value:
        return True
    if keyword == "PatientSex":
        return value in ("M", "F", "O")
    if len(value) > _MAX_LENGTH.get(keyword, 64):
        return False
    kind = _FORMATS.get(keyword)
    if kind == "DA":  # YYYYMMDD: pydicom also parses the retired YYYY.MM.DD, which a SEG may not hold
        return bool(re.fullmatch(r"\d{8}", value)) and _parses(valuerep.DA, value)
    return kind is None or _parses(getattr(valuerep, kind), value)


def _parses(kind, value: str) -> bool:
    try:
        kind(value)
    except ValueError:
        return False
    return True


def check_seg_output(path: Path) -> None:
    """Raise :class:`InputError` if ``path`` is no name for a SEG (``.dcm``), is a folder, or is a
    DICOM file other than a SEG (a slice, a scout or a report: never this tool's to replace)."""
    path = Path(path)
    if path.suffix.lower() != ".dcm":
        raise InputError(f"{path}: a DICOM SEG file name must end in .dcm")
    if path.is_dir():
        raise InputError(f"{path}: is a folder; choose a file name for the SEG")
    if path.is_file() and is_dicom_file(path):
        import pydicom

        modality = str(pydicom.dcmread(path, stop_before_pixels=True, force=True, specific_tags=["Modality"])
                       .get("Modality", "")).upper()
        if modality != "SEG":
            raise InputError(f"{path}: is a DICOM {modality or 'file'}, not a SEG; choose another name")


def _check_output(path: Path, overwrite: bool) -> None:
    check_seg_output(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path}: exists already (pass overwrite=True / --overwrite to replace it)")


#: How far (in voxels) a corner of the labels' grid may lie from the series' own: labels made on
#: another tool's grid of the series (dcm2niix's affine from the first and last positions, where
#: they are written to 0.1 mm, differs by some 0.003 mm) still cover the same voxels.
GRID_TOLERANCE_VOXELS = 0.05


def _check_on_series_grid(source: SourceGrid, series_grid: SourceGrid, where: str, series_name: str,
                          path: Path) -> None:
    """Compared as read: the same voxels stored in another axis order (ITK-SNAP's) overlay too."""
    if source.internal_shape() != series_grid.internal_shape():
        order = " (in another axis order)" if tuple(source.shape) == tuple(series_grid.shape) else ""
        raise InputError(f"{where}shape {source.shape} differs from {series_name} {series_grid.shape}{order}; a SEG "
                         f"holds labels of its own series only: {path} not written")
    shape = np.array(source.internal_shape())
    corners = np.array([[i, j, k, 1.0] for i in (0, shape[0] - 1) for j in (0, shape[1] - 1)
                        for k in (0, shape[2] - 1)]).T
    placed = np.linalg.inv(series_grid.internal_affine()) @ source.internal_affine() @ corners
    off = float(np.abs(placed[:3] - corners[:3]).max())
    if off > GRID_TOLERANCE_VOXELS:
        raise InputError(f"{where}lies {off:.2f} voxels off {series_name} grid (its affine differs): the two do not "
                         f"overlay; a SEG holds labels of its own series only: {path} not written")


def check_seg_source(series: str | os.PathLike) -> None:
    """Raise :class:`SeriesNotReferenceable` if the series' headers lack what a SEG must reference
    (before minutes of work; what is malformed is said when the SEG is written)."""
    _source_headers(series_geometry(Path(series)), warn=False)


def write_dicom_seg(labels: np.ndarray, source: SourceGrid, series: str | os.PathLike, path: str | os.PathLike, *,
                    overwrite: bool = False, algorithm_type: str = "automatic", model: str | None = None) -> Path:
    """Write ``labels`` (internal orientation, on ``source``, which must be the series' grid; values
    0, 1, 2) as a DICOM SEG at ``path`` (``.dcm``) referencing the CT series ``series`` (its folder,
    or one of its files: its series). Returns the path written.

    ``algorithm_type``: one of :data:`kitseg.config.SEG_ALGORITHM_TYPES`; ``model``: the model
    file's name, recorded as the algorithm's parameter. Segments: those of kidney and kidney tumor
    found, numbered 1, 2 in that order (a SEG without tumor holds the kidney's alone; read them
    by their labels and codes). Written atomically; an existing file is replaced only with
    ``overwrite``, and never a DICOM file other than a SEG (a slice, a scout, a report).

    Raises:
        InputError: the labels are not on the series' grid or hold other values than 0, 1, 2; the
            series' headers lack what a SEG must reference; ``path`` does not end in ``.dcm``.
        FileExistsError: ``path`` exists and ``overwrite`` is False.
    """
    hd = _highdicom()
    series, path = Path(series), Path(path)
    if algorithm_type not in SEG_ALGORITHM_TYPES:
        raise ValueError(f"algorithm_type must be one of {', '.join(SEG_ALGORITHM_TYPES)}, not {algorithm_type!r}")
    geometry = series_geometry(series)
    _check_output(path, overwrite)  # a slice of the series is a CT file: refused there too
    # Named by their file where they were read from one (kits-seg dicom-seg), else as "the labels".
    what = source.path if source.path is not None and is_nifti(Path(source.path)) else "the labels"
    series_grid = source_grid_for((geometry.columns, geometry.rows, len(geometry.slices)), geometry.affine,
                                  geometry.path)
    _check_on_series_grid(source, series_grid, f"{what}: ", f"the series {geometry.folder}'s", path)
    labels = np.asarray(labels)
    if labels.min() < 0 or labels.max() > 2:
        stray = sorted(set(np.unique(labels).tolist()) - {0, 1, 2})
        raise InputError(f"{what}: holds label {name_a_few(stray, 8)}; a SEG of napari-kits holds kidney (1) and "
                         f"tumor (2): relabel the others (0 erases), or save as NIfTI: {path} not written")
    # (column, row, slice) on the series' grid -> (slice, row, column): frame k is slice k's pixels.
    frames = series_grid.to_source(labels.astype(np.uint8)).transpose(2, 1, 0)
    present = [value for value in (1, 2) if (frames == value).any()]
    if present:  # only the segments found, numbered 1, 2: a declared segment without frames stalls viewers
        numbered = np.zeros(3, np.uint8)
        numbered[present] = np.arange(1, len(present) + 1)
        frames = numbered[frames]
    headers = _source_headers(geometry)
    number = str(getattr(headers[0], "SeriesNumber", "") or "").strip()
    # Beyond IS's range (2**31 - 1) with the offset, or negative: the offset alone.
    number = int(number) if number.isdigit() and int(number) < 2**31 - 1 - _SEG_SERIES_NUMBER_OFFSET else 0
    try:
        segmentation = hd.seg.Segmentation(
            source_images=headers,
            pixel_array=np.ascontiguousarray(frames),
            segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
            segment_descriptions=_segment_descriptions(present or [1, 2], algorithm_type, model),
            series_instance_uid=hd.UID(),
            series_number=_SEG_SERIES_NUMBER_OFFSET + number,
            sop_instance_uid=hd.UID(),
            instance_number=1,
            manufacturer="napari-kits",
            manufacturer_model_name="kits-seg",
            software_versions=__version__,
            device_serial_number="napari-kits",  # software: no device's serial number to give
            series_description=f"{' and '.join(SEGMENT_LABELS[v] for v in present or (1, 2))} (napari-kits)",
            content_label="KIDNEY_TUMOR",
            content_creator_name="",  # type 2: present; who corrected the labels is not known here
            # Nothing found: every frame kept (a SEG needs frames), each segment's empty.
            omit_empty_frames=bool(present),
        )
    except (ValueError, AttributeError, TypeError) as exc:  # a header highdicom finds malformed (a date, a code)
        raise InputError(f"{geometry.folder}: its headers cannot make a DICOM SEG ({exc}); save the labels as NIfTI "
                         "instead") from None
    with atomic_path(path, suffix=".dcm") as temporary:
        segmentation.save_as(temporary)
    return path


def series_uid(series: str | os.PathLike) -> str:
    """The SeriesInstanceUID of a series (its folder, or one of its files)."""
    return series_geometry(Path(series)).series_uid


def referenced_series(path: str | os.PathLike) -> str:
    """The SeriesInstanceUID of the CT series a SEG file references (what ``--skip-existing`` checks)."""
    import pydicom

    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        return str(ds.ReferencedSeriesSequence[0].SeriesInstanceUID)
    except Exception as exc:  # pydicom raises several kinds for a damaged or foreign file
        raise InputError(f"{path}: cannot be read as a DICOM SEG of a series ({exc})") from None
