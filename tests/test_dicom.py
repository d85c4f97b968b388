"""DICOM series: read on the grid their headers give, refused where one affine cannot hold them."""

from __future__ import annotations

import shutil
import sys

import nibabel as nib
import numpy as np
import pytest

from kitseg.io import InputError, discover_inputs, read_ct, write_labels

from .conftest import REPO, requires

pydicom = pytest.importorskip("pydicom")
REAL_SERIES = REPO.parent / "shared" / "data" / "realct" / "totalseg_upper_abdomen_dicom"


def _oblique(row_degrees: float = 30.0, tilt_degrees: float = 12.0) -> tuple[np.ndarray, np.ndarray]:
    """ImageOrientationPatient's two directions (along a row, down a column), turned and tipped."""
    a, b = np.radians(row_degrees), np.radians(tilt_degrees)
    along_row = np.array([np.cos(a), np.sin(a), 0.0])
    down_column = np.array([-np.sin(a) * np.cos(b), np.cos(a) * np.cos(b), np.sin(b)])
    return along_row, down_column


def write_series(folder, hu: np.ndarray, *, along_row=(1.0, 0.0, 0.0), down_column=(0.0, 1.0, 0.0),
                 first=(-120.0, -80.0, 300.0), pixel_mm=(0.8, 0.7), step_mm=2.5, series_uid="1.2.826.0.1.1",
                 modality="CT", shift_mm=(0.0, 0.0, 0.0), skip=(), rng_seed=0) -> list:
    """Write ``hu`` (slices, rows, columns) as one file per slice, under shuffled names, stored as
    scanners store CT (unsigned values, intercept -1024). ``shift_mm``: added per slice (a tilt)."""
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    folder.mkdir(parents=True, exist_ok=True)
    along_row, down_column = np.asarray(along_row, float), np.asarray(down_column, float)
    normal = np.cross(along_row, down_column)
    order = np.random.default_rng(rng_seed).permutation(hu.shape[0])
    written = []
    for k in order:
        if k in skip:
            continue
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = pydicom.Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, meta.MediaStorageSOPInstanceUID
        ds.Modality, ds.SeriesInstanceUID, ds.SeriesNumber, ds.InstanceNumber = modality, series_uid, 3, int(k) + 1
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.ImageOrientationPatient = [float(v) for v in (*along_row, *down_column)]
        ds.ImagePositionPatient = [float(v) for v in np.asarray(first) + k * step_mm * normal + k * np.asarray(shift_mm)]
        ds.PixelSpacing = [float(pixel_mm[0]), float(pixel_mm[1])]
        ds.SliceThickness = step_mm
        ds.Rows, ds.Columns = hu.shape[1:]
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
        ds.RescaleSlope, ds.RescaleIntercept = 1, -1024
        ds.PixelData = (hu[k] + 1024).astype("<u2").tobytes()
        path = folder / f"IM{generate_uid()[-12:]}"
        try:
            ds.save_as(path, enforce_file_format=True)  # pydicom 3
        except TypeError:
            ds.save_as(path, write_like_original=False)  # pydicom 2
        written.append(path)
    return written


def _ct(shape=(6, 9, 11), seed=0) -> np.ndarray:
    return np.random.default_rng(seed).integers(-1000, 1500, size=shape).astype(np.int16)


def test_an_oblique_series_is_read_where_its_headers_place_each_pixel(tmp_path):
    """Every pixel lands where DICOM puts it: IPP + column * spacing * row direction + row *
    spacing * column direction, LPS turned to RAS; a label map written on its grid does too."""
    hu = _ct()
    along_row, down_column = _oblique()
    first, pixel_mm, step_mm = np.array([-120.0, -80.0, 300.0]), (0.8, 0.7), 2.5
    write_series(tmp_path / "series", hu, along_row=along_row, down_column=down_column, first=first,
                 pixel_mm=pixel_mm, step_mm=step_mm)
    volume = read_ct(tmp_path / "series")
    assert volume.array.dtype == np.int16 and sorted(volume.shape) == sorted(hu.shape)
    assert sorted(volume.spacing) == pytest.approx(sorted((step_mm, *pixel_mm)))
    normal = np.cross(along_row, down_column)
    to_internal = np.linalg.inv(volume.affine)
    labels = np.zeros(volume.shape, np.uint8)
    for k, row, column in [(0, 0, 0), (5, 8, 10), (2, 3, 7), (4, 8, 0)]:
        lps = first + column * pixel_mm[1] * along_row + row * pixel_mm[0] * down_column + k * step_mm * normal
        ras = np.array([-lps[0], -lps[1], lps[2], 1.0])
        index = to_internal @ ras
        np.testing.assert_allclose(index[:3], np.round(index[:3]), atol=1e-6)
        voxel = tuple(int(i) for i in np.round(index[:3]))
        assert volume.array[voxel] == hu[k, row, column]
        labels[voxel] = 1
    out = write_labels(labels, volume.source, tmp_path / "series_labels.nii.gz")
    written = nib.load(out)
    assert nib.aff2axcodes(written.affine) == volume.source.axcodes
    marked = np.argwhere(np.asarray(written.dataobj) == 1)
    lps_marked = (written.affine @ np.c_[marked, np.ones(len(marked))].T).T[:, :3] * [-1, -1, 1]
    expected = [first + c * pixel_mm[1] * along_row + r * pixel_mm[0] * down_column + k * step_mm * normal
                for k, r, c in [(0, 0, 0), (5, 8, 10), (2, 3, 7), (4, 8, 0)]]
    np.testing.assert_allclose(sorted(map(tuple, lps_marked)), sorted(map(tuple, expected)), atol=1e-3)


def test_series_one_grid_cannot_hold_are_refused_naming_the_folder_and_the_problem(tmp_path, monkeypatch):
    hu = _ct()
    write_series(tmp_path / "gap", hu, skip=(3,))
    with pytest.raises(InputError, match=r"gap: its slices are not evenly spaced \(5.00 mm between .*, 2.50 mm "
                                         r"elsewhere: a slice missing\?\).*dcm2niix"):
        read_ct(tmp_path / "gap")
    write_series(tmp_path / "tilt", hu, shift_mm=(0.0, 1.0, 0.0))
    with pytest.raises(InputError, match=r"tilt: its slices are not stacked along their normal \(a gantry tilt"):
        read_ct(tmp_path / "tilt")
    write_series(tmp_path / "mr", hu, modality="MR")
    with pytest.raises(InputError, match=r"mr: is a MR series, not CT"):
        read_ct(tmp_path / "mr")
    both = tmp_path / "both"
    write_series(both, hu)
    other = write_series(both, hu[:4], series_uid="1.2.826.0.1.2", first=(0.0, 0.0, 0.0))
    with pytest.raises(InputError, match=r"both: holds 2 series or orientations \(6 slices \(3\); 4 slices \(3\)\); "
                                         r"put each series in a folder of its own, or give one file of the series"):
        read_ct(both)
    assert read_ct(other[0]).array.size == 4 * 9 * 11  # one file given: its series
    write_series(tmp_path / "twice", hu)
    write_series(tmp_path / "twice", hu, rng_seed=1)
    with pytest.raises(InputError, match=r"twice: 6 slice position\(s\) held twice"):
        read_ct(tmp_path / "twice")
    (tmp_path / "no_image").mkdir()
    (tmp_path / "no_image" / "DICOMDIR").write_bytes(bytes(128) + b"DICM" + b"\x02\x00\x10")
    with pytest.raises(InputError, match=r"no_image: its DICOM files hold no image slices"):
        read_ct(tmp_path / "no_image")
    cut = write_series(tmp_path / "cut", hu)[2]
    cut.write_bytes(cut.read_bytes()[:-50])  # a copy that stopped short
    with pytest.raises(InputError, match=rf"{cut.name}: its pixels cannot be decoded .*dcm2niix"):
        read_ct(tmp_path / "cut")
    # Without pydicom: said what to install, or how to convert instead.
    monkeypatch.setitem(sys.modules, "pydicom", None)
    with pytest.raises(InputError, match=r"reading DICOM needs pydicom: pip install pydicom pillow \(or convert it "
                                         r"with dcm2niix"):
        read_ct(tmp_path / "gap")


def test_predict_takes_a_series_folder_a_file_of_it_and_a_folder_of_series(tmp_path, tiny_bundle, capsys):
    from kitseg.checkpoint import save_bundle
    from kitseg.cli import main

    weights = save_bundle(tiny_bundle, tmp_path / "tiny.kseg")
    hu = _ct((8, 24, 20), seed=2)
    study = tmp_path / "study"
    files = write_series(study / "SE2", hu, along_row=_oblique()[0], down_column=_oblique()[1])
    write_series(study / "SE3", hu[:, ::-1], series_uid="1.2.826.0.1.3")
    for given, names in ((study / "SE2", ["SE2_labels.nii.gz"]), (files[0], ["SE2_labels.nii.gz"]),
                         (study, ["SE2_labels.nii.gz", "SE3_labels.nii.gz"])):
        out = tmp_path / f"out_{given.name}"
        assert main(["predict", str(given), "-o", str(out), "--weights", str(weights)]) == 0
        assert sorted(p.name for p in out.iterdir()) == names
    series = read_ct(study / "SE2")
    written = nib.load(tmp_path / "out_SE2" / "SE2_labels.nii.gz")
    assert written.shape == series.source.shape
    np.testing.assert_allclose(written.affine, series.source.affine, atol=1e-4)
    assert [c.name for c in discover_inputs(study)] == ["SE2", "SE3"]
    # A series one grid cannot hold is refused before any model is loaded.
    write_series(tmp_path / "gap", hu, skip=(4,))
    assert main(["predict", str(tmp_path / "gap"), "-o", str(tmp_path / "out_gap"), "--weights", str(weights)]) == 2
    assert "gap: its slices are not evenly spaced" in capsys.readouterr().err
    assert not (tmp_path / "out_gap").exists()


@requires(REAL_SERIES)
def test_a_real_jpeg2000_series_reads_in_hu_on_its_grid(tmp_path):
    """20 slices of a contrast CT, JPEG 2000 compressed (decoded by Pillow), 2 mm apart (3 mm thick)."""
    volume = read_ct(REAL_SERIES)
    assert volume.shape == (20, 512, 512)
    assert volume.spacing == pytest.approx((2.0, 0.9765625, 0.9765625), abs=1e-5)
    assert volume.array.min() == -1024 and volume.array.max() > 1000  # air outside the body, bone
    assert volume.source.axcodes == ("L", "P", "S")
    one_file = read_ct(sorted(REAL_SERIES.iterdir())[0])
    np.testing.assert_array_equal(one_file.array, volume.array)
    copy = tmp_path / "copy"
    shutil.copytree(REAL_SERIES, copy)
    (copy / "notes.txt").write_text("not DICOM")
    np.testing.assert_array_equal(read_ct(copy).array, volume.array)
