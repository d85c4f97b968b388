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

Read back (:func:`read_dicom_seg`: this tool's SEG, or another's), a SEG's kidney and tumor
segments become KiTS19 labels on its series' grid, found by the series it references; highdicom
places its frames on that grid, refusing what would need resampling.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import __version__
from .atomic import atomic_path
from .config import SEG_ALGORITHM_TYPES
from .dicom import SeriesGeometry, series_geometry
from .geometry import SourceGrid, Volume, source_grid_for
from .io import InputError, is_dicom_file, is_dicom_seg, is_nifti, name_a_few

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
    return referenced_series_uids(path)[0]


def referenced_series_uids(path: str | os.PathLike) -> list[str]:
    """The SeriesInstanceUIDs a SEG file references (one, as a rule)."""
    return _seg_header(Path(path))[1]


# ---------------------------------------------------------------------------- reading a SEG
# A segment's KiTS19 class, from its SegmentedPropertyTypeCode (SNOMED CT; old SRT designators match):
#   kidney, left kidney, right kidney                -> 1 kidney
#   neoplasm of kidney, malignant tumor of kidney    -> 2 tumor
#   neoplasm, mass, lesion: anatomic region a kidney -> 2 tumor
#                           no region, in a SEG that holds a kidney -> 2 tumor
#                           another organ, or no region and no kidney in the SEG -> left out
#   any other code, or none: by its label ("kidney", "tumor"...), else left out
_KIDNEY_CODES = (("64033007", "Kidney"), ("18639004", "Left kidney"), ("9846003", "Right kidney"))
_KIDNEY_TUMOR_CODES = (("126880001", "Neoplasm of kidney"), ("363518003", "Malignant tumor of kidney"))
_TUMOR_CODES = (("108369006", "Neoplasm"), ("4147007", "Mass"), ("52988006", "Lesion"))
_KIDNEY_LABELS = {"kidney", "kidneys", "left kidney", "right kidney", "kidney left", "kidney right",
                  "kidney_left", "kidney_right"}
_TUMOR_LABELS = {"tumor", "tumour", "kidney tumor", "kidney tumour", "renal tumor", "renal tumour", "renal mass"}


@dataclass(frozen=True)
class DicomSeg:
    """A DICOM SEG read as a KiTS19 label map on its CT series' grid.

    Attributes:
        labels: 0 background, 1 kidney, 2 tumor (tumor where segments overlap), in the internal
            orientation, on the grid :func:`kitseg.dicom.read_dicom_series` reads the series on.
        geometry: the grid of the series it segments (its slices' headers, read once).
        algorithm_type: how its kidney and tumor segments were made: "automatic" (by an algorithm
            alone: a result to correct), "semiautomatic" (an algorithm's, corrected by a person,
            or segments made in different ways) or "manual" (drawn by a person).
        by_napari_kits: written by this tool (Manufacturer "napari-kits").
        ignored: the segments that are neither kidney nor kidney tumor ("'Liver' (SCT 10200004)").
    """

    labels: Volume
    geometry: SeriesGeometry
    algorithm_type: str
    by_napari_kits: bool
    ignored: tuple[str, ...]

    @property
    def series(self) -> Path:
        """The series it segments: its folder, or one file of a folder holding several."""
        return self.geometry.path

    @property
    def automatic(self) -> bool:
        return self.algorithm_type == "automatic"


def _code(item, keyword: str):
    """The first entry of ``item``'s code sequence ``keyword`` as a pydicom Code (None if absent)."""
    from pydicom.sr.coding import Code

    entries = getattr(item, keyword, None) or []
    if not entries or not str(getattr(entries[0], "CodeValue", "") or ""):
        return None
    entry = entries[0]
    return Code(str(entry.CodeValue), str(getattr(entry, "CodingSchemeDesignator", "") or ""),
                str(getattr(entry, "CodeMeaning", "") or ""))


def _is_one_of(code, table: tuple) -> bool:
    from pydicom.sr.coding import Code

    return code is not None and any(code == Code(value, "SCT", meaning) for value, meaning in table)


def _describe_segment(segment) -> str:
    code = _code(segment, "SegmentedPropertyTypeCodeSequence")
    coded = f" ({code.scheme_designator} {code.value})" if code is not None else ""
    return f"'{getattr(segment, 'SegmentLabel', '') or (code.meaning if code else '?')}'{coded}"


def _kits_classes(segments) -> tuple[dict[int, int], list[str]]:
    """{segment number: KiTS19 class} of a SEG's segments (the table above), and the segments left
    out, described. A background segment (a LABELMAP SEG's) is passed over without a word."""
    classes, regionless, ignored = {}, [], []
    for segment in segments:
        number, code = int(segment.SegmentNumber), _code(segment, "SegmentedPropertyTypeCodeSequence")
        label = " ".join(str(getattr(segment, "SegmentLabel", "") or "").lower().split())
        if label == "background" or (code is not None and code.meaning.lower() == "background"):
            continue
        if _is_one_of(code, _KIDNEY_CODES):
            classes[number] = 1
        elif _is_one_of(code, _KIDNEY_TUMOR_CODES):
            classes[number] = 2
        elif _is_one_of(code, _TUMOR_CODES):
            region = _code(segment, "AnatomicRegionSequence")
            if region is None:
                regionless.append(segment)
            elif _is_one_of(region, _KIDNEY_CODES):
                classes[number] = 2
            else:
                ignored.append(_describe_segment(segment))
        elif label in _KIDNEY_LABELS or label in _TUMOR_LABELS:
            classes[number] = 1 if label in _KIDNEY_LABELS else 2
        else:
            ignored.append(_describe_segment(segment))
    for segment in regionless:
        if 1 in classes.values():
            classes[int(segment.SegmentNumber)] = 2
        else:
            ignored.append(_describe_segment(segment) + " of no named organ, in a SEG holding no kidney")
    return classes, ignored


def _algorithm_type(segments, classes: dict[int, int]) -> str:
    """How the segments read were made (:attr:`DicomSeg.algorithm_type`)."""
    made = {str(getattr(segment, "SegmentAlgorithmType", "") or "").lower()
            for segment in segments if int(segment.SegmentNumber) in classes}
    return made.pop() if len(made) == 1 and made <= set(SEG_ALGORITHM_TYPES) else "semiautomatic"


def _places_to_look(seg_path: Path, near: list[Path]):
    """Where the series a SEG segments may be, nearest first, each with whether to look at every
    file there (a folder holding several series, as a PACS export may) or at its first (a series
    folder): the SEG's folder, the series folders beside it, ``near`` (the CTs open in the plugin,
    the folders given to ``evaluate --series``), and the series folders of the folder above (a
    results folder inside the study's)."""
    from .io import dicom_series_folders

    yield seg_path.parent, True
    beside = dicom_series_folders(seg_path.parent)
    yield from ((folder, False) for folder in beside)
    yield from ((Path(p), True) for p in near)
    given = [folder for p in near for folder in dicom_series_folders(Path(p))]  # a study's series folders
    yield from ((folder, False) for folder in given)
    above = dicom_series_folders(seg_path.parent.parent)
    yield from ((folder, False) for folder in above)
    # Last, before giving up, every file of those folders and of the folder above: one may hold
    # several series (a study exported flat), which its first file cannot tell.
    yield from ((folder, True) for folder in [*beside, *given, *above, seg_path.parent.parent])


def _referenced_series_geometry(seg_path: Path, near: list[Path]) -> SeriesGeometry:
    """The grid of the CT series the SEG at ``seg_path`` segments, found by its SeriesInstanceUID
    (:func:`_places_to_look`): the nearest copy that reads as a series. Raises :class:`InputError`
    naming where it looked, or why what it found does not read."""
    from .dicom import series_of_file
    from .io import dicom_files

    seg_path = seg_path.absolute()
    wanted = _seg_header(seg_path)[1]
    looked, seen, unreadable = [], set(), []
    for place, every in _places_to_look(seg_path, near):
        if (place.resolve(), every) in seen or (place.resolve(), True) in seen:
            continue
        seen.add((place.resolve(), every))
        if str(place) not in looked:
            looked.append(str(place))
        for file in [place] if place.is_file() else dicom_files(place):
            try:
                series = series_of_file(file)
            except InputError:
                continue  # a damaged file: another's to name
            if series is not None and series[0] in wanted:
                try:
                    return series_geometry(file)
                except InputError as exc:  # a stray slice or two of the series copied elsewhere: look on
                    unreadable.append(str(exc))
                    break
            if series is not None and not every:
                break  # a series folder holds one series: its first slice tells which
    if unreadable:
        raise InputError(f"{seg_path}: its series {wanted[0]} was found, but not as a volume: {unreadable[0]}")
    raise InputError(f"{seg_path}: segments the series {wanted[0]}, found in none of {name_a_few(looked, 4)}; "
                     "put the SEG beside its series, or give the series (kits-seg dicom-seg SEG SERIES, "
                     "kits-seg evaluate --series FOLDER; in napari: open the series first)")


def _seg_header(path: Path) -> tuple:
    """A SEG's header (no pixels) and the SeriesInstanceUIDs it references; InputError if it is none."""
    import pydicom

    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True, force=True)
        uids = [str(item.SeriesInstanceUID) for item in ds.ReferencedSeriesSequence]
    except Exception as exc:  # pydicom raises several kinds for a damaged or foreign file
        raise InputError(f"{path}: cannot be read as a DICOM SEG of a series ({exc})") from None
    if not uids:
        raise InputError(f"{path}: names no series it segments (ReferencedSeriesSequence is empty)")
    return ds, uids


def _source_slices(ds) -> list[set[str]] | None:
    """The SOPInstanceUIDs of the slices each frame lies on; None where the frames cannot be placed
    by them: a frame names no slice, or says its pixels were moved off its slice's (its
    SpatialLocationsPreserved other than YES; absent, as pydicom-seg writes it, counts as YES)."""
    shared = (getattr(ds, "SharedFunctionalGroupsSequence", None) or [None])[0]
    frames = []
    for groups in getattr(ds, "PerFrameFunctionalGroupsSequence", []):
        derivation = (getattr(groups, "DerivationImageSequence", None)
                      or getattr(shared, "DerivationImageSequence", None) or [])
        sources = [source for item in derivation for source in getattr(item, "SourceImageSequence", [])]
        uids = {str(source.ReferencedSOPInstanceUID) for source in sources if "ReferencedSOPInstanceUID" in source}
        moved = any(str(getattr(source, "SpatialLocationsPreserved", "") or "YES").upper() != "YES"
                    for source in sources)
        if not uids or moved:
            return None
        frames.append(uids)
    return frames or None


def _check_on_series(header, geometry: SeriesGeometry, placed_by_slices: bool, path: Path) -> None:
    """The SEG's frames can lie on the series' grid: its pixels' rows and columns, and its frame of
    reference (another one only where its frames name their slices: pydicom-seg writes its own)."""
    if (int(header.Rows), int(header.Columns)) != (geometry.rows, geometry.columns):
        raise InputError(f"{path}: its frames are {header.Rows} x {header.Columns} pixels, the slices of "
                         f"{geometry.path} {geometry.rows} x {geometry.columns}; a SEG is read on its series' own grid only")
    frame = str(getattr(header, "FrameOfReferenceUID", "") or "")
    if geometry.frame_of_reference and frame != geometry.frame_of_reference:
        if not placed_by_slices:
            raise InputError(f"{path}: its frame of reference ({frame or 'none'}) is not its series' ({geometry.path}: "
                             f"{geometry.frame_of_reference}), and its frames name no slices of it to lie on (or say "
                             "they were moved off them): they cannot be placed on the CT")
        log.warning("%s: its frame of reference is not its series' (%s); its frames are placed on the slices they "
                    "name", path, geometry.path)


def read_dicom_seg(path: str | os.PathLike, series: str | os.PathLike | None = None,
                   near: list[Path] = ()) -> DicomSeg:
    """Read the DICOM SEG at ``path`` as KiTS19 labels on its CT series' grid.

    ``series``: the series it segments (its folder, or one of its files); by default found by
    :func:`_referenced_series_geometry` beside the SEG or in ``near``. Each frame is put on the slice
    it names as its source, so slice positions rounded by a scanner do not matter; where frames
    name no source slice, they are placed by their positions. Kidney and kidney tumor segments are
    read (the table above); others (another tool's organs) are left out and named in
    :attr:`DicomSeg.ignored`. A fractional segment counts where it is 0.5 or more.

    Raises:
        InputError: not a SEG, or unreadable; no kidney or tumor segment; the series not found,
            another than the one the SEG references, or missing slices its frames lie on; frames
            not on the series' grid, or in another frame of reference.
    """
    path = Path(path)
    if not is_dicom_seg(path):
        raise InputError(f"{path}: is no DICOM SEG (a DICOM Segmentation, Modality SEG)")
    header, uids = _seg_header(path)
    segments = getattr(header, "SegmentSequence", [])
    classes, ignored = _kits_classes(segments)  # before any search for the series
    if not classes:
        raise InputError(f"{path}: holds no kidney or kidney tumor segment (it holds {name_a_few(ignored, 4)})")
    geometry = series_geometry(Path(series)) if series is not None else _referenced_series_geometry(path, list(near))
    if geometry.series_uid not in uids:
        raise InputError(f"{path}: segments the series {uids[0]}, not {geometry.path} (series {geometry.series_uid})")
    source_slices = _source_slices(header)
    _check_on_series(header, geometry, source_slices is not None, path)
    if ignored:
        log.warning("%s: segments %s are neither kidney nor kidney tumor; left out", path, name_a_few(ignored, 4))
    seg = _open_seg(path, geometry)
    numbers = sorted(classes)
    try:
        if source_slices is not None:
            pixels = _pixels_by_source_slice(seg, numbers, source_slices, geometry, path)
        else:
            pixels = _pixels_by_position(seg, numbers, geometry, path)
    except (InputError, MemoryError):
        raise
    except Exception as exc:  # highdicom and pydicom fail in several ways on a damaged or unusual file
        raise InputError(f"{path}: its frames cannot be read ({type(exc).__name__}: {exc})") from None
    labels = np.zeros(pixels.shape[:3], np.uint8)
    for value in (1, 2):  # kidney first, then tumor over it where they overlap
        for channel, number in enumerate(numbers):
            if classes[number] == value:
                labels[pixels[..., channel] >= 0.5] = value  # binary 1, or a fractional share of half or more
    array = np.ascontiguousarray(labels.transpose(2, 1, 0))  # (slice, row, column) -> (column, row, slice)
    return DicomSeg(Volume.from_source_array(array, geometry.affine, geometry.path), geometry,
                    _algorithm_type(segments, classes),
                    str(getattr(header, "Manufacturer", "")) == "napari-kits", tuple(ignored))


def _open_seg(path: Path, geometry: SeriesGeometry):
    hd = _highdicom()
    try:
        # Frames read as needed (a SEG of 100 organs holds few of kidney); not where a binary frame
        # is no whole number of bytes (its bits run on into the next), which highdicom reads wrongly lazily.
        return hd.seg.segread(path, lazy_frame_retrieval=geometry.rows * geometry.columns % 8 == 0)
    except Exception as exc:  # highdicom refuses a malformed SEG in several ways
        raise InputError(f"{path}: cannot be read as a DICOM SEG ({exc})") from None


def _pixels_by_source_slice(seg, numbers: list[int], source_slices: list[set[str]], geometry: SeriesGeometry,
                            path: Path) -> np.ndarray:
    """(slice, row, column, segment) on the series: each frame on the slice it names."""
    slice_uids = [item.sop_uid for item in geometry.slices]
    missing = set().union(*source_slices) - set(slice_uids)
    if missing:
        raise InputError(f"{path}: {len(missing)} of the slices its frames lie on are not in {geometry.path} (a "
                         "partial copy of the series?); its labels there would be lost")
    # Slices without frames are 0; whether frames lie on their slices was checked (_source_slices).
    return seg.get_pixels_by_source_instance(slice_uids, segment_numbers=numbers, combine_segments=False,
                                             assert_missing_frames_are_empty=True, ignore_spatial_locations=True)


def _pixels_by_position(seg, numbers: list[int], geometry: SeriesGeometry, path: Path) -> np.ndarray:
    """(slice, row, column, segment) on the series, from the frames' positions, within the
    tolerances the series itself is read with; refused where labels would be lost."""
    from .dicom import SLICE_POSITION_TOLERANCE

    hd = _highdicom()
    off_grid = f"{path}: its frames are not on the grid of {geometry.path}"
    lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ geometry.affine  # (column, row, slice) -> LPS
    try:
        target = hd.VolumeGeometry(lps[:, [2, 1, 0, 3]], (len(geometry.slices), geometry.rows, geometry.columns),
                                   "PATIENT")
        volume = seg.get_volume(segment_numbers=numbers, combine_segments=False, rtol=SLICE_POSITION_TOLERANCE)
    except (RuntimeError, ValueError) as exc:  # frames of several orientations, unevenly spaced
        raise InputError(f"{off_grid} ({exc}); a SEG is read on its series' own grid only") from None
    if volume.spatial_shape[0] == 1:  # one frame gives no step between slices: take the series' step
        affine = volume.affine.copy()
        affine[:3, 0] = target.affine[:3, 0] * (1.0 if affine[:3, 0] @ target.affine[:3, 0] >= 0 else -1.0)
        volume = hd.Volume(volume.array, affine, "PATIENT",
                           channels={d: volume.get_channel_values(d) for d in volume.channel_descriptors})
    if not np.allclose(np.sort(volume.spacing), np.sort(target.spacing), rtol=1e-3, atol=1e-3):
        raise InputError(f"{path}: its voxels ({', '.join(f'{s:g}' for s in volume.spacing)} mm) are not those of "
                         f"{geometry.path} ({', '.join(f'{s:g}' for s in target.spacing)} mm); a SEG is read on its "
                         "series' own grid only")
    alignment = np.abs(np.asarray(volume.unit_vectors()) @ np.asarray(target.unit_vectors()).T).max(axis=0)
    if alignment.min() < 1 - 1e-4:  # match_geometry's tolerance below is in voxels; directions need their own
        raise InputError(f"{off_grid} (its frames are turned against its slices); a SEG is read on its series' own "
                         "grid only")
    labelled = int(np.count_nonzero(volume.array))
    try:  # an offset of a few hundredths of a voxel is rounding, as the series' own grid allows
        volume = volume.match_geometry(target, tol=GRID_TOLERANCE_VOXELS)
    except (RuntimeError, ValueError) as exc:  # shifted by part of a voxel
        raise InputError(f"{off_grid} ({exc}); a SEG is read on its series' own grid only") from None
    if int(np.count_nonzero(volume.array)) != labelled:
        raise InputError(f"{path}: some of its frames lie beyond {geometry.path} (a partial copy of the series?); its "
                         "labels there would be lost")
    return volume.array.reshape(*volume.spatial_shape, len(numbers))
