"""Reading a CT series stored as DICOM files, one file per slice, as scanners and PACS export it.

A series becomes a :class:`~kitseg.geometry.Volume` whose source grid is the series' own (voxel
(i, j, k) = (column, row, slice in position order), affine in RAS mm), so results are written as
NIfTI on that grid and overlay the series in any viewer that reads both.

pydicom reads the files; compressed pixel data is decoded by its plugins (Pillow: baseline JPEG
and JPEG 2000; pyjpegls, which highdicom brings: JPEG-LS; the optional python-gdcm: JPEG
Lossless too). A series that one affine cannot describe (tilted gantry, uneven slice gaps,
slices of several series or orientations) is refused, naming the folder, with what to do.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .geometry import Volume
from .io import PLAUSIBLE_SPACING_MM, InputError, dicom_files, dicom_series_folders, layout_hint, name_a_few

log = logging.getLogger(__name__)

#: A slice's position may lie this far (mm) from the evenly spaced grid fitted to the series, or
#: this share of a step if more: some scanners write positions with one decimal (0.05 mm off); a
#: missing slice, or steps that change along the series, put slices half a step or more off.
SLICE_POSITION_TOLERANCE_MM = 0.11
SLICE_POSITION_TOLERANCE = 0.02
#: Largest distance (mm) of a slice's position from the line along the slices' normal through
#: their mean position: beyond it the series is sheared (a gantry tilt), which one affine without
#: shear cannot hold. Rounded positions stay well within it; a 1 degree tilt over 100 mm is 1.7 mm.
TILT_TOLERANCE_MM = 0.2
_CONVERT = "convert it with dcm2niix (-z y -o OUT_FOLDER DICOM_FOLDER), which corrects what it can, and give the .nii.gz"


class NoImageSlices(InputError):
    """DICOM files that hold no slice of an image volume: a scout, a dose report, a DICOMDIR."""


def _pydicom():
    try:
        import pydicom
    except ImportError:
        raise InputError("reading DICOM needs pydicom: pip install pydicom pillow (or " + _CONVERT + ")") from None
    return pydicom


@dataclass(frozen=True)
class _Slice:
    path: Path
    position: np.ndarray  # ImagePositionPatient, LPS mm: the centre of the first pixel
    along: float  # position along the slices' normal
    sop_uid: str  # SOPInstanceUID (blanked by some anonymisers: the file meta's); a SEG's frames name it


@dataclass(frozen=True)
class SeriesGeometry:
    """The grid of a series: its slices in order along their normal, and the NIfTI affine (RAS)."""

    folder: Path
    slices: tuple[_Slice, ...]
    rows: int
    columns: int
    affine: np.ndarray
    #: What names this series alone: its folder, or where the folder holds others too, the file given.
    path: Path
    series_uid: str
    frame_of_reference: str  # FrameOfReferenceUID ("" where an anonymiser removed it)


def _numbers(ds, keyword: str, path: Path, count: int) -> np.ndarray:
    """``count`` numbers of a multi-valued header field (ImagePositionPatient...), checked."""
    value = getattr(ds, keyword, None)
    try:
        numbers = np.array([float(v) for v in value], dtype=float)
    except (TypeError, ValueError):
        raise InputError(f"{path}: its {keyword} ({value}) is not {count} numbers") from None
    if numbers.shape != (count,) or not np.all(np.isfinite(numbers)):
        raise InputError(f"{path}: its {keyword} ({value}) is not {count} numbers")
    return numbers


def _is_image_slice(ds) -> bool:
    """A slice of an image volume: placed in space, with pixels, and not the scout view that many
    scanners store beside the axial slices."""
    if "ImagePositionPatient" not in ds or "Rows" not in ds:
        return False  # a DICOMDIR, a structured (dose) report, a presentation state, a SEG
    return "LOCALIZER" not in [str(v).upper() for v in getattr(ds, "ImageType", [])]


def _series_key(ds) -> str:
    return str(getattr(ds, "SeriesInstanceUID", ""))


def _series_of(ds) -> tuple[str, str]:
    """What tells a slice's series: its UID, and its number (anonymisers may blank the UIDs)."""
    return _series_key(ds), str(getattr(ds, "SeriesNumber", "") or "").strip()


def _describe(members: list) -> str:
    ds = members[0][1]
    named = " ".join(str(getattr(ds, k, "")) for k in ("SeriesNumber", "SeriesDescription")).strip()
    uid = _series_key(ds)
    return f"{len(members)} slices ({', '.join(filter(None, [named, f'UID ...{uid[-8:]}' if uid else '']))})"


def _image_headers(source: Path) -> tuple[Path, list, bool]:
    """The folder, the (path, header) of each image slice of ``source``'s series (all of a
    folder's, or one chosen file's series), and whether the folder holds other series' slices too."""
    pydicom = _pydicom()
    folder = source if source.is_dir() else source.parent
    files = dicom_files(folder)
    if not source.is_dir() and source not in files:  # a DICOMDIR, a hidden file: no slice of a series
        raise NoImageSlices(f"{source}: is no image slice of a series (a DICOMDIR indexes a disc's files): give "
                            "the folder of one series")
    if not files:
        series = [sub.name for sub in dicom_series_folders(folder)]
        if series:
            raise InputError(f"{folder}: holds series folders ({name_a_few(series)}), not a series: give one of them")
        raise InputError(f"{folder}: no DICOM files{layout_hint(folder)}")
    headers = []
    for path in files:
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True, force=True)  # force: files without a preamble
        except Exception as exc:  # pydicom raises several kinds for a damaged file
            raise InputError(f"{path}: cannot be read as DICOM ({exc})") from None
        frames = int(getattr(ds, "NumberOfFrames", 1) or 1)
        # Enhanced CT keeps each frame's position in functional groups, not read here; a SEG (as
        # napari-kits writes beside a series) is many frames too, and no slice of the CT.
        if frames > 1 and str(getattr(ds, "Modality", "")).upper() != "SEG":
            raise InputError(f"{path}: an enhanced (multi-frame) DICOM of {frames} frames is not read here; "
                             + _CONVERT)
        if _is_image_slice(ds):
            headers.append((path, ds))
        elif path == source:
            raise NoImageSlices(f"{path}: is no image slice of a series (a scout view, a report, a SEG?)")
    if not headers:
        raise NoImageSlices(f"{folder}: its DICOM files hold no image slices (scout views or reports only?)")
    all_of_folder = len(headers)
    if not source.is_dir():  # one file chosen: its series
        chosen = next(_series_of(ds) for p, ds in headers if p == source)
        headers = [(p, ds) for p, ds in headers if _series_of(ds) == chosen]
    return folder, headers, len(headers) < all_of_folder


def _one_series(folder: Path, headers: list) -> tuple[list, np.ndarray]:
    """The headers, checked to be one series in one orientation, and that orientation."""
    series: dict[tuple, list] = {}
    for path, ds in headers:
        orientation = _numbers(ds, "ImageOrientationPatient", path, 6)
        series.setdefault((*_series_of(ds), tuple(np.round(orientation, 4))), []).append((path, ds))
    if len(series) > 1:
        described = [_describe(members) for _, members in sorted(series.items())]
        raise InputError(f"{folder}: holds {len(series)} series or orientations ({'; '.join(described)}); put "
                         "each series in a folder of its own, or give one file of the series to read")
    modality = str(getattr(headers[0][1], "Modality", "")).upper()
    if modality and modality != "CT":
        raise InputError(f"{folder}: is a {modality} series, not CT: the models read CT in HU")
    return headers, _numbers(headers[0][1], "ImageOrientationPatient", headers[0][0], 6)


def _stacked_slices(folder: Path, headers: list, normal: np.ndarray) -> tuple[list[_Slice], float, float]:
    """The slices in order along ``normal``, their step (mm) and the first slice's place along
    ``normal`` on the grid fitted to them, checked to be evenly spaced, each position once, and
    stacked straight along the normal (no gantry tilt)."""
    slices = []
    for path, ds in headers:
        position = _numbers(ds, "ImagePositionPatient", path, 3)
        sop_uid = str(getattr(ds, "SOPInstanceUID", "") or "").strip() or str(
            getattr(getattr(ds, "file_meta", None), "MediaStorageSOPInstanceUID", "") or "")
        slices.append(_Slice(path, position, float(np.dot(normal, position)), sop_uid))
    slices.sort(key=lambda s: s.along)
    if len(slices) < 2:
        raise InputError(f"{folder}: holds one slice of a series, not a volume to segment")
    along = np.array([s.along for s in slices])
    steps = np.diff(along)
    repeated = [(a.path.name, b.path.name) for a, b, step in zip(slices, slices[1:], steps) if step < 1e-3]
    if repeated:
        raise InputError(f"{folder}: {len(repeated)} slice position(s) held twice ({repeated[0][0]} and "
                         f"{repeated[0][1]}): two acquisitions in one folder? Put each in a folder of its own")
    # The evenly spaced grid closest to the positions (rounded in the headers, they even out).
    step, start = np.polyfit(np.arange(len(slices)), along, 1)
    off_grid = np.abs(along - (start + step * np.arange(len(slices))))
    if off_grid.max() > max(SLICE_POSITION_TOLERANCE_MM, SLICE_POSITION_TOLERANCE * step):
        typical = float(np.median(steps))
        k = int(np.argmax(np.abs(steps - typical)))
        raise InputError(f"{folder}: its slices are not evenly spaced ({steps[k]:.2f} mm between "
                         f"{slices[k].path.name} and {slices[k + 1].path.name}, {typical:.2f} mm elsewhere; a slice "
                         f"{off_grid.max():.2f} mm off an even grid: a slice missing?); one grid cannot hold it: "
                         f"{_CONVERT}")
    positions = np.array([s.position for s in slices])
    across = positions - np.outer(positions @ normal, normal)  # each position less its part along the normal
    shear = float(np.max(np.linalg.norm(across - across.mean(axis=0), axis=1)))
    if shear > TILT_TOLERANCE_MM:
        raise InputError(f"{folder}: its slices are not stacked along their normal (a gantry tilt, {shear:.1f} mm "
                         f"of shear); {_CONVERT}")
    return slices, float(step), float(start)


def series_geometry(source: Path) -> SeriesGeometry:
    """Read the headers of a series (a folder of DICOM files, or one file of it: its series) and
    check that one affine describes it. Pixel data is not read."""
    source = Path(source)
    folder, headers, others_beside = _image_headers(source)
    headers, orientation = _one_series(folder, headers)
    sizes = {(int(ds.Rows), int(ds.Columns)) for _, ds in headers}
    spacings = {tuple(np.round(_numbers(ds, "PixelSpacing", p, 2), 5)) for p, ds in headers}  # rounded to compare
    if len(sizes) > 1 or len(spacings) > 1:
        raise InputError(f"{folder}: its slices differ in size or pixel spacing ({sorted(sizes)}, {sorted(spacings)})")
    (rows, columns), = sizes
    # PixelSpacing: between rows, then between columns; as written (other tools compare grids to 1e-6).
    row_mm, column_mm = _numbers(headers[0][1], "PixelSpacing", headers[0][0], 2)
    # Unit vectors: the header's decimal strings round them.
    along_row, down_column = (v / np.linalg.norm(v) for v in (orientation[:3], orientation[3:]))
    normal = np.cross(along_row, down_column)
    normal /= np.linalg.norm(normal)
    slices, step, start = _stacked_slices(folder, headers, normal)
    low, high = PLAUSIBLE_SPACING_MM
    if not all(low <= size <= high for size in (row_mm, column_mm, step)):
        raise InputError(f"{folder}: voxel size ({step:g}, {row_mm:g}, {column_mm:g}) mm from its headers is no CT's "
                         f"(outside {low:g}-{high:g} mm)")
    lps = np.eye(4)
    lps[:3, 0] = along_row * column_mm  # i: along a row, the column index
    lps[:3, 1] = down_column * row_mm  # j: down a column, the row index
    lps[:3, 2] = normal * step  # k: the slices, in position order
    lps[:3, 3] = slices[0].position + (start - slices[0].along) * normal  # on the fitted grid
    ras = np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps  # DICOM's patient axes are LPS, NIfTI's RAS
    return SeriesGeometry(folder, tuple(slices), rows, columns, ras, source if others_beside else folder,
                          _series_key(headers[0][1]), str(getattr(headers[0][1], "FrameOfReferenceUID", "") or ""))


def series_of_file(path: Path) -> tuple[str, str] | None:
    """What tells a DICOM file's series (its UID and number; :func:`_series_of`), its other fields
    not parsed; None for a SEG (as napari-kits writes beside a series), which is no slice of one."""
    pydicom = _pydicom()
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True, force=True,
                             specific_tags=["SeriesInstanceUID", "SeriesNumber", "Modality"])
    except Exception as exc:  # pydicom raises several kinds for a damaged file
        raise InputError(f"{path}: cannot be read as DICOM ({exc})") from None
    return None if str(getattr(ds, "Modality", "")).upper() == "SEG" else _series_of(ds)


def series_name(source: Path) -> str:
    """A case name for a series: its folder's, and where the folder holds several series (one file
    of it was given), the series number or UID too, so that each gets results of its own."""
    source = Path(source)
    folder = (source if source.is_dir() else source.parent).resolve()
    if source.is_dir():
        return folder.name
    chosen = series_of_file(source)
    if chosen is None:
        raise NoImageSlices(f"{source}: is a DICOM SEG, no image slice of a series; give the series it segments")
    if all(series_of_file(p) in (chosen, None) for p in dicom_files(folder)):
        return folder.name
    uid, number = chosen
    return f"{folder.name}_series{number}" if number else f"{folder.name}_{uid[-8:]}"


def read_dicom_series(source: Path, geometry: SeriesGeometry | None = None) -> Volume:
    """A CT series in HU as an internal-orientation :class:`Volume` on the series' NIfTI grid.
    ``source``: the series' folder, or one of its files (its series is read); ``geometry``: its
    :func:`series_geometry`, where read already (its headers are not read again)."""
    pydicom = _pydicom()
    geometry = geometry or series_geometry(source)
    array = np.empty((geometry.columns, geometry.rows, len(geometry.slices)), np.float32)
    integral = True
    for k, item in enumerate(geometry.slices):
        ds = None
        try:
            ds = pydicom.dcmread(item.path, force=True)
            if "TransferSyntaxUID" not in getattr(ds, "file_meta", {}):  # no file meta: the old implicit encoding
                ds.file_meta = pydicom.dataset.FileMetaDataset()
                ds.file_meta.TransferSyntaxUID = pydicom.uid.ImplicitVRLittleEndian
            pixels = ds.pixel_array
        except Exception as exc:  # no decoder for its compression, truncated pixel data
            syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
            fix = ("pip install python-gdcm (JPEG Lossless) or pylibjpeg pylibjpeg-openjpeg adds "
                   "decoders, or " if syntax is not None and syntax.is_compressed else "is the file whole? Or ")
            raise InputError(f"{item.path}: its pixels cannot be decoded{f' ({syntax.name})' if syntax else ''}: "
                             f"{exc}; {fix}{_CONVERT}") from None
        if pixels.shape != (geometry.rows, geometry.columns):
            raise InputError(f"{item.path}: pixels of shape {pixels.shape}, not the ({geometry.rows}, "
                             f"{geometry.columns}) of its header: not one grey-level slice")
        # Each slice's own rescale: some scanners vary it along a series.
        slope = float(getattr(ds, "RescaleSlope", 1) or 1)
        intercept = float(getattr(ds, "RescaleIntercept", 0) or 0)
        integral &= slope.is_integer() and intercept.is_integer()
        array[:, :, k] = (pixels.astype(np.float32) * slope + intercept).T  # (row, column) -> (i, j)
    if integral and array.min() >= -32768 and array.max() <= 32767:
        array = array.astype(np.int16)  # HU are whole numbers here: as a NIfTI CT stores them
    log.info("%s: DICOM series of %d slices, %d x %d pixels", geometry.folder, len(geometry.slices),
             geometry.rows, geometry.columns)
    try:
        return Volume.from_source_array(array, geometry.affine, geometry.path)
    except ValueError as exc:
        raise InputError(f"{geometry.folder}: {exc}") from None
