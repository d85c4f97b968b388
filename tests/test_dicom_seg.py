"""DICOM SEG output: each labelled pixel tied to the slice and place it came from, read back
with pydicom alone (not the library that wrote it), as a PACS or viewer reads it."""

from __future__ import annotations

import shutil

import nibabel as nib
import numpy as np
import pytest

from kitseg.io import InputError, discover_inputs, read_ct

from .conftest import requires
from .test_dicom import REAL_SERIES, _ct, _oblique, write_series

pydicom = pytest.importorskip("pydicom")
pytest.importorskip("highdicom")

SEGMENTATION_STORAGE = "1.2.840.10008.5.1.4.1.1.66.4"


KITS_VALUE = {"kidney": 1, "kidney tumor": 2}


def read_seg_labels(seg_path, series_files) -> np.ndarray:
    """The SEG's label map as (slice, row, column) in the order of ``series_files``' positions, in
    KiTS19 values (from each segment's label), from each frame's referenced slice and segment
    number; each frame's position, and the pixel spacing and orientation, checked against the CT's."""
    seg = pydicom.dcmread(seg_path)
    slices = sorted((pydicom.dcmread(p, stop_before_pixels=True) for p in series_files),
                    key=lambda ds: float(np.dot(np.cross(*np.reshape(ds.ImageOrientationPatient, (2, 3))),
                                                ds.ImagePositionPatient)))
    # The slice's SOP instance UID (an anonymiser may have blanked it in the data set, not in the file meta).
    index = {str(ds.SOPInstanceUID or ds.file_meta.MediaStorageSOPInstanceUID): k for k, ds in enumerate(slices)}
    labels = np.zeros((len(slices), int(seg.Rows), int(seg.Columns)), np.uint8)
    pixels = seg.pixel_array.reshape(-1, int(seg.Rows), int(seg.Columns))
    shared = seg.SharedFunctionalGroupsSequence[0]
    np.testing.assert_allclose([float(v) for v in shared.PixelMeasuresSequence[0].PixelSpacing],
                               [float(v) for v in slices[0].PixelSpacing], atol=1e-6)
    np.testing.assert_allclose([float(v) for v in shared.PlaneOrientationSequence[0].ImageOrientationPatient],
                               [float(v) for v in slices[0].ImageOrientationPatient], atol=1e-5)
    values = {int(s.SegmentNumber): KITS_VALUE[s.SegmentLabel] for s in seg.SegmentSequence}

    def group(groups, name):  # a frame's own, or (one segment only, say) what all frames share
        return getattr(groups, name, None) or getattr(shared, name)

    for frame, groups in zip(pixels, seg.PerFrameFunctionalGroupsSequence):
        source = group(groups, "DerivationImageSequence")[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        k = index[str(source)]
        np.testing.assert_allclose([float(v) for v in group(groups, "PlanePositionSequence")[0].ImagePositionPatient],
                                   [float(v) for v in slices[k].ImagePositionPatient], atol=1e-4)
        segment = int(group(groups, "SegmentIdentificationSequence")[0].ReferencedSegmentNumber)
        assert not np.any(labels[k][frame > 0]), "two segments claim one pixel"
        labels[k][frame > 0] = values[segment]
    return labels


def _labels_on(volume) -> np.ndarray:
    labels = np.zeros(volume.shape, np.uint8)
    labels[1:4, 2:6, 3:8] = 1
    labels[2, 3:5, 4:6] = 2
    return labels


def test_a_seg_ties_each_labelled_pixel_to_its_slice_and_place(tmp_path):
    from kitseg.dicom_seg import write_dicom_seg

    hu = _ct((6, 9, 11))
    files = write_series(tmp_path / "SE3", hu, along_row=_oblique()[0], down_column=_oblique()[1])
    volume = read_ct(tmp_path / "SE3")
    labels = _labels_on(volume)
    out = write_dicom_seg(labels, volume.source, tmp_path / "SE3", tmp_path / "SE3_labels.dcm", model="tiny.kseg")
    # What the NIfTI holds on the series' grid, as (slice, row, column): the SEG holds the same.
    expected = volume.source.to_source(labels).transpose(2, 1, 0)
    np.testing.assert_array_equal(read_seg_labels(out, files), expected)
    seg = pydicom.dcmread(out)
    ct = pydicom.dcmread(files[0], stop_before_pixels=True)
    assert (seg.SOPClassUID, seg.Modality) == (SEGMENTATION_STORAGE, "SEG")
    assert (seg.StudyInstanceUID, seg.FrameOfReferenceUID, seg.PatientID) == (
        ct.StudyInstanceUID, ct.FrameOfReferenceUID, ct.PatientID)
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == ct.SeriesInstanceUID
    assert seg.SeriesInstanceUID != ct.SeriesInstanceUID and seg.SeriesNumber == 1003
    segments = {int(s.SegmentNumber): s for s in seg.SegmentSequence}
    # SNOMED CT as DICOM's CID 7150 (categories) and 7151 (types) code them today.
    assert [(n, s.SegmentLabel, s.SegmentedPropertyCategoryCodeSequence[0].CodeValue,
             s.SegmentedPropertyTypeCodeSequence[0].CodeValue, s.SegmentAlgorithmType)
            for n, s in sorted(segments.items())] == [(1, "kidney", "91723000", "64033007", "AUTOMATIC"),
                                                      (2, "kidney tumor", "49755003", "108369006", "AUTOMATIC")]
    assert segments[2].AnatomicRegionSequence[0].CodeValue == "64033007"
    algorithm = segments[1].SegmentationAlgorithmIdentificationSequence[0]
    assert algorithm.AlgorithmFamilyCodeSequence[0].CodeValue == "123110"  # DCM: Artificial Intelligence
    assert algorithm.AlgorithmName == "napari-kits" and "tiny.kseg" in str(algorithm.AlgorithmParameters)
    assert seg.ContentCreatorName == "" and "ContentCreatorName" in seg  # type 2: present, if empty
    assert all(len(s.RecommendedDisplayCIELabValue) == 3 for s in seg.SegmentSequence)  # the plugin's colours
    # No tumor found: no tumor segment (one declared without frames stalls some viewers); no kidney
    # but tumor (a person's drawing): the tumor is segment 1.
    kidney_only = write_dicom_seg(np.minimum(labels, 1), volume.source, tmp_path / "SE3", tmp_path / "k.dcm")
    assert [s.SegmentLabel for s in pydicom.dcmread(kidney_only).SegmentSequence] == ["kidney"]
    assert pydicom.dcmread(kidney_only).SeriesDescription == "kidney (napari-kits)"
    np.testing.assert_array_equal(read_seg_labels(kidney_only, files), np.minimum(expected, 1))
    tumor_only = write_dicom_seg(np.where(labels == 2, 2, 0).astype(np.uint8), volume.source, tmp_path / "SE3",
                                 tmp_path / "t.dcm", algorithm_type="manual")
    assert [(s.SegmentNumber, s.SegmentLabel) for s in pydicom.dcmread(tumor_only).SegmentSequence] == [
        (1, "kidney tumor")]
    np.testing.assert_array_equal(read_seg_labels(tumor_only, files), np.where(expected == 2, 2, 0))
    # A SEG saved into the series' folder is no slice of it: the series reads and is named as before,
    # and a folder of SEGs is no series to segment.
    shutil.copy(out, tmp_path / "SE3" / "SEG0001")
    np.testing.assert_array_equal(read_ct(tmp_path / "SE3").array, volume.array)
    assert [c.name for c in discover_inputs(files[2])] == ["SE3"]
    (tmp_path / "results").mkdir()
    shutil.copy(out, tmp_path / "results" / "SE3_labels.dcm")
    assert [c.name for c in discover_inputs(tmp_path)] == ["SE3"]
    # Nothing found is a SEG too (of empty frames), and a person's own labels name no algorithm.
    empty = write_dicom_seg(np.zeros_like(labels), volume.source, files[0], tmp_path / "empty.dcm",
                            algorithm_type="manual")
    assert not read_seg_labels(empty, files).any()
    assert pydicom.dcmread(empty).SegmentSequence[0].SegmentAlgorithmType == "MANUAL"


def test_a_seg_is_refused_where_it_could_not_overlay_its_series_and_nothing_is_replaced(tmp_path, monkeypatch):
    from kitseg.dicom_seg import write_dicom_seg

    hu = _ct((6, 9, 11))
    files = write_series(tmp_path / "SE3", hu)
    named = files[0].rename(files[0].with_name(files[0].name + ".dcm"))  # as many exporters name them
    volume = read_ct(tmp_path / "SE3")
    labels = _labels_on(volume)
    other = read_ct(write_series(tmp_path / "SE4", _ct((7, 9, 11)), series_uid="1.2.826.0.1.4")[0])
    with pytest.raises(InputError, match=r"the labels: shape \(11, 9, 6\) differs from the series .*SE4's \(11, 9, 7\); a SEG holds labels of its own series only: .*out.dcm not written"):
        write_dicom_seg(labels, volume.source, tmp_path / "SE4", tmp_path / "out.dcm")
    with pytest.raises(InputError, match=r"the labels: holds label 3; a SEG of napari-kits holds kidney \(1\)"):
        write_dicom_seg(np.where(labels == 2, 3, labels).astype(np.uint8), volume.source, tmp_path / "SE3",
                        tmp_path / "out.dcm")
    with pytest.raises(InputError, match=r"out.nii.gz: a DICOM SEG file name must end in .dcm"):
        write_dicom_seg(labels, volume.source, tmp_path / "SE3", tmp_path / "out.nii.gz")
    with pytest.raises(InputError, match=r"\.dcm: is a DICOM CT, not a SEG; choose another name"):
        write_dicom_seg(labels, volume.source, tmp_path / "SE3", named, overwrite=True)
    (tmp_path / "taken.dcm").write_bytes(b"the user's")
    with pytest.raises(FileExistsError, match="taken.dcm: exists already"):
        write_dicom_seg(labels, volume.source, tmp_path / "SE3", tmp_path / "taken.dcm")
    assert (tmp_path / "taken.dcm").read_bytes() == b"the user's"
    # A scout or report beside the series is not replaced, even asked to.
    scout = tmp_path / "SE4" / "scout.dcm"
    shutil.copy(write_series(tmp_path / "scouts", hu[:1], image_type=("ORIGINAL", "PRIMARY", "LOCALIZER"))[0], scout)
    with pytest.raises(InputError, match=r"scout.dcm: is a DICOM CT, not a SEG; choose another name"):
        write_dicom_seg(labels, volume.source, tmp_path / "SE3", scout, overwrite=True)
    # Headers a SEG could not reference, or reference ambiguously: refused, naming the file or folder.
    write_series(tmp_path / "anon", hu, study_uid=None)
    with pytest.raises(InputError, match=r"has no StudyInstanceUID \(an anonymiser removed it\?\), which a DICOM SEG "
                                         r"must reference"):
        write_dicom_seg(labels, read_ct(tmp_path / "anon").source, tmp_path / "anon", tmp_path / "out.dcm")
    mixed = write_series(tmp_path / "mixed", hu)
    ds = pydicom.dcmread(mixed[0])
    ds.FrameOfReferenceUID = "1.2.826.0.1.999"
    ds.save_as(mixed[0])
    with pytest.raises(InputError, match=r"mixed: its slices name 2 different FrameOfReferenceUIDs"):
        write_dicom_seg(labels, read_ct(tmp_path / "mixed").source, tmp_path / "mixed", tmp_path / "out.dcm")
    twins = write_series(tmp_path / "twins", hu)
    ds = pydicom.dcmread(twins[1])
    ds.SOPInstanceUID = pydicom.dcmread(twins[0]).SOPInstanceUID
    ds.save_as(twins[1])
    with pytest.raises(InputError, match=r"twins: two of its slices share a SOPInstanceUID"):
        write_dicom_seg(labels, read_ct(tmp_path / "twins").source, tmp_path / "twins", tmp_path / "out.dcm")
    import highdicom

    def refuse(*args, **kwargs):
        raise ValueError("Unable to convert '2026-12-07' to 'DA' object")

    monkeypatch.setattr(highdicom.seg, "Segmentation", refuse)
    with pytest.raises(InputError, match=r"SE3: its headers cannot make a DICOM SEG \(Unable to convert"):
        write_dicom_seg(labels, volume.source, tmp_path / "SE3", tmp_path / "out.dcm")
    monkeypatch.undo()
    assert not (tmp_path / "out.dcm").exists() and other.shape != volume.shape
    assert sorted(p.name for p in tmp_path.iterdir()) == ["SE3", "SE4", "anon", "mixed", "scouts", "taken.dcm",
                                                          "twins"]  # no temporary left


def test_predict_dicom_seg_and_the_dicom_seg_command(tmp_path, tiny_bundle, capsys, caplog):
    from kitseg.checkpoint import save_bundle
    from kitseg.cli import main

    weights = save_bundle(tiny_bundle, tmp_path / "tiny.kseg")
    hu = _ct((8, 24, 20), seed=2)
    study = tmp_path / "study"
    files = write_series(study / "SE2", hu, along_row=_oblique()[0], down_column=_oblique()[1])
    write_series(study / "SE3", hu[:, ::-1], series_uid="1.2.826.0.1.3")
    out = tmp_path / "out"
    assert main(["predict", str(study), "-o", str(out), "--weights", str(weights), "--dicom-seg"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["SE2_labels.dcm", "SE2_labels.nii.gz", "SE3_labels.dcm",
                                                     "SE3_labels.nii.gz"]
    written = nib.load(out / "SE2_labels.nii.gz")
    labels, labels_affine = np.asarray(written.dataobj), written.affine
    np.testing.assert_array_equal(read_seg_labels(out / "SE2_labels.dcm", files), labels.transpose(2, 1, 0))
    assert pydicom.dcmread(out / "SE2_labels.dcm").SegmentSequence[0].SegmentAlgorithmType == "AUTOMATIC"
    # Done: nothing to redo; another series' SEG of the same name is not taken for this one's.
    assert main(["predict", str(study), "-o", str(out), "--weights", str(weights), "--dicom-seg",
                 "--skip-existing"]) == 0
    assert "nothing to do" in capsys.readouterr().out
    # A SEG added to a finished run: made from the kept labels, without segmenting again; whether a person
    # corrected them is not known, so semiautomatic. With a map missing too, the case is segmented again, and
    # its SEG is automatic where the kept labels are the model's.
    (out / "SE2_labels.dcm").unlink()
    assert main(["predict", str(study), "-o", str(out), "--weights", str(tmp_path / "gone.kseg"), "--dicom-seg",
                 "--skip-existing"]) == 0  # no model needed, nor loaded
    assert "SE2: SE2_labels.dcm from the kept SE2_labels.nii.gz, not segmented again" in capsys.readouterr().out
    assert pydicom.dcmread(out / "SE2_labels.dcm").SegmentSequence[0].SegmentAlgorithmType == "SEMIAUTOMATIC"
    # Saved back by another tool in another axis order (ITK-SNAP): the same voxels, still this series' labels.
    kept = nib.load(out / "SE2_labels.nii.gz")
    flipped_affine = kept.affine.copy()
    flipped_affine[:3, 3] += flipped_affine[:3, 1] * (kept.shape[1] - 1)
    flipped_affine[:3, 1] *= -1
    nib.save(nib.Nifti1Image(np.ascontiguousarray(np.asarray(kept.dataobj)[:, ::-1]), flipped_affine),
             str(out / "SE2_labels.nii.gz"))
    (out / "SE2_labels.dcm").unlink()
    assert main(["predict", str(study), "-o", str(out), "--weights", str(weights), "--dicom-seg",
                 "--skip-existing"]) == 0
    np.testing.assert_array_equal(read_seg_labels(out / "SE2_labels.dcm", files), labels.transpose(2, 1, 0))
    (out / "SE2_labels.dcm").unlink()
    assert main(["predict", str(study / "SE2"), "-o", str(out), "--weights", str(weights), "--dicom-seg",
                 "--skip-existing", "--save-intermediates"]) == 0
    assert sorted(p.name for p in out.iterdir() if p.name.startswith("SE2")) == [
        "SE2_labels.dcm", "SE2_labels.nii.gz", "SE2_mask.nii.gz", "SE2_probs.nii.gz", "SE2_y1.nii.gz"]
    assert pydicom.dcmread(out / "SE2_labels.dcm").SegmentSequence[0].SegmentAlgorithmType == "AUTOMATIC"
    # A SEG added to labels corrected since: the SEG holds the corrections, not a new segmentation's.
    corrected_labels = labels.copy()
    corrected_labels[2:5, 3:9, 1:3] = 2
    nib.save(nib.Nifti1Image(corrected_labels, nib.load(out / "SE3_labels.nii.gz").affine), str(out / "SE3_labels.nii.gz"))
    (out / "SE3_labels.dcm").unlink()
    assert main(["predict", str(study), "-o", str(out), "--weights", str(weights), "--dicom-seg",
                 "--skip-existing"]) == 0
    seg3 = read_seg_labels(out / "SE3_labels.dcm", list((study / "SE3").iterdir()))
    np.testing.assert_array_equal(seg3, corrected_labels.transpose(2, 1, 0))
    assert pydicom.dcmread(out / "SE3_labels.dcm").SegmentSequence[0].SegmentAlgorithmType == "SEMIAUTOMATIC"
    shutil.copy(out / "SE3_labels.dcm", out / "SE2_labels.dcm")
    assert main(["predict", str(study / "SE2"), "-o", str(out), "--weights", str(weights), "--dicom-seg",
                 "--skip-existing"]) == 2
    assert "SE2_labels.dcm: exists, and references another series than" in capsys.readouterr().err
    # A series whose headers a SEG cannot reference, and NIfTI inputs: said before any work.
    write_series(tmp_path / "anon", hu, study_uid=None)
    assert main(["predict", str(tmp_path / "anon"), "-o", str(tmp_path / "out2"), "--dicom-seg"]) == 2
    assert "has no StudyInstanceUID" in capsys.readouterr().err and not (tmp_path / "out2").exists()
    nib.save(nib.Nifti1Image(hu.transpose(2, 1, 0), np.diag([0.7, 0.8, 2.5, 1.0])), str(tmp_path / "scan.nii.gz"))
    assert main(["predict", str(tmp_path / "scan.nii.gz"), "-o", str(tmp_path / "out2"), "--dicom-seg"]) == 2
    assert "--dicom-seg: " in capsys.readouterr().err and not (tmp_path / "out2").exists()
    # Labels corrected afterwards: converted beside themselves, recorded as a person's correction.
    corrected = tmp_path / "SE2_labels_edited.nii.gz"
    edited = labels.copy()
    edited[3:6, 4:9, 2:4] = 2
    nib.save(nib.Nifti1Image(edited, labels_affine), str(corrected))
    assert main(["dicom-seg", str(corrected), str(files[3])]) == 0
    seg_path = tmp_path / "SE2_labels_edited.dcm"
    np.testing.assert_array_equal(read_seg_labels(seg_path, files), edited.transpose(2, 1, 0))
    assert pydicom.dcmread(seg_path).SegmentSequence[1].SegmentAlgorithmType == "SEMIAUTOMATIC"
    assert main(["dicom-seg", str(corrected), str(study / "SE2")]) == 2
    assert "SE2_labels_edited.dcm: exists already (pass overwrite=True / --overwrite" in capsys.readouterr().err
    # The same labels stored in another axis order (as ITK-SNAP may save them) overlay the series: taken.
    affine = nib.load(corrected).affine.copy()
    flipped = edited[:, ::-1]
    affine[:3, 3] += affine[:3, 1] * (edited.shape[1] - 1)
    affine[:3, 1] *= -1
    nib.save(nib.Nifti1Image(np.ascontiguousarray(flipped), affine), str(tmp_path / "flipped.nii.gz"))
    assert main(["dicom-seg", str(tmp_path / "flipped.nii.gz"), str(study / "SE2")]) == 0
    np.testing.assert_array_equal(read_seg_labels(tmp_path / "flipped.dcm", files), edited.transpose(2, 1, 0))
    # Labels of another series: refused, naming the labels file.
    assert main(["dicom-seg", str(out / "SE3_labels.nii.gz"), str(study / "SE2"), "-o", str(tmp_path / "x.dcm")]) == 2
    assert "SE3_labels.nii.gz: lies 13.14 voxels off the series" in capsys.readouterr().err
    assert not (tmp_path / "x.dcm").exists()
    # Labels on another tool's grid of the series, a few µm off (dcm2niix's affine from the first and last
    # positions where they are rounded), cover the same voxels: taken; half a voxel off, they do not.
    for shift_mm, name, status in ((0.003, "dcm2niix_grid", 0), (0.25, "half_voxel_off", 2)):
        shifted = nib.load(corrected).affine.copy()
        shifted[:3, 3] += shift_mm
        nib.save(nib.Nifti1Image(edited, shifted), str(tmp_path / f"{name}.nii.gz"))
        assert main(["dicom-seg", str(tmp_path / f"{name}.nii.gz"), str(study / "SE2")]) == status
    assert "half_voxel_off.nii.gz: lies 0.49 voxels off the series" in capsys.readouterr().err
    # The series named wrong: said so.
    assert main(["dicom-seg", str(corrected), str(tmp_path / "nope"), "-o", str(tmp_path / "y.dcm")]) == 2
    assert "nope: no such file or folder" in capsys.readouterr().err
    assert main(["dicom-seg", str(corrected), str(study), "-o", str(tmp_path / "y.dcm")]) == 2
    assert "study: holds series folders (SE2, SE3), not a series: give one of them" in capsys.readouterr().err
    assert main(["dicom-seg", str(corrected), str(tmp_path / "scan.nii.gz"), "-o", str(tmp_path / "y.dcm")]) == 2
    assert "scan.nii.gz: is no DICOM series (its folder, or one of its files)" in capsys.readouterr().err
    # Labels replaced without --dicom-seg: the SEG beside them, which a PACS would be sent, is said to be stale.
    with caplog.at_level("WARNING"):
        assert main(["predict", str(study / "SE3"), "-o", str(out), "--weights", str(weights), "--overwrite"]) == 0
    assert "1 DICOM SEG(s) of an earlier run stay as they were and will not match the new labels (SE3_labels.dcm)" in (
        caplog.text)


def test_predict_dicom_seg_says_before_the_work_what_it_cannot_write(tmp_path, tiny_bundle, capsys, caplog):
    """A study with one series stripped of its study UID: the others get their SEG, that one its
    NIfTI only. A CT slice where the SEG would go, or kept labels a SEG cannot hold: refused before
    any segmentation, nothing replaced."""
    from kitseg.checkpoint import save_bundle
    from kitseg.cli import main

    weights = save_bundle(tiny_bundle, tmp_path / "tiny.kseg")
    hu = _ct((8, 24, 20), seed=2)
    study = tmp_path / "study"
    slices = write_series(study / "SE2", hu)
    write_series(study / "SE7", hu[:, ::-1], series_uid="1.2.826.0.1.7", study_uid=None)
    out = tmp_path / "out"
    with caplog.at_level("WARNING"):
        assert main(["predict", str(study), "-o", str(out), "--weights", str(weights), "--dicom-seg"]) == 0
    assert "has no StudyInstanceUID" in caplog.text and "its labels are written as NIfTI only" in caplog.text
    assert sorted(p.name for p in out.iterdir()) == ["SE2_labels.dcm", "SE2_labels.nii.gz", "SE7_labels.nii.gz"]
    # Only series a SEG cannot reference: --dicom-seg cannot be done at all; an error, before the work.
    assert main(["predict", str(study / "SE7"), "-o", str(tmp_path / "out7"), "--weights", str(weights),
                 "--dicom-seg"]) == 2
    assert "has no StudyInstanceUID" in capsys.readouterr().err and not (tmp_path / "out7").exists()
    # A folder where the SEG would go: said, as for any output.
    (tmp_path / "out8" / "SE2_labels.dcm").mkdir(parents=True)
    assert main(["predict", str(study / "SE2"), "-o", str(tmp_path / "out8"), "--weights", str(weights),
                 "--dicom-seg"]) == 2
    assert "SE2_labels.dcm: is a folder, where an output file would go" in capsys.readouterr().err
    # Done is done: the SEG SE7 cannot have is not waited for.
    assert main(["predict", str(study), "-o", str(out), "--weights", str(weights), "--dicom-seg",
                 "--skip-existing"]) == 0
    assert "nothing to do" in capsys.readouterr().out
    # A CT slice copied where the SEG goes: refused before the work, even with --overwrite.
    shutil.copy(slices[0], out / "SE2_labels.dcm")
    stamp = (out / "SE2_labels.nii.gz").stat().st_mtime_ns
    assert main(["predict", str(study / "SE2"), "-o", str(out), "--weights", str(weights), "--dicom-seg",
                 "--overwrite"]) == 2
    assert "SE2_labels.dcm: is a DICOM CT, not a SEG; choose another name" in capsys.readouterr().err
    assert (out / "SE2_labels.nii.gz").stat().st_mtime_ns == stamp
    # Kept labels painted with a cyst (3): their SEG could not hold it; said before the work, naming the file.
    (out / "SE2_labels.dcm").unlink()
    kept = nib.load(out / "SE2_labels.nii.gz")
    painted = np.asarray(kept.dataobj).copy()
    painted[0, 0, 0] = 3
    nib.save(nib.Nifti1Image(painted, kept.affine), str(out / "SE2_labels.nii.gz"))
    assert main(["predict", str(study / "SE2"), "-o", str(out), "--weights", str(weights), "--dicom-seg",
                 "--skip-existing"]) == 2
    assert "SE2_labels.nii.gz: holds label 3, which a DICOM SEG of kidney (1) and tumor (2) cannot" in (
        capsys.readouterr().err)
    assert not (out / "SE2_labels.dcm").exists()


def test_what_anonymisers_and_scanners_leave_in_headers_still_makes_a_seg(tmp_path, caplog):
    """No SliceThickness, SOP UIDs blanked in the data set (kept in the file meta), orientations that
    differ in the sixth decimal, a malformed patient sex: the SEG is written, each frame on its slice."""
    from kitseg.dicom_seg import write_dicom_seg

    files = write_series(tmp_path / "SE8", _ct((6, 9, 11)), along_row=_oblique()[0], down_column=_oblique()[1])
    for k, path in enumerate(files):
        ds = pydicom.dcmread(path)
        del ds.SliceThickness
        ds.SOPInstanceUID = ""
        ds.PatientSex = "male"  # DICOM allows M, F, O
        ds.StudyDate = "2026.12.07"  # the retired form, which a SEG may not carry
        ds.SeriesNumber = 2147483000  # plus 1000, beyond IS's range
        ds.ImageOrientationPatient = [float(v) + (1e-6 if k % 2 else 0.0) for v in ds.ImageOrientationPatient]
        ds.save_as(path)
    volume = read_ct(tmp_path / "SE8")
    labels = _labels_on(volume)
    with caplog.at_level("WARNING"):
        out = write_dicom_seg(labels, volume.source, tmp_path / "SE8", tmp_path / "SE8_labels.dcm")
    said = [r.getMessage() for r in caplog.records if "malformed" in r.getMessage()]
    assert len(said) == 1 and "SE8: malformed PatientSex ('male'), StudyDate ('2026.12.07')" in said[0], said
    np.testing.assert_array_equal(read_seg_labels(out, files), volume.source.to_source(labels).transpose(2, 1, 0))
    seg = pydicom.dcmread(out)
    assert seg.SeriesNumber == 1000 and seg.StudyDate == ""
    assert seg.PatientSex == "" and float(seg.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0]
                                          .SliceThickness) == pytest.approx(2.5)


@requires(REAL_SERIES)
def test_a_seg_of_a_real_jpeg2000_series_lands_on_its_voxels(tmp_path):
    """The real series was anonymised down to blank study and series UIDs: refused, saying why.
    Given them, its SEG read by highdicom puts every labelled voxel where the NIfTI has it."""
    import highdicom

    from kitseg.dicom_seg import write_dicom_seg

    volume = read_ct(REAL_SERIES)
    labels = np.zeros(volume.shape, np.uint8)
    labels[5:9, 200:260, 300:340] = 1
    labels[6, 220:230, 310:320] = 2
    with pytest.raises(InputError, match=r"has no StudyInstanceUID or SeriesInstanceUID \(an anonymiser removed it\?\)"):
        write_dicom_seg(labels, volume.source, REAL_SERIES, tmp_path / "real.dcm")
    series = tmp_path / "series"
    series.mkdir()
    for path in REAL_SERIES.iterdir():
        if path.is_file() and not path.name.startswith(("LICENSE", ".")):
            ds = pydicom.dcmread(path)
            ds.StudyInstanceUID, ds.SeriesInstanceUID = "1.2.826.0.1.77", "1.2.826.0.1.78"
            ds.save_as(series / path.name)  # the JPEG 2000 pixels as they were
    volume = read_ct(series)
    out = write_dicom_seg(labels, volume.source, series, tmp_path / "real.dcm")
    seg = highdicom.seg.segread(out).get_volume(combine_segments=True, skip_overlap_checks=True)
    marked = np.argwhere(seg.array > 0)  # (slice, row, column) of the SEG's own volume, LPS affine
    ras = np.diag([-1.0, -1.0, 1.0, 1.0]) @ seg.affine @ np.c_[marked, np.ones(len(marked))].T
    voxels = np.linalg.inv(volume.affine) @ ras
    np.testing.assert_allclose(voxels[:3], np.round(voxels[:3]), atol=1e-6)
    index = tuple(np.round(voxels[:3]).astype(int))
    np.testing.assert_array_equal(labels[index], seg.array[seg.array > 0])
    assert len(marked) == np.count_nonzero(labels)


# ---------------------------------------------------------------------------- reading a SEG
def _foreign_seg(path, series_files, kidney: np.ndarray | None, mass: np.ndarray, liver: np.ndarray | None = None,
                 fractional: bool = False, mass_region: str = "64033007"):
    """A SEG as another tool writes one, with highdicom: its own segment order and codes (a left
    kidney, a mass in the kidney, maybe a liver), the kidney drawn under the mass, the source
    slices given in reverse order; arrays as (slice, row, column) in position order; no kidney
    segment where ``kidney`` is None."""
    import highdicom as hd
    from pydicom.sr.coding import Code
    from pydicom.sr.codedict import codes

    slices = sorted((pydicom.dcmread(p) for p in series_files), key=lambda ds: float(
        np.dot(np.cross(*np.reshape(ds.ImageOrientationPatient, (2, 3))), ds.ImagePositionPatient)))
    for ds in slices:  # type 2 attributes the test series leaves out, which highdicom copies
        for keyword in ("PatientBirthDate", "PatientSex", "AccessionNumber", "StudyID", "StudyTime",
                        "ReferringPhysicianName"):
            setattr(ds, keyword, getattr(ds, keyword, None))
    manual = {"algorithm_type": hd.seg.SegmentAlgorithmTypeValues.MANUAL}
    kinds = [("Left kidney", codes.cid7150.AnatomicalStructure, Code("18639004", "SCT", "Left kidney"), None, kidney),
             ("lesion 1", codes.cid7150.MorphologicallyAbnormalStructure, codes.SCT.Mass,
              [Code(mass_region, "SCT", "region")], mass)][kidney is None:]
    if liver is not None:
        kinds.insert(0, ("Liver", codes.cid7150.AnatomicalStructure, codes.SCT.Liver, None, liver))
    descriptions = [hd.seg.SegmentDescription(segment_number=n, segment_label=label, segmented_property_category=cat,
                                              segmented_property_type=kind, anatomic_regions=region, **manual)
                    for n, (label, cat, kind, region, _) in enumerate(kinds, start=1)]
    stack = np.stack([k[4] for k in kinds], axis=-1)[::-1]  # the slices given in reverse
    # Fractional: 0.8 inside, and 0.4 on the row below each labelled pixel, which is under half.
    pixels = stack.astype(np.float32) * 0.8 + 0.4 * (np.roll(stack, 1, axis=1) & ~stack) if fractional else stack
    seg = hd.seg.Segmentation(
        source_images=slices[::-1], pixel_array=pixels if fractional else pixels.astype(np.uint8),
        segmentation_type=hd.seg.SegmentationTypeValues.FRACTIONAL if fractional
        else hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions, series_instance_uid=hd.UID(), series_number=300,
        sop_instance_uid=hd.UID(), instance_number=1, manufacturer="Another tool", manufacturer_model_name="x",
        software_versions="1", device_serial_number="1")
    seg.save_as(path)
    return path


def test_a_seg_reads_back_on_its_series_grid_as_the_labels_it_was_written_from(tmp_path):
    """Whatever the labels (a few voxels on one slice, none, both classes across slices), the SEG
    reads back as them, on the grid the series reads on, its series found beside it."""
    from kitseg.dicom_seg import read_dicom_seg, write_dicom_seg
    from kitseg.io import check_same_grid

    study = tmp_path / "study"
    write_series(study / "SE3", _ct((6, 9, 11)), along_row=_oblique()[0], down_column=_oblique()[1])
    volume = read_ct(study / "SE3")
    one_slice = np.zeros(volume.shape, np.uint8)
    one_slice[:, 3, 4] = 1  # one pixel on each slice of the internal first axis: one SEG frame or a few
    one_slice[0, 0, 0] = 2
    rng = np.random.default_rng(1)
    speckled = (rng.integers(0, 3, volume.shape) * (rng.random(volume.shape) < 0.3)).astype(np.uint8)
    for where, labels in ((study / "SE3_labels.dcm", _labels_on(volume)), (study / "out" / "a.dcm", one_slice),
                          (tmp_path / "elsewhere" / "b.dcm", speckled), (study / "c.dcm", np.zeros_like(one_slice))):
        written = write_dicom_seg(labels, volume.source, study / "SE3", where)
        series = None if where.parent != tmp_path / "elsewhere" else study / "SE3"  # far from it: given
        seg = read_dicom_seg(written, series)
        np.testing.assert_array_equal(seg.labels.array, labels)
        check_same_grid(seg.labels.source, volume.source, written)
        assert seg.series == study / "SE3" and seg.automatic and seg.ignored == ()


def test_another_tools_seg_reads_by_its_codes_with_tumor_over_kidney(tmp_path, caplog):
    """Another tool's SEG (segments in its own order and codes, slices in reverse, a liver too)
    reads as KiTS19 labels: a left kidney is kidney, a mass in the kidney tumor, over the kidney
    drawn beneath it; the liver is left out, said; a fractional SEG reads where it is half or more."""
    from kitseg.dicom_seg import read_dicom_seg

    files = write_series(tmp_path / "export", _ct((5, 8, 10)))  # a PACS export: the SEG in the series' folder
    volume = read_ct(tmp_path / "export")
    kidney = np.zeros((5, 8, 10), bool)
    kidney[1:4, 2:6, 2:8] = True
    mass = np.zeros_like(kidney)
    mass[2, 3:5, 3:5] = True
    liver = np.zeros_like(kidney)
    liver[0:2, 0:2, 0:3] = True
    expected = np.where(mass, 2, np.where(kidney, 1, 0)).astype(np.uint8)  # (slice, row, column)
    for fractional in (False, True):
        seg_path = _foreign_seg(tmp_path / "export" / f"SEG{int(fractional)}.dcm", files, kidney, mass, liver,
                                fractional=fractional)
        seg = read_dicom_seg(seg_path)
        np.testing.assert_array_equal(volume.source.to_source(seg.labels.array).transpose(2, 1, 0), expected)
        assert not seg.automatic and seg.ignored == ("'Liver' (SCT 10200004)",)
    assert "'Liver' (SCT 10200004) are neither kidney nor kidney tumor; left out" in caplog.text
    # A mass of another organ is no kidney tumor: with nothing else, nothing to read.
    liver_mass = _foreign_seg(tmp_path / "export" / "liver_mass.dcm", files, None, mass,
                              mass_region="10200004")
    with pytest.raises(InputError, match=r"liver_mass.dcm: holds no kidney or kidney tumor segment \(it holds "
                                         r"'lesion 1' \(SCT 4147007\)\)"):
        read_dicom_seg(liver_mass)


def test_a_seg_is_read_on_its_own_series_only(tmp_path):
    """A SEG given another series, one whose series is nowhere near, one of other voxel sizes, or a
    file that is no SEG: refused, naming the file and what is wrong."""
    from kitseg.dicom_seg import read_dicom_seg, write_dicom_seg

    write_series(tmp_path / "study" / "SE3", _ct())
    write_series(tmp_path / "study" / "SE4", _ct(), series_uid="1.2.826.0.1.4")
    volume = read_ct(tmp_path / "study" / "SE3")
    seg = write_dicom_seg(_labels_on(volume), volume.source, tmp_path / "study" / "SE3", tmp_path / "study" / "x.dcm")
    with pytest.raises(InputError, match=r"x.dcm: segments the series 1.2.826.0.1.1, not .*SE4 \(series 1.2.826.0.1.4\)"):
        read_dicom_seg(seg, tmp_path / "study" / "SE4")
    far = tmp_path / "a" / "b" / "c"
    far.mkdir(parents=True)
    shutil.copy(seg, far / "x.dcm")
    with pytest.raises(InputError, match=r"c/x.dcm: segments the series 1.2.826.0.1.1, found in none of .*put the SEG "
                                         r"beside its series"):
        read_dicom_seg(far / "x.dcm")
    assert read_dicom_seg(far / "x.dcm", near=[tmp_path / "study" / "SE3"]).labels.array.any()  # a CT open in napari
    # A study exported flat beside the SEG, another series' slices named first: every file is looked at.
    flat = tmp_path / "flat"
    flat.mkdir()
    for prefix, series in (("a", "SE4"), ("b", "SE3")):
        for file in (tmp_path / "study" / series).iterdir():
            shutil.copy(file, flat / f"{prefix}_{file.name}")
    (tmp_path / "results").mkdir()
    shutil.copy(seg, tmp_path / "results" / "x.dcm")
    assert read_dicom_seg(tmp_path / "results" / "x.dcm").series.parent == flat  # one file names its series
    (flat / "results").mkdir()  # the SEG in a folder of the flat study itself
    shutil.copy(seg, flat / "results" / "x.dcm")
    assert read_dicom_seg(flat / "results" / "x.dcm").series.parent == flat
    # A stray slice of the series copied beside the SEG: passed over for the series further away;
    # alone, it is named as what was found.
    stray = tmp_path / "study" / "results"
    stray.mkdir()
    shutil.copy(seg, stray / "x.dcm")
    shutil.copy(next((tmp_path / "study" / "SE3").iterdir()), stray / "slice")
    assert read_dicom_seg(stray / "x.dcm").series == tmp_path / "study" / "SE3"
    shutil.copy(stray / "slice", far / "slice")
    with pytest.raises(InputError, match=r"c/x.dcm: its series 1.2.826.0.1.1 was found, but not as a volume: .*c: holds "
                                         "one slice"):
        read_dicom_seg(far / "x.dcm")
    # Pixels twice as many, or as many and half the size (placed by position, highdicom would read
    # every other slice's frames), or half a pixel aside (another reconstruction): refused.
    big = write_series(tmp_path / "big", _ct((6, 18, 22)), pixel_mm=(0.4, 0.35))
    big_volume = read_ct(tmp_path / "big")
    big_seg = write_dicom_seg(_labels_on(big_volume), big_volume.source, big[0], tmp_path / "big.dcm")
    with pytest.raises(InputError, match=r"big.dcm: its frames are 18 x 22 pixels, the slices of .*SE3 9 x 11; a SEG "
                                         "is read on its series' own grid only"):
        read_dicom_seg(big_seg, tmp_path / "study" / "SE3")
    for name, series, refusal in (
            ("fine", dict(pixel_mm=(0.4, 0.35), step_mm=1.25), r"its voxels .* are not those of .*SE3 "),
            ("aside", dict(first=(-119.6, -80.0, 300.0)), r"its frames are not on the grid of .*SE3 \(.*\); ")):
        other = write_series(tmp_path / name, _ct(), **series)  # the same series UID as SE3's
        other_volume = read_ct(tmp_path / name)
        unplaced = _without_frame_sources(write_dicom_seg(_labels_on(other_volume), other_volume.source, other[0],
                                                          tmp_path / f"{name}.dcm"), tmp_path / f"{name}_unplaced.dcm")
        with pytest.raises(InputError, match=rf"{name}_unplaced.dcm: {refusal}.*a SEG is read on its series' own grid"):
            read_dicom_seg(unplaced, tmp_path / "study" / "SE3")
    # A partial copy of the series, two slices short of those the SEG's frames were made on.
    partial = tmp_path / "partial" / "SE3"
    shutil.copytree(tmp_path / "study" / "SE3", partial)
    volume_files = sorted(partial.iterdir(), key=lambda f: float(pydicom.dcmread(f).ImagePositionPatient[2]))
    for f in volume_files[-2:]:
        f.unlink()
    with pytest.raises(InputError, match=r"x.dcm: 1 of the slices its frames lie on are not in .*partial/SE3 "
                                         r"\(a partial copy of the series\?\)"):
        read_dicom_seg(seg, partial)
    with pytest.raises(InputError, match=r"SE3.*: is no DICOM SEG"):
        read_dicom_seg(next((tmp_path / "study" / "SE3").iterdir()))


def test_the_dicom_seg_command_and_evaluate_read_a_seg(tmp_path, capsys, caplog, monkeypatch):
    """``kits-seg dicom-seg SEG`` writes its labels as NIfTI on the series' grid, never over a file
    unasked; ``kits-seg evaluate`` scores a SEG as it scores the NIfTI it came from."""
    from kitseg.cli import main
    from kitseg.dicom_seg import write_dicom_seg
    from kitseg.io import read_labels, write_labels

    write_series(tmp_path / "SE3", _ct(), along_row=_oblique()[0], down_column=_oblique()[1])
    volume = read_ct(tmp_path / "SE3")
    labels = _labels_on(volume)
    seg = write_dicom_seg(labels, volume.source, tmp_path / "SE3", tmp_path / "SE3_labels.dcm")
    assert main(["dicom-seg", str(seg)]) == 0
    assert f"wrote {tmp_path / 'SE3_labels.nii.gz'}" in capsys.readouterr().out
    np.testing.assert_array_equal(read_labels(tmp_path / "SE3_labels.nii.gz", like=volume).array, labels)
    before = (tmp_path / "SE3_labels.nii.gz").read_bytes()
    assert main(["dicom-seg", str(seg)]) == 2
    assert "SE3_labels.nii.gz exists already; pass --overwrite" in capsys.readouterr().err
    assert (tmp_path / "SE3_labels.nii.gz").read_bytes() == before
    assert main(["dicom-seg", str(seg), "-o", str(tmp_path / "x.dcm")]) == 2
    assert "name the output .nii.gz" in capsys.readouterr().err
    assert main(["dicom-seg", str(tmp_path / "SE3_labels.nii.gz")]) == 2
    assert "give the DICOM series the labels were made on" in capsys.readouterr().err
    # Scored as a prediction, and as the reference.
    reference = labels.copy()
    reference[labels == 2] = 1
    write_labels(reference, volume.source, tmp_path / "reference.nii.gz")
    assert main(["evaluate", "--pred", str(seg), "--gt", str(tmp_path / "reference.nii.gz")]) == 0
    row = capsys.readouterr().out.splitlines()[1].split()
    assert row[1:3] == ["1.0000", "0.0000"]  # the same kidney region; tumor where the reference has none
    assert main(["evaluate", "--pred", str(tmp_path / "SE3_labels.nii.gz"), "--gt", str(seg)]) == 0
    assert capsys.readouterr().out.splitlines()[1].split()[1:3] == ["1.0000", "1.0000"]
    # A SEG is read as kidney and tumor by its codes: another tool's label mapping is not applied to it.
    assert main(["evaluate", "--pred", str(tmp_path / "SE3_labels.nii.gz"), "--gt", str(seg),
                 "--map-gt-labels", "2=1", "3=1", "*=0"]) == 0
    assert capsys.readouterr().out.splitlines()[1].split()[1] == "1.0000"
    assert "SE3_labels.dcm: DICOM SEG, read as kidney and tumor by their segments' codes; the label mapping is not " \
           "applied to them" in caplog.text
    assert main(["evaluate", "--pred", str(tmp_path / "SE3_labels.nii.gz"), "--gt", str(seg),
                 "--map-gt-labels", "1=1", "*=0"]) == 0  # maps nothing to tumor: a SEG's tumor is scored still
    assert capsys.readouterr().out.splitlines()[1].split()[1:3] == ["1.0000", "1.0000"]
    # A SEG kept apart from its series: evaluate is told where the series are (a study's folder).
    apart = tmp_path / "elsewhere" / "far"
    apart.mkdir(parents=True)
    shutil.copy(seg, apart / "SE3_labels.dcm")
    assert main(["evaluate", "--pred", str(tmp_path / "SE3_labels.nii.gz"), "--gt", str(apart / "SE3_labels.dcm")]) == 2
    assert "found in none of" in capsys.readouterr().err
    assert main(["evaluate", "--pred", str(tmp_path / "SE3_labels.nii.gz"), "--gt", str(apart / "SE3_labels.dcm"),
                 "--series", str(tmp_path)]) == 0
    assert capsys.readouterr().out.splitlines()[1].split()[1:3] == ["1.0000", "1.0000"]
    assert main(["evaluate", "--pred", str(seg), "--gt", str(seg), "--series", str(tmp_path / "none")]) == 2
    assert "--series " + str(tmp_path / "none") + ": does not exist" in capsys.readouterr().err
    # A SEG saved into its series' folder: its NIfTI goes beside the folder, where it is not taken for
    # the CT; named from within the folder too.
    in_series = shutil.copy(seg, tmp_path / "SE3" / "gt_seg.dcm")
    assert main(["dicom-seg", str(in_series)]) == 0
    assert (tmp_path / "gt_seg.nii.gz").is_file() and not (tmp_path / "SE3" / "gt_seg.nii.gz").exists()
    (tmp_path / "gt_seg.nii.gz").unlink()
    monkeypatch.chdir(tmp_path / "SE3")
    assert main(["dicom-seg", "gt_seg.dcm"]) == 0
    assert (tmp_path / "gt_seg.nii.gz").is_file() and not (tmp_path / "SE3" / "gt_seg.nii.gz").exists()
    (tmp_path / "folder.nii.gz").mkdir()
    assert main(["dicom-seg", str(seg), "-o", str(tmp_path / "folder.nii.gz")]) == 2
    assert "folder.nii.gz: is a folder; name the output file" in capsys.readouterr().err
    # A damaged (truncated) SEG: an error naming it, no traceback.
    damaged = tmp_path / "damaged.dcm"
    damaged.write_bytes(seg.read_bytes()[: seg.stat().st_size - 40])
    assert main(["dicom-seg", str(damaged), str(tmp_path / "SE3")]) == 2
    assert "damaged.dcm: " in capsys.readouterr().err


def _without_frame_sources(seg_path, out):
    """The SEG as a writer that names no source slice per frame writes it (placed by position)."""
    ds = pydicom.dcmread(seg_path)
    for groups in ds.PerFrameFunctionalGroupsSequence:
        if "DerivationImageSequence" in groups:
            del groups.DerivationImageSequence
    shared = ds.SharedFunctionalGroupsSequence[0]
    if "DerivationImageSequence" in shared:
        del shared.DerivationImageSequence
    ds.save_as(out)
    return out


def test_a_seg_lands_on_its_slices_when_scanners_round_positions_or_frames_name_no_slice(tmp_path):
    """Frames go onto the slices they were derived from, so positions written rounded (as scanners
    and anonymisers write them) do not matter; a SEG naming no source slice is placed by its
    frames' positions, a few hundredths of a voxel off allowed, and refused where labels would be lost."""
    from kitseg.dicom_seg import read_dicom_seg, write_dicom_seg

    files = write_series(tmp_path / "SE3", _ct((8, 9, 11)), along_row=_oblique()[0], down_column=_oblique()[1],
                         step_mm=0.625, decimals=1)
    volume = read_ct(tmp_path / "SE3")
    labels = _labels_on(volume)
    seg = write_dicom_seg(labels, volume.source, tmp_path / "SE3", tmp_path / "rounded.dcm")
    np.testing.assert_array_equal(read_dicom_seg(seg).labels.array, labels)
    # Placed by position: a series of 2.5 mm steps written to 0.01 mm, a SEG with gaps between its frames.
    write_series(tmp_path / "SE4", _ct(), decimals=2, series_uid="1.2.826.0.1.4")
    straight = read_ct(tmp_path / "SE4")
    gappy = np.zeros(straight.shape, np.uint8)
    gappy[..., 1], gappy[..., 4] = _labels_on(straight)[..., 2], 2 * (_labels_on(straight)[..., 3] > 0)
    gappy_seg = write_dicom_seg(gappy, straight.source, tmp_path / "SE4", tmp_path / "gappy.dcm")
    unplaced = _without_frame_sources(gappy_seg, tmp_path / "unplaced.dcm")
    assert "DerivationImageSequence" not in pydicom.dcmread(unplaced).PerFrameFunctionalGroupsSequence[0]
    np.testing.assert_array_equal(read_dicom_seg(unplaced, tmp_path / "SE4").labels.array, gappy)
    # ... and refused on a partial copy of the series, where its frames beyond would be lost.
    partial = tmp_path / "partial"
    shutil.copytree(tmp_path / "SE4", partial)
    for f in partial.iterdir():
        if float(pydicom.dcmread(f).ImagePositionPatient[2]) > 300 + 3 * 2.5 + 0.1:
            f.unlink()
    with pytest.raises(InputError, match=r"unplaced.dcm: some of its frames lie beyond .*partial"):
        read_dicom_seg(unplaced, partial)


def test_segments_are_read_by_code_as_tools_write_them(tmp_path):
    """Kidney by SNOMED code (an old SRT one too) or, coded otherwise, by label; a neoplasm naming no
    organ is the kidney's in a SEG holding kidneys, and left out of one that holds none."""
    from pydicom.dataset import Dataset

    from kitseg.dicom_seg import _kits_classes

    def segment(number, label, value=None, scheme="SCT", region=None):
        ds = Dataset()
        ds.SegmentNumber, ds.SegmentLabel = number, label
        if value is not None:
            code = Dataset()
            code.CodeValue, code.CodingSchemeDesignator, code.CodeMeaning = value, scheme, label
            ds.SegmentedPropertyTypeCodeSequence = [code]
        if region is not None:
            place = Dataset()
            place.CodeValue, place.CodingSchemeDesignator, place.CodeMeaning = region, "SCT", "region"
            ds.AnatomicRegionSequence = [place]
        return ds

    kidneys = [segment(0, "Background"), segment(1, "Kidney", "T-71000", "SRT"), segment(2, "kidney right", "9846003"),
               segment(3, "tumour", "85756007"), segment(4, "Tumor", "108369006"),
               segment(5, "liver lesion", "52988006", region="10200004")]
    assert _kits_classes(kidneys) == ({1: 1, 2: 1, 3: 2, 4: 2}, ["'liver lesion' (SCT 52988006)"])
    # A radiologist's SEG of the tumor alone, coded as the kidney's own neoplasm.
    assert _kits_classes([segment(1, "RCC", "126880001")]) == ({1: 2}, [])
    # How the segments read were made: one way, or "semiautomatic" for several ways, or an unknown one.
    from kitseg.dicom_seg import _algorithm_type

    def made(*kinds):
        segments = [segment(n, "Kidney", "64033007") for n in range(1, len(kinds) + 1)]
        for s, kind in zip(segments, kinds):
            s.SegmentAlgorithmType = kind
        return _algorithm_type(segments, {n: 1 for n in range(1, len(kinds) + 1)})

    assert (made("AUTOMATIC"), made("MANUAL", "MANUAL"), made("AUTOMATIC", "MANUAL"), made("")) == (
        "automatic", "manual", "semiautomatic", "semiautomatic")
    classes, ignored = _kits_classes([segment(1, "Tumor", "108369006"), segment(2, "Liver", "10200004")])
    assert classes == {} and ignored == ["'Liver' (SCT 10200004)",
                                         "'Tumor' (SCT 108369006) of no named organ, in a SEG holding no kidney"]


def test_a_seg_of_a_frame_of_reference_of_its_own_or_damaged(tmp_path, caplog):
    """pydicom-seg writes a frame of reference of its own and no SpatialLocationsPreserved: its frames
    name their slices, which place them (said); without them, such a SEG cannot be placed. A
    damaged file is refused, naming it."""
    from pydicom.uid import generate_uid

    from kitseg.dicom_seg import read_dicom_seg, write_dicom_seg

    write_series(tmp_path / "SE3", _ct(), along_row=_oblique()[0], down_column=_oblique()[1])
    volume = read_ct(tmp_path / "SE3")
    labels = _labels_on(volume)
    ds = pydicom.dcmread(write_dicom_seg(labels, volume.source, tmp_path / "SE3", tmp_path / "ours.dcm"))
    ds.FrameOfReferenceUID = generate_uid()
    for groups in ds.PerFrameFunctionalGroupsSequence:
        for source in groups.DerivationImageSequence[0].SourceImageSequence:
            del source.SpatialLocationsPreserved
    ds.save_as(tmp_path / "pydicom_seg_like.dcm")
    np.testing.assert_array_equal(read_dicom_seg(tmp_path / "pydicom_seg_like.dcm").labels.array, labels)
    assert "pydicom_seg_like.dcm: its frame of reference is not its series'" in caplog.text
    unplaced = _without_frame_sources(tmp_path / "pydicom_seg_like.dcm", tmp_path / "unplaced.dcm")
    with pytest.raises(InputError, match=r"unplaced.dcm: its frame of reference .* is not its series' .*its frames name "
                                         "no slices of it"):
        read_dicom_seg(unplaced)
    # Frames said to lie elsewhere than their slices (SpatialLocationsPreserved NO or REORIENTED_ONLY):
    # placed by position; in a frame of reference of their own, that is nowhere on the CT.
    for preserved in ("NO", "REORIENTED_ONLY"):
        for groups in ds.PerFrameFunctionalGroupsSequence:
            groups.DerivationImageSequence[0].SourceImageSequence[0].SpatialLocationsPreserved = preserved
        ds.save_as(tmp_path / "moved_elsewhere.dcm")
        with pytest.raises(InputError, match=r"moved_elsewhere.dcm: its frame of reference .*its frames name no slices "
                                             r"of it to lie on \(or say they were moved off them\)"):
            read_dicom_seg(tmp_path / "moved_elsewhere.dcm")
        ds.FrameOfReferenceUID = pydicom.dcmread(tmp_path / "ours.dcm").FrameOfReferenceUID
        ds.save_as(tmp_path / "moved.dcm")
        np.testing.assert_array_equal(read_dicom_seg(tmp_path / "moved.dcm").labels.array, labels)
        ds.FrameOfReferenceUID = generate_uid()
    for size in (400, (tmp_path / "ours.dcm").stat().st_size - 40):
        damaged = tmp_path / f"damaged{size}.dcm"
        damaged.write_bytes((tmp_path / "ours.dcm").read_bytes()[:size])
        with pytest.raises(InputError, match=rf"damaged{size}.dcm: "):
            read_dicom_seg(damaged, tmp_path / "SE3")
