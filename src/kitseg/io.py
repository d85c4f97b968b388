"""Reading CTs and writing results with their geometry; all nibabel handling lives here.

Inputs are NIfTI files (``.nii``/``.nii.gz``) or KiTS case folders (``imaging.nii.gz`` and,
where present, ``segmentation.nii.gz``, or KiTS21's ``aggregated_MAJ_seg.nii.gz``). Arrays come back in the internal orientation
(see :mod:`kitseg.geometry`); writers take internal arrays and put them back on the source
file's exact grid (same shape, same affine), atomically, never over the input.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np

from .atomic import atomic_path
from .geometry import SourceGrid, Volume, strip_nifti_suffix, voxel_spacing

log = logging.getLogger(__name__)

KITS_IMAGE = "imaging.nii.gz"
#: How messages name a case's CT: some users keep the data unpacked (:func:`case_image_file`).
_KITS_IMAGE_NAMES = f"{KITS_IMAGE} or {KITS_IMAGE.removesuffix('.gz')}"
KITS_LABELS = "segmentation.nii.gz"
#: KiTS21's reference in a case folder without ``segmentation.nii.gz``: its annotators' majority vote.
KITS21_LABELS = "aggregated_MAJ_seg.nii.gz"
_CASE_RE = re.compile(r"^case_(\d+)$")
_CHANNEL_RE = re.compile(r"^(.+)_(\d{4})$")  # nnU-Net's image names: NAME_0000 is NAME's first channel
#: The maps ``kits-seg predict --save-intermediates`` writes beside the labels (``CaseInput.intermediate_name``).
INTERMEDIATES = ("y1", "mask", "probs")


class InputError(ValueError):
    """An input file or folder cannot be used; the message names it and says why."""


def name_a_few(names: list, limit: int = 5) -> str:
    """The first ``limit`` of ``names`` (or label values) for a message, "..." after them if there are more."""
    return ", ".join(map(str, names[:limit])) + (" ..." if len(names) > limit else "")


@dataclass
class CaseInput:
    """One thing to segment: a CT and, if known, its ground truth."""

    name: str
    image_path: Path
    labels_path: Path | None = None
    case_id: str | None = None  # "00042" for a KiTS19 folder "case_00042"

    @property
    def output_name(self) -> str:
        """KiTS19 submission name for case folders, ``NAME_labels`` for plain files."""
        return f"prediction_{self.case_id}" if self.case_id is not None else f"{self.name}_labels"

    @property
    def is_dicom_series(self) -> bool:
        """Read from a DICOM series (its folder or one of its files), which a DICOM SEG can reference."""
        return not is_nifti(self.image_path)

    def intermediate_name(self, what: str) -> str:
        stem = f"prediction_{self.case_id}" if self.case_id is not None else self.name
        return f"{stem}_{what}"


def is_nifti(path: Path) -> bool:
    return path.name.lower().endswith((".nii", ".nii.gz"))  # SCAN.NII.GZ too, as some exporters name them


def _case_file(folder: Path, name: str) -> Path | None:
    """``folder/name`` (``x.nii.gz``), or as some users keep the data unpacked, ``x.nii``."""
    return next((folder / n for n in (name, name.removesuffix(".gz")) if (folder / n).is_file()), None)


def nifti_named(folder: Path, name: str) -> Path | None:
    """``folder/NAME.nii.gz``, or ``NAME.nii`` (unpacked), or either in capitals as some exporters
    write them; None if there is none."""
    return next((folder / f"{name}{suffix}" for suffix in (".nii.gz", ".nii", ".NII.GZ", ".NII")
                 if (folder / f"{name}{suffix}").is_file()), None)


def case_image_file(folder: Path) -> Path | None:
    """A case folder's CT: ``imaging.nii.gz`` (or unpacked, ``imaging.nii``); None if it has none."""
    return _case_file(folder, KITS_IMAGE)


def is_case_image(path: Path) -> bool:
    """``path`` is named as a case folder's CT is."""
    return path.name in (KITS_IMAGE, KITS_IMAGE.removesuffix(".gz"))


def case_labels_file(folder: Path) -> Path | None:
    """A case folder's ground truth: ``segmentation.nii.gz`` (KiTS19, KiTS23), else KiTS21's
    ``aggregated_MAJ_seg.nii.gz`` (either unpacked too, ``.nii``); None if it has neither."""
    return _case_file(folder, KITS_LABELS) or _case_file(folder, KITS21_LABELS)


def case_from_folder(folder: Path) -> CaseInput:
    image = case_image_file(folder)
    if image is None:
        raise InputError(f"{folder}: not a KiTS19 case folder (no {_KITS_IMAGE_NAMES} inside)")
    match = _CASE_RE.match(folder.name)
    return CaseInput(
        name=folder.name,
        image_path=image,
        labels_path=case_labels_file(folder),
        case_id=match.group(1) if match else None,
    )


def discover_inputs(path: str | os.PathLike) -> list[CaseInput]:
    """Expand a CLI input into cases: a NIfTI file, a case folder, a DICOM series (its folder, or a
    file of it), or a folder of these."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: no such file or folder")
    if path.is_file():
        if path.name.upper() == "DICOMDIR":
            raise InputError(f"{path}: a DICOMDIR indexes the files of a disc or export, no image; give the folder "
                             f"of one series, or the folder that holds series folders{layout_hint(path.parent)}")
        if is_dicom_file(path):  # one file of a series: the series, named after its folder
            from .dicom import series_name

            return [CaseInput(name=series_name(path), image_path=path)]
        if not is_nifti(path):
            raise InputError(f"{path}: not a NIfTI file (expected .nii or .nii.gz) nor a DICOM file")
        return [CaseInput(name=strip_nifti_suffix(path.name), image_path=path)]
    if case_image_file(path) is not None:
        return [case_from_folder(path)]
    # Hidden entries are no one's CT (a temporary file a killed writer left, a ._ file of macOS).
    entries = [p for p in sorted(path.iterdir()) if not p.name.startswith(".")]
    cases = [case_from_folder(p) for p in entries if p.is_dir() and case_image_file(p) is not None]
    # DICOM series: each subfolder's (a PACS export: a folder per series), and this folder's own
    # files where it holds no NIfTI (a stray DICOM file beside NIfTI CTs is not a series to segment).
    series = [p for p in entries if p.is_dir() and is_dicom_series(p)]
    if is_dicom_series(path) and not any(p.is_file() and is_nifti(p) for p in entries):
        series.insert(0, path)
    cases += [CaseInput(name=folder.resolve().name, image_path=folder) for folder in series]
    without_ct = [p.name for p in entries if p.is_dir() and case_image_file(p) is None and case_labels_file(p)]
    if without_ct:
        log.warning("%s: %d case folder(s) without %s skipped: %s", path, len(without_ct), _KITS_IMAGE_NAMES,
                    name_a_few(without_ct))
    # Only one level is read: CTs deeper in other folders are not segmented; say so.
    unsearched = [p.name for p in entries if p.is_dir() and case_image_file(p) is None
                  and not case_labels_file(p) and p.name not in ("labelsTr", "labelsTs") and _holds_ct_files(p)]
    if unsearched:
        log.warning("%s: %d subfolder(s) holding NIfTI files but no %s are not searched: %s (give them as inputs "
                    "of their own)", path, len(unsearched), _KITS_IMAGE_NAMES, name_a_few(unsearched))
    # A KiTS19 mask is no CT: segmented, it would "succeed" with nothing found.
    masks = [p for p in entries if p.is_file() and p.name.lower().removesuffix(".gz") in
             (KITS_LABELS.removesuffix(".gz"), KITS21_LABELS.lower().removesuffix(".gz"))]
    cases += [CaseInput(name=strip_nifti_suffix(p.name), image_path=p) for p in entries
              if p.is_file() and is_nifti(p) and p not in masks]
    cases = _without_outputs(cases, path)
    if not cases and masks:
        raise InputError(f"{path}: a KiTS19 case folder without its CT ({_KITS_IMAGE_NAMES}); {masks[0].name} is its mask")
    if not cases:
        nnunet = [p.name for p in entries if p.is_dir() and p.name in ("imagesTr", "imagesTs")]
        raise InputError(f"{path}: no CT found (expected .nii/.nii.gz files, DICOM series or case folders with "
                         f"{_KITS_IMAGE_NAMES})"
                         + (f"; a data set in nnU-Net's layout: give its {' or '.join(nnunet)} folder" if nnunet
                            else layout_hint(path)))
    for mask in masks:
        log.warning("%s: %s is a KiTS19 mask, not a CT: skipped", path, mask.name)
    return cases


def nnunet_training_cases(folder: Path) -> list[CaseInput] | None:
    """The cases of a data set in nnU-Net's raw layout (``imagesTr/NAME_0000.nii.gz`` with
    ``labelsTr/NAME.nii.gz``), as many keep KiTS and their own data; None where ``folder`` is not
    laid out so. A case without its label file comes back without labels, as a case folder would."""
    images, labels = folder / "imagesTr", folder / "labelsTr"
    if not images.is_dir():
        return None
    if not labels.is_dir():
        raise InputError(f"{folder}: a data set in nnU-Net's layout without labelsTr: its images have no labels "
                         "to train on")
    cases, other_channels, misnamed = [], [], []
    for path in sorted(images.iterdir()):
        if path.name.startswith(".") or not path.is_file() or not is_nifti(path):
            continue
        match = _CHANNEL_RE.match(strip_nifti_suffix(path.name))
        if match is None:
            misnamed.append(path.name)
        elif match.group(2) != "0000":
            other_channels.append(path.name)
        else:
            name = match.group(1)
            cases.append(CaseInput(name=name, image_path=path, labels_path=nifti_named(labels, name)))
    if other_channels:  # a CT is one channel; a second one (another phase, an MR sequence) this model cannot take
        raise InputError(f"{images}: holds more than one channel per case ({name_a_few(other_channels, 3)}); "
                         "a CT is one image, NAME_0000.nii.gz (nnU-Net's names end in the channel, _0000: are "
                         "these cases named without it?)")
    if misnamed:
        log.warning("%s: %d file(s) not named as nnU-Net's images (NAME_0000.nii.gz) skipped: %s", images,
                    len(misnamed), name_a_few(misnamed, 3))
    named = {c.name for c in cases}
    without_image = [f.name for f in sorted(labels.iterdir())
                     if is_nifti(f) and not f.name.startswith(".") and strip_nifti_suffix(f.name) not in named]
    if without_image:
        log.warning("%s: %d label file(s) without their image (imagesTr/NAME_0000.nii.gz) are not trained on: %s",
                    labels, len(without_image), name_a_few(without_image, 3))
    return cases


def layout_hint(path: Path) -> str:
    """Where the cases are, for a message about a folder that holds none at its own level: one
    level down (``kits21/`` holds ``data/case_XXXXX``), or up (one case's folder); else ""."""
    path = Path(path)
    if not path.is_dir():
        return ""
    if case_image_file(path) is not None or case_labels_file(path):
        return f"; {path.name} is one case's folder: give the folder that holds the case folders"

    def holds_cases(folder: Path) -> bool:
        try:
            return any(c.is_dir() and (case_image_file(c) is not None or case_labels_file(c)) for c in folder.iterdir())
        except OSError:
            return False

    subfolders = _subfolders(path)
    for sub in subfolders:
        if (sub / "imagesTr").is_dir():
            return f"; {sub.name} is a data set in nnU-Net's layout: give {sub}"
        if holds_cases(sub):
            return f"; its subfolder {sub.name} holds case folders: give {sub}"
    # A PACS or CD export: PATIENT/STUDY/SERIES, given above the study.
    level = subfolders
    for _ in range(3):
        for folder in level:
            if dicom_series_folders(folder):
                return f"; DICOM series lie deeper: give {folder}, which holds series folders"
        level = [sub for folder in level for sub in _subfolders(folder)][:200]
    return ""


def _subfolders(folder: Path) -> list[Path]:
    try:
        return [p for p in sorted(folder.iterdir()) if p.is_dir() and not p.name.startswith(".")]
    except OSError:
        return []


def dicom_series_folders(folder: Path) -> list[Path]:
    """The subfolders of ``folder`` that hold a DICOM series (``folder`` a study, a PACS export)."""
    return [sub for sub in _subfolders(folder) if is_dicom_series(sub)]


def is_dicom_file(path: Path) -> bool:
    """A DICOM file (whatever its name; scanners often give none): "DICM" after its 128-byte
    preamble, or, as older systems write them without one, a data set that opens as DICOM's do."""
    try:
        with open(path, "rb") as handle:
            head = handle.read(132)
    except OSError:
        return False
    return head[128:] == b"DICM" or _opens_as_bare_dicom(head)


def _opens_as_bare_dicom(head: bytes) -> bool:
    """A preamble-less DICOM data set, little endian, by its first elements: the file meta group's
    length ((0002,0000), explicit VR "UL"), or two elements of group 0008 in a row, implicit VR
    (a length then the next tag) or explicit (a VR of two capitals). A NIfTI begins with its
    header size, a .gz with 1f 8b; a raw array rarely passes both tests."""
    if len(head) < 16:
        return False
    if head[:4] == b"\x02\x00\x00\x00" and head[4:6] == b"UL":
        return True
    if head[:2] != b"\x08\x00":
        return False
    if head[4:6].isalpha() and head[4:6].isupper():  # explicit VR: a short length follows
        length = int.from_bytes(head[6:8], "little")
    else:
        length = int.from_bytes(head[4:8], "little")
    following = 8 + length
    if length % 2 or following + 4 > len(head):
        return False
    # The next element is of the same group, with a higher number: DICOM keeps its elements sorted.
    return (head[following:following + 2] == b"\x08\x00"
            and int.from_bytes(head[following + 2:following + 4], "little") > int.from_bytes(head[2:4], "little"))


def _may_be_slice(path: Path) -> bool:
    # A DICOMDIR indexes a media's files and holds no image (hidden files are no one's).
    return not path.name.startswith(".") and path.name.upper() != "DICOMDIR" and path.is_file()


def dicom_files(folder: Path) -> list[Path]:
    """The DICOM files directly in ``folder`` that may hold a slice, sorted by name."""
    try:
        entries = sorted(folder.iterdir())
    except OSError:
        return []
    return [p for p in entries if _may_be_slice(p) and is_dicom_file(p)]


def is_dicom_series(path: Path) -> bool:
    """``path`` is a DICOM file or a folder holding DICOM files, read as a series (:mod:`kitseg.dicom`);
    a KiTS case folder is read as a case whatever else it holds (an exported file beside its CT)."""
    if not path.is_dir():
        return is_dicom_file(path)
    if case_image_file(path) is not None:
        return False
    try:
        return any(_may_be_slice(p) and is_dicom_file(p) and not is_dicom_seg(p) for p in path.iterdir())
    except OSError:
        return False


def is_dicom_seg(path: Path) -> bool:
    """A DICOM SEG file (a folder of results napari-kits wrote is no series to segment)."""
    from .dicom import series_of_file

    if not (Path(path).is_file() and is_dicom_file(Path(path))):
        return False
    try:
        return series_of_file(path) is None
    except InputError:  # damaged: taken for a slice, which its series' reading will name
        return False


def _holds_ct_files(folder: Path) -> bool:
    """``folder`` holds a NIfTI file that is neither hidden nor named as a result (an output folder is no
    folder of CTs); an unreadable folder holds none that could be read."""
    try:
        return any(is_nifti(f) and not f.name.startswith(".") and not is_result_name(f)
                   for f in folder.iterdir() if f.is_file())
    except OSError:
        return False


class _HeaderFixes(logging.Handler):
    """Collects what nibabel's header check repairs on load ("pixdim[1,2,3] should be non-zero...").

    nibabel logs these without the file's name and goes on with a repaired header; the reader
    decides which repairs change the geometry (an error) and names the file either way.
    """

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def _without_outputs(cases: list[CaseInput], folder: Path) -> list[CaseInput]:
    """Leave out the files this tool wrote for other cases of the folder (``-o`` was the input folder).

    ``scan_labels.nii.gz`` beside ``scan.nii.gz`` is scan's result, not a CT; a file is left out
    only when the case it belongs to is in the folder too.
    """
    written = {c.output_name for c in cases} | {c.intermediate_name(what) for c in cases for what in INTERMEDIATES}
    kept = [c for c in cases if c.case_id is not None or c.name not in written]
    if len(kept) < len(cases):
        log.info("%s: %d earlier result file(s) of this folder's cases left out", folder, len(cases) - len(kept))
    return kept


def _load_nifti(path: Path, channels_ok: bool = False, report: bool = True) -> nib.Nifti1Image:
    """Open a NIfTI header; 3D, or 4D with channels last when ``channels_ok``.

    ``report=False`` leaves nibabel's harmless header repairs unsaid (a later full read says them).
    """
    nibabel_log = logging.getLogger("nibabel.global")
    fixes = _HeaderFixes()
    # nibabel prints these through a handler of its own: hear them instead, and say them once, with the file.
    handlers, nibabel_log.handlers = nibabel_log.handlers, [fixes]
    propagate, nibabel_log.propagate = nibabel_log.propagate, False
    try:
        img = nib.load(str(path))
    except FileNotFoundError:
        raise InputError(f"{path}: no such file") from None
    except Exception as exc:  # nibabel raises many types for corrupt/unknown files
        raise InputError(f"{path}: cannot be read as NIfTI ({exc})") from None
    finally:
        nibabel_log.handlers = handlers
        nibabel_log.propagate = propagate
    sform_code = int(img.header["sform_code"]) if "sform_code" in img.header else 0
    for message in fixes.messages:
        if "pixdim" in message and "non-zero" in message and sform_code == 0:
            # Without an sform the voxel sizes are the geometry: a made-up 1 mm would resample wrongly.
            raise InputError(f"{path}: the header gives a voxel size of 0 (pixdim) and no sform to take it from")
        if report:
            log.warning("%s: nibabel repaired the header: %s", path, message)
    if len(img.shape) == 4 and img.shape[3] == 1:
        img = img.slicer[..., 0]
    if not (len(img.shape) == 3 or (channels_ok and len(img.shape) == 4)):
        wanted = "a 3D volume (or one with channels last)" if channels_ok else "a 3D volume"
        raise InputError(f"{path}: expected {wanted}, got shape {img.shape}")
    if min(img.shape) < 1:
        raise InputError(f"{path}: empty volume of shape {img.shape}")
    return img


def _read_array(img: nib.Nifti1Image, path: Path, integer_ok: bool) -> np.ndarray:
    """The voxel values, without nibabel's float64 promotion (a 1059x512x512 CT would take 2.2 GB).

    Integer data with an identity or integral scaling stays integer (int16 CT is the norm);
    anything else becomes float32.
    """
    try:
        raw = np.asanyarray(img.dataobj.get_unscaled()) if hasattr(img.dataobj, "get_unscaled") else np.asanyarray(img.dataobj)
    except Exception as exc:
        raise InputError(f"{path}: the voxel data cannot be read ({exc})") from None
    if raw.dtype.kind == "c":
        raise InputError(f"{path}: complex voxel data (dtype {raw.dtype}); a CT holds real numbers")
    if raw.dtype.names:  # RGB/RGBA voxels: a screenshot or a rendering, not a CT
        raise InputError(f"{path}: colour voxels ({', '.join(raw.dtype.names)}); a CT holds one number per voxel")
    slope = getattr(img.dataobj, "slope", 1.0)
    inter = getattr(img.dataobj, "inter", 0.0)
    slope = 1.0 if slope is None or not np.isfinite(slope) else float(slope)
    inter = 0.0 if inter is None or not np.isfinite(inter) else float(inter)
    if integer_ok and raw.dtype.kind in "iub" and slope == int(slope) and inter == int(inter):
        if slope == 1.0 and inter == 0.0:
            return raw
        return (raw.astype(np.int32) * int(slope) + int(inter)).astype(np.int32)
    out = raw.astype(np.float32, copy=False)
    if slope != 1.0 or inter != 0.0:
        out = out * np.float32(slope) + np.float32(inter)
    if not np.all(np.isfinite(out)):
        bad = int(out.size - np.count_nonzero(np.isfinite(out)))
        raise InputError(f"{path}: {bad} of its {out.size} voxels are NaN or infinite (some resampling tools pad "
                         "outside the field of view so): set them to a value, e.g. -1000 (air) for a CT in HU, "
                         "and save it again")
    return out


def _read_internal(path: Path, integer_ok: bool, channels_ok: bool) -> Volume:
    img = _load_nifti(path, channels_ok)
    affine, qform = _transforms_mm(img, path)
    unit = _xyz_unit(img)
    if _xform_code(img) == 0:
        log.warning("%s: no orientation in the header (sform and qform codes 0): its axes' directions are "
                    "nibabel's guess from the voxel sizes, which may not be the patient's (a CT read so may be "
                    "segmented poorly): save it again with its orientation if you can", path)
    sform_code = int(img.header["sform_code"]) if hasattr(img.header, "get_sform") else 0
    array = _read_array(img, path, integer_ok)
    try:
        # Outputs get the file's own sform code (0 where it declares none) and qform (``qform``).
        return Volume.from_source_array(array, affine, path, sform_code, qform, unit)
    except ValueError as exc:
        raise InputError(f"{path}: {exc}") from None


#: NIfTI spatial units -> mm (nibabel's affine keeps the file's unit; "unknown" is taken as mm, as
#: viewers do, and written back as "unknown": an output's header says what its CT's says).
_UNIT_MM = {"meter": 1000.0, "mm": 1.0, "micron": 0.001, "unknown": 1.0}
#: Voxel sizes outside this range are no CT's: a wrong unit or a broken header, which would
#: otherwise resample into nonsense (or an array of terabytes).
PLAUSIBLE_SPACING_MM = (0.05, 50.0)


def _transforms_mm(img: nib.Nifti1Image, path: Path, report: bool = True) -> tuple[np.ndarray, tuple[np.ndarray, int] | None]:
    """The voxel -> world affine in mm, and the file's own qform (in mm, with its code) when it
    has one beside a coded sform: written back as it was, so a viewer that reads the qform
    places the outputs where it places the input."""
    affine = img.affine
    if affine is None:
        raise InputError(f"{path}: the file has no affine (no qform/sform)")
    header = img.header
    unit = _xyz_unit(img)
    factor = _UNIT_MM.get(unit, 1.0)
    if factor != 1.0 and report:
        log.warning("%s: the header gives voxel sizes in %s: read in mm (x %g)", path, unit, factor)
    affine = _scaled(affine, factor)
    spacing = voxel_spacing(affine)
    low, high = PLAUSIBLE_SPACING_MM
    if not all(low <= s <= high for s in spacing):
        raise InputError(f"{path}: voxel size {tuple(round(s, 6) for s in spacing)} mm is no CT's (expected "
                         f"{low:g}-{high:g} mm; the header's unit is {unit!r}): a broken header?")
    qform = None
    if hasattr(header, "get_qform") and int(header["sform_code"]) > 0:
        # Its own qform, or none (code 0) as it had: a viewer reads the outputs as it reads the CT.
        qform = ((_scaled(header.get_qform(), factor), int(header["qform_code"])) if int(header["qform_code"]) > 0
                 else (affine, 0))
    elif hasattr(header, "get_qform") and int(header["qform_code"]) > 0:
        qform = (affine, int(header["qform_code"]))  # a qform alone (the affine is it): outputs keep no sform
    return affine, qform


def _xyz_unit(img: nib.Nifti1Image) -> str:
    return img.header.get_xyzt_units()[0] if hasattr(img.header, "get_xyzt_units") else "unknown"


def _scaled(affine: np.ndarray, factor: float) -> np.ndarray:
    if factor == 1.0:
        return np.asarray(affine, np.float64)
    affine = np.array(affine, np.float64)
    affine[:3, :] *= factor
    return affine


def nifti_shape(path: str | os.PathLike) -> tuple[int, ...]:
    """The array shape a NIfTI header declares, 3D or 3D + channels (the voxels are not read)."""
    return tuple(int(n) for n in _load_nifti(Path(path), channels_ok=True, report=False).shape)


def ct_grid(path: str | os.PathLike, *, channels_ok: bool = False) -> tuple[tuple[int, int, int], np.ndarray]:
    """The (shape, affine in mm) of the grid a CT's results are written on, from its header(s) only
    (the voxels are not read): a NIfTI's own, a case folder's CT's, or a DICOM series'
    (:mod:`kitseg.dicom`). An InputError names a file that is not a usable 3D NIfTI
    (``channels_ok``: a ``_probs`` output's classes ride on the grid), or a DICOM series one grid
    cannot hold."""
    path = Path(path)
    if is_dicom_series(path):
        from .dicom import series_geometry

        geometry = series_geometry(path)
        return (geometry.columns, geometry.rows, len(geometry.slices)), geometry.affine
    if path.is_dir():
        path = case_from_folder(path).image_path
    img = _load_nifti(path, channels_ok=channels_ok, report=False)
    return tuple(int(n) for n in img.shape[:3]), _transforms_mm(img, path, report=False)[0]


def _xform_code(img: nib.Nifti1Image) -> int:
    """The code of the transform ``img.affine`` came from: the sform's, else the qform's, else 0."""
    header = img.header
    if not hasattr(header, "get_sform"):  # ANALYZE and the like carry no codes
        return 0
    for code in (int(header["sform_code"]), int(header["qform_code"])):
        if code > 0:
            return code
    return 0


def read_volume(path: str | os.PathLike, *, integer_ok: bool = True) -> Volume:
    """Read a 3D NIfTI file as an internal-orientation :class:`Volume`."""
    return _read_internal(Path(path), integer_ok, channels_ok=False)


def read_probabilities(path: str | os.PathLike) -> Volume:
    """Read a probability map that ``kits-seg predict --save-intermediates`` wrote, as float32.

    ``*_y1.nii.gz`` gives a (Z, Y, X) volume; ``*_probs.nii.gz`` (class channels last, as NIfTI
    stores vector data) gives (Z, Y, X, C), each channel in the internal orientation.
    """
    return _read_internal(Path(path), integer_ok=False, channels_ok=True)


def read_ct(path: str | os.PathLike) -> Volume:
    """Read a CT from a NIfTI file, a KiTS case folder, or a DICOM series (its folder, or a file of it)."""
    path = Path(path)
    if is_dicom_series(path):
        from .dicom import read_dicom_series

        return read_dicom_series(path)
    if path.is_dir():
        return read_volume(case_from_folder(path).image_path)
    return read_volume(path)


#: Share of neighbouring voxels (along a row, where either is not 0) with the same value above
#: which whole numbers 0..255 are taken for a label map however many there are: TotalSegmentator's
#: 62-class map of the real CT scores 0.88, a KiTS19 mask 0.94, that CT windowed to 8 bits 0.04
#: (its noise makes neighbours differ; the background, flat in both, is left out).
LABEL_MAP_FLATNESS = 0.5


def label_map_values(array: np.ndarray) -> list[int] | None:
    """The values of an array that is a label map, not a CT, else ``None``; judged on 16 to 31
    slices spread over it. A label map holds whole numbers 0..255, a few of them (16 at most: a
    KiTS19 or KiTS21 mask, a saved result) or constant over regions; a CT in HU holds air at about
    -1000 and noise."""
    sample = np.asarray(array[:: max(1, array.shape[0] // 16)])
    if sample.size == 0 or not (sample.min() >= 0 and sample.max() <= 255):
        return None
    if sample.dtype.kind == "f" and not np.array_equal(sample, np.round(sample)):
        return None
    values = np.unique(sample)
    if values.size > 16:
        left, right = sample[..., :-1], sample[..., 1:]
        inside = (left != 0) | (right != 0)
        if not inside.any() or np.mean((left == right)[inside]) < LABEL_MAP_FLATNESS:
            return None
    return [int(v) for v in values]


#: Names the tool gives its results: a file so named is a result, not a reference or a CT.
_RESULT_RE = re.compile(rf"^prediction_\d+$|_(labels|{'|'.join(INTERMEDIATES)})$")


def is_result_name(path: str | os.PathLike) -> bool:
    """``path`` is named as napari-kits names its outputs (``prediction_00042``, ``NAME_labels``,
    ``NAME_y1``, ``NAME_mask``, ``NAME_probs``; any NIfTI suffix)."""
    return bool(_RESULT_RE.search(strip_nifti_suffix(Path(path).name)))


def read_labels(path: str | os.PathLike, like: Volume | None = None) -> Volume:
    """Read a label map; with ``like``, check it lies on that volume's grid."""
    return as_labels(read_volume(path), like)


def as_labels(labels: Volume, like: Volume | None = None) -> Volume:
    """A volume read from a file (``labels.source.path``) as a uint8 label map, checked as
    :func:`read_labels` checks it: for a caller that read the file already to judge what it holds.
    ``labels`` itself is returned, its array converted in place."""
    path = labels.source.path
    arr = labels.array
    if arr.dtype.kind == "f":
        if not np.all(arr == np.round(arr)):
            raise InputError(f"{path}: holds fractions, not a label map (whole numbers 0..255): "
                             "a CT or a probability map?")
    low, high = arr.min(), arr.max()
    if low < 0 or high > 255:
        guess = ": a CT?" if low < -100 else ""  # air is about -1000 HU
        raise InputError(f"{path}: holds values {low:g}..{high:g}, not a label map (whole numbers 0..255){guess}")
    labels.array = arr.astype(np.uint8, copy=False)
    if like is not None:
        check_same_grid(labels.source, like.source, path)
    return labels


def check_same_grid(grid: SourceGrid, reference: SourceGrid, path: Path | None = None, atol: float = 1e-3,
                    reference_name: str = "the CT's") -> None:
    """Refuse a volume that does not lie on ``reference``'s grid; the message names ``path`` and the reference.

    The grids are compared as read (internal orientation): the same voxels stored in another
    axis order (RAS against KiTS19's I, P, L) overlay, and their internal arrays match voxel for voxel.
    """
    where = f"{path}: " if path else ""
    guessed = [name for name, g in (("this file", grid), (reference_name.replace("'s", "", 1), reference))
               if not g.declares_orientation]
    unoriented = ("" if not guessed else
                  f"; {guessed[0]} declares no orientation (sform and qform codes 0): its axes are a guess"
                  if len(guessed) == 1 else "; neither declares an orientation (sform and qform codes 0): their axes "
                  "are guesses")
    if grid.internal_shape() != reference.internal_shape():
        if grid.shape == reference.shape:  # as many voxels each way, but the affines run the axes differently
            raise InputError(f"{where}its axes run {''.join(grid.axcodes)}, {reference_name} "
                             f"{''.join(reference.axcodes)} (shape {grid.shape} both): the two do not overlay"
                             + unoriented)
        raise InputError(f"{where}shape {grid.shape} differs from {reference_name} {reference.shape}")
    if not np.allclose(grid.internal_affine(), reference.internal_affine(), atol=atol):
        raise InputError(f"{where}its affine differs from {reference_name}: the two do not overlay" + unoriented)


def save_nifti_atomic(array: np.ndarray, affine: np.ndarray, path: Path, *, scale: float | None = None,
                      intent: str | None = None, xform_code: int = 1,
                      qform: tuple[np.ndarray, int] | None = None, xyz_unit: str = "mm") -> Path:
    """Write ``array`` with ``affine`` (qform and sform both, so every viewer agrees) atomically.

    The data go to a temporary file in the same folder, then ``os.replace``: a reader or a
    crashed run never sees a half-written file. ``scale`` sets the NIfTI slope (uint8 data
    with slope 1/255 read back as 0..1). ``xform_code`` 0 writes the voxel sizes with no
    orientation, as the CT it came from declared none. ``qform`` (matrix, code) is a source
    file's own qform, written instead of the affine's (code 0: none). The affines are in mm;
    ``xyz_unit`` ("mm", "meter", "micron", "unknown": read as mm) is the unit the file stores them in.
    """
    path = Path(path)
    to_unit = 1.0 / _UNIT_MM[xyz_unit]
    affine = _scaled(affine, to_unit)
    img = nib.Nifti1Image(np.asarray(array), affine)
    if qform is not None:
        img.set_qform(_scaled(qform[0], to_unit), code=qform[1])
    else:
        img.set_qform(affine, code=xform_code)
    img.set_sform(affine, code=xform_code)
    img.header.set_xyzt_units(xyz_unit)
    if intent:
        img.header.set_intent(intent)
    if scale is not None:
        img.header.set_slope_inter(scale, 0.0)
    suffix = ".nii.gz" if path.name.lower().endswith(".gz") else ".nii"  # nibabel compresses by suffix
    with atomic_path(path, suffix) as tmp:
        nib.save(img, str(tmp))
    return path


def write_on_source_grid(
    internal_array: np.ndarray,
    source: SourceGrid,
    path: str | os.PathLike,
    *,
    overwrite: bool = False,
    intent: str | None = None,
    scale: float | None = None,
) -> Path:
    """Write an internal-orientation array on the source file's exact grid (shape + affine).

    ``internal_array`` is (Z, Y, X) or (Z, Y, X, C). ``scale`` stores integer data with a NIfTI
    slope (uint8 probabilities with slope 1/255 read back as 0..1 in every viewer).
    Refuses to replace the source file itself, and any existing file unless ``overwrite``.
    """
    path = Path(path)
    if not is_nifti(path):
        raise InputError(f"{path}: output must end in .nii or .nii.gz")
    if source.path is not None and path.exists() and Path(source.path).exists() and os.path.samefile(path, source.path):
        raise InputError(f"{path}: refusing to overwrite the input file whose grid these data are written on; "
                         "choose another name")
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path}: exists already (pass overwrite=True / --overwrite to replace it)")
    return save_nifti_atomic(source.to_source(internal_array), source.affine, path, scale=scale, intent=intent,
                             xform_code=source.xform_code, qform=source.qform, xyz_unit=source.xyz_unit)


def write_labels(labels: np.ndarray, source: SourceGrid, path: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """Write a uint8 label map {0, 1, 2} on the source grid."""
    labels = np.asarray(labels)
    if labels.dtype != np.uint8:
        if labels.min() < 0 or labels.max() > 255:
            raise ValueError("label values must lie in 0..255")
        labels = labels.astype(np.uint8)
    return write_on_source_grid(labels, source, path, overwrite=overwrite, intent="label")


def write_kits_case(ct_hu: np.ndarray, labels: np.ndarray | None, affine: np.ndarray, folder: str | os.PathLike) -> Path:
    """Write a KiTS19 case folder from arrays stored on ``affine``'s grid (file orientation).

    The labels go first and the image last, so a folder holding ``imaging.nii.gz`` is complete.
    """
    folder = Path(folder)
    if labels is not None:
        if labels.shape != ct_hu.shape:
            raise ValueError(f"ct {ct_hu.shape} and labels {labels.shape} must have the same shape")
        save_nifti_atomic(np.asarray(labels, dtype=np.uint8), affine, folder / KITS_LABELS)
    save_nifti_atomic(np.asarray(ct_hu, dtype=np.int16), affine, folder / KITS_IMAGE)
    return folder
