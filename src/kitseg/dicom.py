"""Reading a CT series stored as DICOM files, one file per slice, as scanners and PACS export it.

A series becomes a :class:`~kitseg.geometry.Volume` whose source grid is the series' own (voxel
(i, j, k) = (column, row, slice in position order), affine in RAS mm), so results are written as
NIfTI on that grid and overlay the series in any viewer that reads both.

pydicom reads the files; compressed pixel data is decoded by its plugins (Pillow for JPEG and
JPEG 2000). A series that one affine cannot describe (tilted gantry, uneven slice gaps,
slices of several series or orientations) is refused, naming the folder, with what to do.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .geometry import Volume
from .io import PLAUSIBLE_SPACING_MM, InputError, dicom_files

log = logging.getLogger(__name__)

#: Slice positions may differ from an even step by this share of it (scanners round positions).
SLICE_STEP_TOLERANCE = 0.02
#: Largest offset (mm) of a slice from the line through the first slice along the slices' normal:
#: beyond it the series is tilted (a gantry tilt), which one affine without shear cannot hold.
TILT_TOLERANCE_MM = 0.05
_CONVERT = "convert it with dcm2niix (-z y -o OUT_FOLDER DICOM_FOLDER), which corrects what it can, and give the .nii.gz"


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
    instance: int | None


@dataclass(frozen=True)
class SeriesGeometry:
    """The grid of a series: its slices in order along their normal, and the NIfTI affine (RAS)."""

    folder: Path
    slices: tuple[_Slice, ...]
    rows: int
    columns: int
    affine: np.ndarray

    @property
    def files(self) -> list[Path]:
        return [s.path for s in self.slices]


def _number(ds, keyword: str, path: Path, count: int | None = None):
    value = getattr(ds, keyword, None)
    if value is None or value == "":
        raise InputError(f"{path}: has no {keyword}, which places the slice in space: not an image slice "
                         f"of a CT series ({_CONVERT})")
    try:
        return [float(v) for v in value] if count else float(value)
    except (TypeError, ValueError):
        raise InputError(f"{path}: its {keyword} ({value}) is not a number") from None


def series_geometry(source: Path) -> SeriesGeometry:
    """Read the headers of a series (a folder of DICOM files, or one file of it: its series) and
    check that one affine describes it. Pixel data is not read."""
    pydicom = _pydicom()
    source = Path(source)
    folder = source if source.is_dir() else source.parent
    files = dicom_files(folder)
    if not files:
        raise InputError(f"{folder}: no DICOM files")
    headers = []
    for path in files:
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
        except Exception as exc:  # pydicom raises several kinds for a damaged file
            raise InputError(f"{path}: cannot be read as DICOM ({exc})") from None
        if "ImagePositionPatient" not in ds or "Rows" not in ds:
            continue  # no image slice: a DICOMDIR, a structured report, a presentation state
        if "LOCALIZER" in [str(v).upper() for v in getattr(ds, "ImageType", [])]:
            continue  # the scout view, stored beside the axial slices by many scanners
        headers.append((path, ds))
    if not headers:
        raise InputError(f"{folder}: its DICOM files hold no image slices")
    if not source.is_dir():  # one file chosen: its series
        uid = str(getattr(next(ds for p, ds in headers if p == source), "SeriesInstanceUID", ""))
        headers = [(p, ds) for p, ds in headers if str(getattr(ds, "SeriesInstanceUID", "")) == uid]
    series = {}
    for path, ds in headers:
        key = (str(getattr(ds, "SeriesInstanceUID", "")),
               tuple(np.round(_number(ds, "ImageOrientationPatient", path, 6), 4)))
        series.setdefault(key, []).append((path, ds))
    if len(series) > 1:
        described = [f"{len(members)} slices{_describe(members[0][1])}" for members in series.values()]
        raise InputError(f"{folder}: holds {len(series)} series or orientations ({'; '.join(described)}); put "
                         "each series in a folder of its own, or give one file of the series to read")
    headers = next(iter(series.values()))
    orientation = np.asarray(_number(headers[0][1], "ImageOrientationPatient", headers[0][0], 6))
    modality = str(getattr(headers[0][1], "Modality", "")).upper()
    if modality and modality != "CT":
        raise InputError(f"{folder}: is a {modality} series, not CT: the models read CT in HU")
    frames = int(getattr(headers[0][1], "NumberOfFrames", 1) or 1)
    if frames > 1:
        raise InputError(f"{headers[0][0]}: an enhanced (multi-frame) DICOM of {frames} frames is not read here; "
                         + _CONVERT)
    sizes = {(int(ds.Rows), int(ds.Columns)) for _, ds in headers}
    spacings = {tuple(np.round(_number(ds, "PixelSpacing", p, 2), 5)) for p, ds in headers}
    if len(sizes) > 1 or len(spacings) > 1:
        raise InputError(f"{folder}: its slices differ in size or pixel spacing ({sorted(sizes)}, {sorted(spacings)})")
    (rows, columns), = sizes
    (row_mm, column_mm), = spacings

    # Unit vectors: the header's decimal strings round them (and the grouping above, to 4 places).
    along_row, along_column = (v / np.linalg.norm(v) for v in (orientation[:3], orientation[3:]))
    normal = np.cross(along_row, along_column)
    normal /= np.linalg.norm(normal)
    slices = sorted((_Slice(p, np.asarray(_number(ds, "ImagePositionPatient", p, 3)),
                            float(np.dot(normal, _number(ds, "ImagePositionPatient", p, 3))),
                            int(ds.InstanceNumber) if getattr(ds, "InstanceNumber", None) not in (None, "") else None)
                     for p, ds in headers), key=lambda s: s.along)
    steps = np.diff([s.along for s in slices])
    if len(slices) > 1:
        repeated = [(a.path.name, b.path.name) for a, b, step in zip(slices, slices[1:], steps) if step < 1e-3]
        if repeated:
            raise InputError(f"{folder}: {len(repeated)} slice position(s) held twice ({repeated[0][0]} and "
                             f"{repeated[0][1]}): two acquisitions in one folder? Put each in a folder of its own")
        step = float(np.median(steps))
        uneven = np.flatnonzero(np.abs(steps - step) > SLICE_STEP_TOLERANCE * step)
        if uneven.size:
            k = int(uneven[0])
            raise InputError(f"{folder}: its slices are not evenly spaced ({steps[k]:.2f} mm between "
                             f"{slices[k].path.name} and {slices[k + 1].path.name}, {step:.2f} mm elsewhere: a "
                             f"slice missing?); one grid cannot hold it: {_CONVERT}")
        offsets = [np.linalg.norm((s.position - slices[0].position) - (s.along - slices[0].along) * normal)
                   for s in slices]
        if max(offsets) > TILT_TOLERANCE_MM:
            raise InputError(f"{folder}: its slices are not stacked along their normal (a gantry tilt, "
                             f"{max(offsets):.1f} mm of shear); {_CONVERT}")
    else:
        raise InputError(f"{folder}: holds one slice of a series, not a volume to segment")
    low, high = PLAUSIBLE_SPACING_MM
    if not all(low <= size <= high for size in (row_mm, column_mm, step)):
        raise InputError(f"{folder}: voxel size ({step:g}, {row_mm:g}, {column_mm:g}) mm from its headers is no CT's "
                         f"(outside {low:g}-{high:g} mm)")
    lps = np.eye(4)
    lps[:3, 0] = along_row * column_mm  # i: along a row, the column index
    lps[:3, 1] = along_column * row_mm  # j: down a column, the row index
    lps[:3, 2] = normal * step
    lps[:3, 3] = slices[0].position
    ras = np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps  # DICOM's patient axes are LPS, NIfTI's RAS
    return SeriesGeometry(folder, tuple(slices), rows, columns, ras)


def _describe(ds) -> str:
    text = " ".join(str(getattr(ds, k, "")) for k in ("SeriesNumber", "SeriesDescription")).strip()
    return f" ({text})" if text else ""


def read_dicom_series(source: Path) -> Volume:
    """A CT series in HU as an internal-orientation :class:`Volume` on the series' NIfTI grid.
    ``source``: the series' folder, or one of its files (its series is read)."""
    pydicom = _pydicom()
    geometry = series_geometry(source)
    array = np.empty((geometry.columns, geometry.rows, len(geometry.slices)), np.float32)
    integral = True
    for k, item in enumerate(geometry.slices):
        ds = None
        try:
            ds = pydicom.dcmread(item.path)
            pixels = ds.pixel_array
        except Exception as exc:  # no decoder for its compression, truncated pixel data
            syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
            fix = ("pip install pylibjpeg pylibjpeg-libjpeg pylibjpeg-openjpeg adds decoders, or "
                   if syntax is not None and syntax.is_compressed else "is the file whole? Or ")
            raise InputError(f"{item.path}: its pixels cannot be decoded{f' ({syntax.name})' if syntax else ''}: "
                             f"{exc}; {fix}{_CONVERT}") from None
        if pixels.shape != (geometry.rows, geometry.columns):
            raise InputError(f"{item.path}: pixels of shape {pixels.shape}, not the ({geometry.rows}, "
                             f"{geometry.columns}) of its header: not one grey-level slice")
        slope = float(getattr(ds, "RescaleSlope", 1) or 1)
        intercept = float(getattr(ds, "RescaleIntercept", 0) or 0)
        integral &= slope.is_integer() and intercept.is_integer()
        array[:, :, k] = (pixels.astype(np.float32) * slope + intercept).T  # (row, column) -> (i, j)
    if integral and array.min() >= -32768 and array.max() <= 32767:
        array = array.astype(np.int16)  # HU are whole numbers here: as a NIfTI CT stores them
    log.info("%s: DICOM series of %d slices, %d x %d pixels", geometry.folder, len(geometry.slices),
             geometry.rows, geometry.columns)
    try:
        return Volume.from_source_array(array, geometry.affine, geometry.folder)
    except ValueError as exc:
        raise InputError(f"{geometry.folder}: {exc}") from None
