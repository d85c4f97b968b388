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
                 series_number=3, modality="CT", shift_mm=(0.0, 0.0, 0.0), skip=(), rng_seed=0, signed=False,
                 rescale=lambda k: (1, -1024), image_type=("ORIGINAL", "PRIMARY", "AXIAL"), decimals=None,
                 study_uid="1.2.826.0.1.100", frame_of_reference_uid="1.2.826.0.1.101") -> list:
    """Write ``hu`` (slices, rows, columns) as one file per slice, under shuffled names, stored as
    scanners store CT: unsigned values with intercept -1024, or ``signed`` (intercept 0), or each
    slice ``k`` with ``rescale(k)`` = (slope, intercept). ``shift_mm``: added per slice (a tilt);
    ``decimals``: positions written rounded, as some scanners write them; ``study_uid`` and
    ``frame_of_reference_uid``: None leaves them out, as some anonymisers do."""
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
        ds.Modality, ds.SeriesInstanceUID, ds.SeriesNumber, ds.InstanceNumber = (modality, series_uid,
                                                                                series_number, int(k) + 1)
        ds.ImageType = list(image_type)
        ds.PatientID, ds.PatientName, ds.StudyDate = "KITS-TEST-1", "Test^Patient", "20261207"
        for keyword, uid in (("StudyInstanceUID", study_uid), ("FrameOfReferenceUID", frame_of_reference_uid)):
            if uid is not None:
                setattr(ds, keyword, uid)
        ds.ImageOrientationPatient = [float(v) for v in (*along_row, *down_column)]
        position = np.asarray(first) + k * step_mm * normal + k * np.asarray(shift_mm)
        ds.ImagePositionPatient = [float(v) for v in (position if decimals is None else np.round(position, decimals))]
        ds.PixelSpacing = [float(pixel_mm[0]), float(pixel_mm[1])]
        ds.SliceThickness = step_mm
        ds.Rows, ds.Columns = hu.shape[1:]
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, int(signed)
        slope, intercept = (1, 0) if signed else rescale(k)
        ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
        stored = np.round((hu[k].astype(float) - intercept) / slope)
        ds.PixelData = stored.astype("<i2" if signed else "<u2").tobytes()
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
                                         r"elsewhere; a slice 1.00 mm off an even grid: a slice missing\?\).*dcm2niix"):
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
    with pytest.raises(InputError, match=r"both: holds 2 series or orientations \(6 slices \(3, UID \.\.\.26\.0\.1\.1\); "
                                         r"4 slices \(3, UID \.\.\.26\.0\.1\.2\)\); put each series in a folder of its own, "
                                         r"or give one file of the series"):
        read_ct(both)
    assert read_ct(other[0]).array.size == 4 * 9 * 11  # one file given: its series
    write_series(tmp_path / "twice", hu)
    write_series(tmp_path / "twice", hu, rng_seed=1)
    with pytest.raises(InputError, match=r"twice: 6 slice position\(s\) held twice"):
        read_ct(tmp_path / "twice")
    (tmp_path / "no_image").mkdir()
    (tmp_path / "no_image" / "SR1").write_bytes(bytes(128) + b"DICM" + b"\x02\x00\x10")  # no image: a report
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


def test_what_scanners_vary_reads_as_the_same_hu_on_the_same_grid(tmp_path):
    """Signed pixels, a rescale that changes along the series, positions rounded to two decimals on
    thin slices, a scout view and a DICOMDIR beside the slices: the same HU, the same grid."""
    hu = _ct()
    plain = read_ct(write_series(tmp_path / "plain", hu, step_mm=0.6)[0].parent)
    write_series(tmp_path / "signed", hu, step_mm=0.6, signed=True)
    write_series(tmp_path / "rescaled", hu, step_mm=0.6, rescale=lambda k: (0.5 if k % 2 else 1, -1024 - 8 * k))
    write_series(tmp_path / "rounded", hu, step_mm=0.6, decimals=2, along_row=_oblique(10, 0)[0],
                 down_column=_oblique(10, 0)[1])
    for name in ("signed", "rescaled"):
        volume = read_ct(tmp_path / name)
        np.testing.assert_array_equal(volume.array, plain.array)
        np.testing.assert_allclose(volume.affine, plain.affine)
    assert read_ct(tmp_path / "rounded").spacing == pytest.approx((0.6, 0.8, 0.7), abs=1e-3)
    # Positions written with one decimal on 1.25 mm slices: the mean step, not a missing slice.
    write_series(tmp_path / "one_decimal", _ct((12, 9, 11)), step_mm=1.25, decimals=1)
    rounded = read_ct(tmp_path / "one_decimal")
    assert rounded.spacing == pytest.approx((1.25, 0.8, 0.7), abs=5e-3)  # as rounded
    exact = read_ct(write_series(tmp_path / "exact", _ct((12, 9, 11)), step_mm=1.25)[0].parent)
    corners = np.array([[0, 0, 0, 1], [11, 8, 10, 1]]).T  # first and last slice, opposite pixels
    np.testing.assert_allclose(rounded.affine @ corners, exact.affine @ corners, atol=0.06)  # every slice placed
    # Steps that change along the series (3.0 mm, then 3.25 mm), each step near the next: one even
    # grid would put slices millimetres off, so it is refused.
    drift = tmp_path / "drift"
    write_series(drift, _ct((40, 9, 11)), step_mm=3.0)
    later = write_series(tmp_path / "later", _ct((20, 9, 11)), step_mm=3.25, first=(-120.0, -80.0, 300.0 + 40 * 3.0))
    for path in later:
        shutil.move(path, drift / f"B{path.name}")
    with pytest.raises(InputError, match=r"drift: its slices are not evenly spaced .* mm off an even grid"):
        read_ct(drift)
    # Written without the preamble and file meta, as older systems did: read all the same.
    bare = tmp_path / "bare"
    from pydicom.filebase import DicomFileLike
    from pydicom.filewriter import write_dataset

    for path in write_series(bare, hu, step_mm=0.6):
        ds = pydicom.dcmread(path)
        del ds.file_meta
        with open(path, "wb") as handle:
            out = DicomFileLike(handle)
            out.is_little_endian, out.is_implicit_VR = True, True
            write_dataset(out, ds)
    assert b"DICM" not in (bare / sorted(p.name for p in bare.iterdir())[0]).read_bytes()[:200]
    np.testing.assert_array_equal(read_ct(bare).array, plain.array)
    # Raw arrays that begin as a DICOM data set may (bytes 08 00) are not taken for one.
    from kitseg.io import is_dicom_file

    raw = tmp_path / "raw"
    raw.mkdir()
    for name, values in (("eights.bin", np.full(40, 8, "<i4")), ("ramp.raw", np.arange(8, 80, dtype="<u2")),
                         ("image.raw", np.tile(np.array([8, 7, 3, 4], "<u2"), 20))):
        (raw / name).write_bytes(values.tobytes())
        assert not is_dicom_file(raw / name)
    assert all(is_dicom_file(p) for p in bare.iterdir())
    # Two series whose UIDs an anonymiser blanked are told apart by their numbers, not merged.
    blank = tmp_path / "blank"
    write_series(blank, hu, series_uid="", series_number=2)
    write_series(blank, hu, series_uid="", series_number=3, first=(-120.0, -80.0, 301.0))
    with pytest.raises(InputError, match=r"blank: holds 2 series or orientations \(6 slices \(2\); 6 slices \(3\)\)"):
        read_ct(blank)
    with_scout = tmp_path / "with_scout"
    write_series(with_scout, hu, step_mm=0.6)
    scout = write_series(with_scout, hu[:1], image_type=("ORIGINAL", "PRIMARY", "LOCALIZER"),
                         along_row=(0, 1, 0), down_column=(0, 0, -1), first=(0.0, -200.0, 400.0))[0]
    shutil.copy(scout, with_scout / "DICOMDIR")  # stands in for the media's index: never read
    np.testing.assert_array_equal(read_ct(with_scout).array, plain.array)
    with pytest.raises(InputError, match=rf"{scout.name}: is no image slice of a series \(a scout view"):
        read_ct(scout)
    enhanced = tmp_path / "enhanced"
    path = write_series(enhanced, hu)[0]
    ds = pydicom.dcmread(path)
    ds.NumberOfFrames = 6
    ds.save_as(path)
    with pytest.raises(InputError, match=rf"{path.name}: an enhanced \(multi-frame\) DICOM of 6 frames is not read "
                                         r"here; convert it with dcm2niix"):
        read_ct(enhanced)


def test_predict_takes_a_series_folder_a_file_of_it_and_a_folder_of_series(tmp_path, tiny_bundle, capsys,
                                                                           caplog):
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
    # A PACS export: a scout series and a dose report beside the CT series are said and passed over.
    write_series(study / "SE1", hu[:2], image_type=("ORIGINAL", "PRIMARY", "LOCALIZER"))
    (study / "SE999").mkdir()
    (study / "SE999" / "SR1").write_bytes(bytes(128) + b"DICM" + b"\x02\x00\x10")
    with caplog.at_level("WARNING"):
        assert main(["predict", str(study), "-o", str(tmp_path / "out_pacs"), "--weights", str(weights)]) == 0
    assert sorted(p.name for p in (tmp_path / "out_pacs").iterdir()) == ["SE2_labels.nii.gz", "SE3_labels.nii.gz"]
    assert "SE1: its DICOM files hold no image slices (scout views or reports only?): not segmented" in caplog.text
    assert "SE999: its DICOM files hold no image slices" in caplog.text
    # Two series in one folder, each given by one of its files: results of their own.
    flat = tmp_path / "flat"
    two = [write_series(flat, hu, series_number=2)[0], write_series(flat, hu[:, ::-1], series_number=5,
                                                                     series_uid="1.2.826.0.1.5")[0]]
    for given in two:
        assert main(["predict", str(given), "-o", str(tmp_path / "out_flat"), "--weights", str(weights)]) == 0
    assert sorted(p.name for p in (tmp_path / "out_flat").iterdir()) == ["flat_series2_labels.nii.gz",
                                                                        "flat_series5_labels.nii.gz"]
    # A DICOM file among NIfTI CTs makes no series of their folder: the CTs are segmented.
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    nib.save(nib.Nifti1Image(hu.transpose(2, 1, 0), np.diag([0.7, 0.8, 2.5, 1.0])), str(mixed / "scan.nii.gz"))
    shutil.copy(files[0], mixed / "stray.dcm")
    assert [c.name for c in discover_inputs(mixed)] == ["scan"]
    # Another study's series of the same name is not taken for done (--skip-existing).
    other_study = tmp_path / "other_study"
    write_series(other_study / "SE2", _ct((9, 24, 20), seed=3))
    assert main(["predict", str(other_study / "SE2"), "-o", str(tmp_path / "out_SE2"), "--weights", str(weights),
                 "--skip-existing"]) == 2
    assert "SE2_labels.nii.gz: exists, on another grid than" in capsys.readouterr().err
    assert main(["predict", str(study / "SE2"), "-o", str(tmp_path / "out_SE2"), "--weights", str(weights),
                 "--skip-existing"]) == 0
    assert "nothing to do" in capsys.readouterr().out
    # With its intermediates asked for, the other study's labels are not completed with this one's maps.
    assert main(["predict", str(other_study / "SE2"), "-o", str(tmp_path / "out_SE2"), "--weights", str(weights),
                 "--skip-existing", "--save-intermediates"]) == 2
    assert "SE2_labels.nii.gz: exists, on another grid than" in capsys.readouterr().err
    assert sorted(p.name for p in (tmp_path / "out_SE2").iterdir()) == ["SE2_labels.nii.gz"]
    assert main(["predict", str(study / "SE2"), "-o", str(tmp_path / "out_SE2"), "--weights", str(weights),
                 "--skip-existing", "--save-intermediates"]) == 0  # its own: the maps are added
    assert len(list((tmp_path / "out_SE2").iterdir())) == 4
    # An export given above its study: said where the series folders are; a DICOMDIR is no image.
    export = tmp_path / "export"
    shutil.copytree(study, export / "PATIENT1" / "STUDY1")
    shutil.copy(files[0], export / "DICOMDIR")
    for given in (export, export / "DICOMDIR"):
        assert main(["predict", str(given), "-o", str(tmp_path / "out_export"), "--weights", str(weights)]) == 2
        assert f"DICOM series lie deeper: give {export / 'PATIENT1' / 'STUDY1'}, which holds series folders" in (
            capsys.readouterr().err)
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
    # PixelSpacing as written (0.9765625), not rounded: other tools compare grids to 1e-6.
    assert np.abs(np.diag(volume.source.affine)[:2]).tolist() == [0.9765625, 0.9765625]
    one_file = read_ct(sorted(REAL_SERIES.iterdir())[0])
    np.testing.assert_array_equal(one_file.array, volume.array)
    copy = tmp_path / "copy"
    shutil.copytree(REAL_SERIES, copy)
    (copy / "notes.txt").write_text("not DICOM")
    np.testing.assert_array_equal(read_ct(copy).array, volume.array)
