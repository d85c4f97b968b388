"""Geometry: any orientation in, the internal (I, P, L) orientation inside, the exact grid out."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest

from kitseg.geometry import INTERNAL_AXCODES, Volume
from kitseg.io import InputError, discover_inputs, read_ct, read_labels, write_labels

from .conftest import KITS19, ORIENTATIONS, make_affine, requires


def _save(array, affine, path):
    nib.save(nib.Nifti1Image(array, affine), str(path))
    return path


@pytest.mark.parametrize("orientation", ORIENTATIONS)
def test_read_write_round_trip_keeps_grid_and_values(tmp_path, orientation):
    rng = np.random.default_rng(1)
    shape = (7, 9, 11) if orientation != "kits" else (11, 9, 7)
    array = rng.integers(0, 3, size=shape).astype(np.uint8)
    affine = make_affine(orientation)
    src = _save(array, affine, tmp_path / "ct.nii.gz")

    volume = read_ct(src)
    assert tuple(nib.aff2axcodes(volume.affine)) == INTERNAL_AXCODES or orientation == "oblique"
    # Every internal voxel sits where the same value sat in the file.
    for idx in [(0, 0, 0), (3, 4, 5), tuple(n - 1 for n in volume.shape)]:
        world = volume.affine @ np.array([*idx, 1.0])
        file_idx = np.round(np.linalg.inv(affine) @ world)[:3].astype(int)
        assert volume.array[idx] == array[tuple(file_idx)]

    out = write_labels(volume.array, volume.source, tmp_path / "labels.nii.gz")
    back = nib.load(str(out))
    assert back.shape == array.shape
    np.testing.assert_allclose(back.affine, affine, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(back.dataobj), array)
    assert back.get_data_dtype() == np.uint8


def test_internal_orientation_of_ras_file_is_slice_first(tmp_path):
    array = np.zeros((10, 12, 5), np.int16)  # x, y, z
    array[:, :, 0] = 7  # the most inferior slice in RAS
    volume = read_ct(_save(array, make_affine("ras"), tmp_path / "ct.nii.gz"))
    assert volume.shape == (5, 12, 10)
    assert np.all(volume.array[-1] == 7)  # axis 0 runs superior -> inferior
    np.testing.assert_allclose(volume.spacing, (2.5, 0.8, 0.7))


def test_ct_stays_int16_without_scaling(tmp_path):
    array = np.full((4, 5, 6), -1000, np.int16)
    volume = read_ct(_save(array, make_affine("ras"), tmp_path / "ct.nii.gz"))
    assert volume.array.dtype == np.int16


def test_writer_refuses_to_overwrite(tmp_path):
    src = _save(np.zeros((4, 5, 6), np.int16), make_affine("lps"), tmp_path / "ct.nii.gz")
    volume = read_ct(src)
    with pytest.raises(InputError, match="refusing to overwrite the input file"):
        write_labels(np.zeros(volume.shape, np.uint8), volume.source, src, overwrite=True)
    out = write_labels(np.zeros(volume.shape, np.uint8), volume.source, tmp_path / "l.nii.gz")
    with pytest.raises(FileExistsError, match="exists already"):
        write_labels(np.ones(volume.shape, np.uint8), volume.source, out)
    # A folder where the file would go: named as itself (not a temporary file), before any writing.
    (tmp_path / "d.nii.gz").mkdir()
    with pytest.raises(IsADirectoryError, match="a folder is in the way") as error:
        write_labels(np.zeros(volume.shape, np.uint8), volume.source, tmp_path / "d.nii.gz", overwrite=True)
    assert error.value.filename == str(tmp_path / "d.nii.gz")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ct.nii.gz", "d.nii.gz", "l.nii.gz"]
    assert np.asarray(nib.load(str(out)).dataobj).max() == 0  # untouched
    write_labels(np.ones(volume.shape, np.uint8), volume.source, out, overwrite=True)
    assert np.asarray(nib.load(str(out)).dataobj).min() == 1
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp files left


def test_bad_inputs_name_the_file(tmp_path):
    with pytest.raises(InputError, match="no such file"):
        read_ct(tmp_path / "missing.nii.gz")
    junk = tmp_path / "junk.nii.gz"
    junk.write_bytes(b"not a nifti at all")
    with pytest.raises(InputError, match="junk.nii.gz: cannot be read as NIfTI"):
        read_ct(junk)
    complex_ct = _save(np.zeros((3, 4, 5), np.complex64), np.eye(4), tmp_path / "complex.nii.gz")
    with pytest.raises(InputError, match="complex.nii.gz: complex voxel data"):
        read_ct(complex_ct)
    rgb = np.zeros((3, 4, 5), dtype=[("R", "u1"), ("G", "u1"), ("B", "u1")])
    rgb_ct = _save(rgb, np.eye(4), tmp_path / "rgb.nii.gz")
    with pytest.raises(InputError, match=r"rgb.nii.gz: colour voxels \(R, G, B\); a CT holds one number per voxel"):
        read_ct(rgb_ct)
    four_d = _save(np.zeros((3, 4, 5, 2), np.int16), np.eye(4), tmp_path / "4d.nii.gz")
    with pytest.raises(InputError, match="expected a 3D volume"):
        read_ct(four_d)
    with pytest.raises(InputError, match="not a KiTS19 case folder"):
        read_ct(tmp_path)
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(InputError, match="not a NIfTI file"):
        discover_inputs(tmp_path / "notes.txt")
    # A DICOM series (files named by UID, no suffix, as scanners write them) is one case, named after
    # its folder (kitseg.dicom reads it; tests/test_dicom.py); files without image slices are said to be.
    series = tmp_path / "series"
    series.mkdir()
    for uid in ("1.2.840.1", "1.2.840.2"):
        (series / f"CT.{uid}").write_bytes(bytes(128) + b"DICM" + bytes(64))
    assert [(c.name, c.image_path) for c in discover_inputs(series)] == [("series", series)]
    assert [(c.name, c.image_path) for c in discover_inputs(series / "CT.1.2.840.1")] == [
        ("series", series / "CT.1.2.840.1")]
    with pytest.raises(InputError, match=r"series: its DICOM files hold no image slices"):
        read_ct(series)
    with pytest.raises(InputError, match=r"notes.txt: not a NIfTI file \(expected .nii or .nii.gz\) nor a DICOM file$"):
        discover_inputs(tmp_path / "notes.txt")


def test_discover_case_folders_and_files(tmp_path):
    for case in ("case_00003", "case_00012"):
        (tmp_path / case).mkdir()
        _save(np.zeros((3, 4, 5), np.int16), make_affine("kits"), tmp_path / case / "imaging.nii.gz")
    _save(np.zeros((3, 4, 5), np.int16), make_affine("ras"), tmp_path / "scan.nii.gz")
    _save(np.zeros((3, 4, 5), np.int16), make_affine("ras"), tmp_path / "SHOUT.NII.GZ")  # some exporters' names
    _save(np.zeros((3, 4, 5), np.uint8), make_affine("ras"), tmp_path / "SEGMENTATION.NII.GZ")  # a mask: no CT
    cases = discover_inputs(tmp_path)
    assert [c.output_name for c in cases] == ["prediction_00003", "prediction_00012", "SHOUT_labels", "scan_labels"]
    assert discover_inputs(tmp_path / "case_00012")[0].intermediate_name("y1") == "prediction_00012_y1"
    volume = read_ct(tmp_path / "SHOUT.NII.GZ")
    out = write_labels(np.zeros(volume.shape, np.uint8), volume.source, tmp_path / "OUT.NII.GZ")
    assert out.read_bytes()[:2] == b"\x1f\x8b"  # gzip, as the name says


def test_label_grid_mismatch_is_refused(tmp_path):
    ct = read_ct(_save(np.zeros((4, 5, 6), np.int16), make_affine("ras"), tmp_path / "ct.nii.gz"))
    other = _save(np.zeros((4, 5, 6), np.uint8), make_affine("lps"), tmp_path / "seg.nii.gz")
    with pytest.raises(InputError, match="affine differs"):
        read_labels(other, like=ct)


def test_volume_like_checks_shape():
    volume = Volume.from_source_array(np.zeros((3, 4, 5)), make_affine("ras"))
    with pytest.raises(ValueError, match="does not match"):
        volume.like(np.zeros((3, 4, 5)))


@requires(KITS19 / "case_00000")
def test_real_kits19_mask_keeps_its_geometry(tmp_path):
    path = KITS19 / "case_00000" / "segmentation.nii.gz"
    img = nib.load(str(path))
    labels = read_labels(path)
    assert labels.shape == img.shape  # KiTS19 files are already in the internal orientation
    np.testing.assert_allclose(labels.affine, img.affine)
    assert set(np.unique(labels.array)) <= {0, 1, 2}
    out = write_labels(labels.array, labels.source, tmp_path / "copy.nii.gz")
    np.testing.assert_array_equal(np.asarray(nib.load(str(out)).dataobj), np.asarray(img.dataobj))


@pytest.mark.parametrize("order", ["F", "C"])
def test_tiled_c_order_copy_equals_numpys(order: str) -> None:
    """The copy behind every read and write: same values, C order, for any strides."""
    from kitseg.geometry import to_c_order

    rng = np.random.default_rng(0)
    volume = np.asarray(rng.integers(-1000, 1000, (7, 131, 70)), dtype=np.int16, order=order)
    views = [volume, volume[::-1, :, ::-1], volume.transpose(2, 1, 0), volume[:, ::2, 5:],
             np.stack([volume, volume + 1], axis=-1).transpose(1, 0, 2, 3), volume[0]]  # with a channel axis; 2D
    for view in views:
        copy = to_c_order(view, tile=16)
        assert copy.flags.c_contiguous and copy.dtype == view.dtype
        np.testing.assert_array_equal(copy, view)
    with pytest.raises(ValueError, match="tile"):
        to_c_order(volume, tile=0)


def test_a_file_without_orientation_gets_results_without_one(tmp_path, caplog):
    """Codes 0: the output must be read as the CT is, by any viewer, so it claims no orientation either."""
    img = nib.Nifti1Image(np.arange(4 * 5 * 6, dtype=np.int16).reshape(4, 5, 6), None)
    img.header.set_zooms((0.8, 0.9, 3.0))
    src = tmp_path / "plain.nii.gz"
    nib.save(img, str(src))
    with caplog.at_level("WARNING"):
        volume = read_ct(src)
    assert "plain.nii.gz: no orientation in the header" in caplog.text
    out = write_labels(np.ones(volume.shape, np.uint8), volume.source, tmp_path / "plain_labels.nii.gz")
    written, read_back = nib.load(str(out)), nib.load(str(src))
    assert int(written.header["sform_code"]) == int(written.header["qform_code"]) == 0
    np.testing.assert_allclose(written.affine, read_back.affine)
    np.testing.assert_allclose(written.header.get_zooms(), read_back.header.get_zooms())
    # Labels with an orientation, of as many voxels each way: they cannot be matched, and the refusal says why.
    oriented = _save(np.zeros((4, 5, 6), np.uint8), make_affine("kits"), tmp_path / "oriented.nii.gz")
    with pytest.raises(InputError, match=r"oriented.nii.gz: its axes run IPL, the CT's LAS \(shape \(4, 5, 6\) "
                                         r"both\): the two do not overlay; the CT declares no orientation"):
        read_labels(oriented, like=volume)


def test_a_zero_voxel_size_without_sform_is_refused(tmp_path):
    img = nib.Nifti1Image(np.zeros((4, 5, 6), np.int16), None)
    img.header.set_zooms((0.8, 0.8, 3.0))
    img.header["pixdim"][3] = 0
    src = tmp_path / "flat.nii"
    nib.save(img, str(src))
    with pytest.raises(InputError, match="flat.nii: the header gives a voxel size of 0"):
        read_ct(src)


def test_voxel_sizes_in_metres_are_read_in_mm_and_an_implausible_size_is_named(tmp_path, caplog):
    affine = make_affine("ras")
    array = np.zeros((6, 7, 8), np.int16)
    in_mm = read_ct(_save(array, affine, tmp_path / "mm.nii.gz"))
    img = nib.Nifti1Image(array, affine.copy())
    img.set_sform(np.diag([1e-3, 1e-3, 1e-3, 1.0]) @ affine, code=1)
    img.set_qform(np.diag([1e-3, 1e-3, 1e-3, 1.0]) @ affine, code=1)
    img.header.set_xyzt_units("meter")
    nib.save(img, str(tmp_path / "metres.nii.gz"))
    with caplog.at_level("WARNING"):
        in_metres = read_ct(tmp_path / "metres.nii.gz")
    assert "metres.nii.gz" in caplog.text and "meter" in caplog.text
    np.testing.assert_allclose(in_metres.affine, in_mm.affine, atol=1e-6)
    # Written back in metres, the input's own numbers: viewers that ignore the unit overlay it too.
    out = nib.load(str(write_labels(np.zeros(in_metres.shape, np.uint8), in_metres.source, tmp_path / "l.nii.gz")))
    np.testing.assert_allclose(out.get_sform(), img.get_sform(), atol=1e-9)
    np.testing.assert_allclose(out.get_qform(), img.get_qform(), atol=1e-9)
    assert out.header.get_xyzt_units()[0] == "meter" and out.shape == array.shape
    img.header.set_xyzt_units("unknown")  # no unit: read as mm, as viewers do, and written back as it was
    img.set_sform(affine, code=1)
    img.set_qform(affine, code=1)
    nib.save(img, str(tmp_path / "no_unit.nii.gz"))
    no_unit = read_ct(tmp_path / "no_unit.nii.gz")
    np.testing.assert_allclose(no_unit.affine, in_mm.affine, atol=1e-6)
    out = nib.load(str(write_labels(np.zeros(no_unit.shape, np.uint8), no_unit.source, tmp_path / "l2.nii.gz")))
    assert out.header.get_xyzt_units()[0] == "unknown"
    np.testing.assert_allclose(out.get_sform(), affine, atol=1e-6)
    img.header.set_xyzt_units("micron")  # the same numbers read as microns: 0.0008 mm voxels
    nib.save(img, str(tmp_path / "microns.nii.gz"))
    with pytest.raises(InputError, match=r"microns.nii.gz: voxel size .* no CT's .*'micron'"):
        read_ct(tmp_path / "microns.nii.gz")


def test_a_qform_beside_the_sform_is_written_back_as_it_was(tmp_path):
    affine = make_affine("lps")
    img = nib.Nifti1Image(np.zeros((6, 7, 8), np.int16), affine)
    shifted = affine.copy()
    shifted[:3, 3] += 10.0
    img.set_sform(affine, code=2)
    img.set_qform(shifted, code=1)
    nib.save(img, str(tmp_path / "ct.nii.gz"))
    volume = read_ct(tmp_path / "ct.nii.gz")
    out = nib.load(str(write_labels(np.zeros(volume.shape, np.uint8), volume.source, tmp_path / "labels.nii.gz")))
    np.testing.assert_allclose(out.get_sform(), affine, atol=1e-5)
    np.testing.assert_allclose(out.get_qform(), shifted, atol=1e-5)
    header = out.header
    assert (int(header["sform_code"]), int(header["qform_code"])) == (2, 1)
    assert header.get_xyzt_units()[0] == img.header.get_xyzt_units()[0] == "unknown"  # nibabel's default, kept
    img.set_qform(None)  # no qform at all (code 0), as TotalSegmentator's example: none written either
    nib.save(img, str(tmp_path / "sform_only.nii.gz"))
    volume = read_ct(tmp_path / "sform_only.nii.gz")
    out = nib.load(str(write_labels(np.zeros(volume.shape, np.uint8), volume.source, tmp_path / "l2.nii.gz")))
    assert (int(out.header["sform_code"]), int(out.header["qform_code"])) == (2, 0)
    np.testing.assert_allclose(out.affine, affine, atol=1e-5)
    img.set_qform(affine, code=1)  # a qform alone (older converters): no sform written either
    img.set_sform(None, code=0)
    nib.save(img, str(tmp_path / "qform_only.nii.gz"))
    volume = read_ct(tmp_path / "qform_only.nii.gz")
    out = nib.load(str(write_labels(np.zeros(volume.shape, np.uint8), volume.source, tmp_path / "l3.nii.gz")))
    assert (int(out.header["sform_code"]), int(out.header["qform_code"])) == (0, 1)
    np.testing.assert_allclose(out.affine, affine, atol=1e-5)


def test_the_same_grid_in_another_axis_order_overlays(tmp_path):
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, size=(11, 9, 7)).astype(np.uint8)
    kits = _save(labels, make_affine("kits"), tmp_path / "kits.nii.gz")
    volume = read_labels(kits)
    ras = nib.as_closest_canonical(nib.load(str(kits)))
    nib.save(ras, str(tmp_path / "ras.nii.gz"))
    assert nib.load(str(tmp_path / "ras.nii.gz")).shape != labels.shape
    again = read_labels(tmp_path / "ras.nii.gz", like=volume)  # no refusal: the voxels are the same
    np.testing.assert_array_equal(again.array, volume.array)


def test_a_grid_turned_45_degrees_is_one_grid_whichever_way_rounding_tips_it(tmp_path):
    """At 45 degrees, two axes are equally near: a CT and its labels a rounding error apart must
    still be read in one axis order, or their internal arrays would not match voxel for voxel."""
    labels = np.random.default_rng(0).integers(0, 3, size=(7, 9, 11)).astype(np.uint8)
    volumes = []
    for degrees in (45 + 1e-6, 45 - 1e-6):
        turn = np.eye(4)
        turn[:2, :2] = [[np.cos(np.deg2rad(degrees)), -np.sin(np.deg2rad(degrees))],
                        [np.sin(np.deg2rad(degrees)), np.cos(np.deg2rad(degrees))]]
        volumes.append(read_labels(_save(labels, turn @ make_affine("kits"), tmp_path / f"{degrees}.nii.gz")))
    again = read_labels(volumes[1].source.path, like=volumes[0])  # no refusal
    np.testing.assert_array_equal(again.array, volumes[0].array)


def test_hidden_files_are_not_taken_for_cts(tmp_path):
    _save(np.zeros((4, 5, 6), np.int16), make_affine("ras"), tmp_path / "scan.nii.gz")
    _save(np.zeros((4, 5, 6), np.int16), make_affine("ras"), tmp_path / ".scan_labels.nii.gz.k3j2_1.nii.gz")
    assert [case.name for case in discover_inputs(tmp_path)] == ["scan"]


def test_label_map_values_tells_label_maps_of_few_or_many_classes_from_cts():
    from kitseg.io import label_map_values

    rng = np.random.default_rng(0)
    kits = np.zeros((20, 30, 30), np.int16)
    kits[5:15, 10:20, 10:20] = 1
    kits[8:12, 12:16, 12:16] = 2
    assert label_map_values(kits) == [0, 1, 2]
    assert label_map_values(kits.astype(np.float32)) == [0, 1, 2]  # stored as float, still whole numbers
    organs = np.repeat(np.repeat(np.arange(64, dtype=np.uint8).reshape(1, 8, 8), 10, axis=1), 16, axis=2)
    assert label_map_values(np.repeat(organs, 4, axis=0)) == list(range(64))  # flat over regions
    ct_hu = rng.normal(40, 20, (20, 30, 30)).astype(np.float32)
    ct_hu[:, :3] = -1000.0  # air
    assert label_map_values(ct_hu) is None
    windowed = np.clip(rng.normal(120, 15, (20, 30, 30)), 0, 255).astype(np.uint8)  # 8-bit, noisy
    assert label_map_values(windowed) is None
    small_body = np.zeros((20, 120, 120), np.uint8)  # the same, 6% of a field of view of 0s
    small_body[:, 45:75, 45:75] = windowed
    assert label_map_values(small_body) is None
    assert label_map_values(kits + 0.5) is None


def test_a_ct_with_nan_voxels_is_refused_with_their_count_and_a_fix(tmp_path):
    ct = np.full((4, 5, 6), 40.0, np.float32)
    ct[0, 0, :3] = np.nan  # padding outside the field of view, as some resampling tools write it
    path = tmp_path / "padded.nii.gz"
    nib.save(nib.Nifti1Image(ct, np.eye(4)), str(path))
    with pytest.raises(InputError, match=r"padded\.nii\.gz: 3 of its 120 voxels are NaN .* -1000 \(air\)"):
        read_ct(path)
