"""Synthetic CT phantoms: the simple procedural tier and the realistic tier built on KiTS19 masks."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from kitseg.phantom import SyntheticCase, make_synthetic_case

# ---------------------------------------------------------------- tier 1: simple phantom


@pytest.fixture(scope="module")
def default_case() -> SyntheticCase:
    return make_synthetic_case(seed=3)


def test_simple_types_shape_and_affine(default_case: SyntheticCase) -> None:
    case = default_case
    assert case.ct.shape == case.labels.shape == (40, 96, 112)
    assert case.ct.dtype == np.int16 and case.labels.dtype == np.uint8
    assert set(np.unique(case.labels)) == {0, 1, 2}
    assert nib.aff2axcodes(case.affine) == ("I", "P", "L")
    np.testing.assert_allclose(np.abs(case.affine[:3, :3]).sum(axis=0)[::-1], [1.5, 1.5, 2.5])
    assert case.spacing == (2.5, 1.5, 1.5)
    assert np.any(case.affine[:3, 3] != 0)


def test_simple_labels_agree_with_hu(default_case: SyntheticCase) -> None:
    ct, labels = default_case.ct.astype(np.float32), default_case.labels
    kidney_mean = ct[labels == 1].mean()
    tumor_mean = ct[labels == 2].mean()
    assert 140 <= kidney_mean <= 210
    assert 60 <= tumor_mean <= 120
    assert ct[0, 0, 0] < -900  # air in the corner
    # Bone present and bright; the kidneys sit in the posterior half, one each side of the midline.
    assert ct.max() > 400
    _, rows, cols = np.nonzero(labels)
    assert rows.mean() > labels.shape[1] / 2
    assert cols.min() < labels.shape[2] / 2 < cols.max()


def test_simple_is_deterministic_per_seed() -> None:
    a, b, c = make_synthetic_case(seed=7), make_synthetic_case(seed=7), make_synthetic_case(seed=8)
    np.testing.assert_array_equal(a.ct, b.ct)
    np.testing.assert_array_equal(a.labels, b.labels)
    assert not np.array_equal(a.ct, c.ct)


def test_simple_without_tumor() -> None:
    case = make_synthetic_case(seed=1, tumor=False)
    assert set(np.unique(case.labels)) == {0, 1}


@pytest.mark.parametrize(
    "shape, spacing", [((17, 33, 45), (3.0, 1.0, 1.2)), ((1, 64, 63), (5.0, 0.8, 0.8)), ((9, 201, 77), (1.0, 2.0, 3.0))]
)
def test_simple_odd_shapes(shape: tuple[int, int, int], spacing: tuple[float, float, float]) -> None:
    case = make_synthetic_case(shape=shape, spacing=spacing, seed=2)
    assert case.ct.shape == case.labels.shape == shape
    np.testing.assert_allclose(case.spacing, spacing)


def test_simple_rejects_bad_geometry() -> None:
    with pytest.raises(ValueError, match="shape"):
        make_synthetic_case(shape=(0, 10, 10))
    with pytest.raises(ValueError, match="spacing"):
        make_synthetic_case(spacing=(1.0, -1.0, 1.0))


def test_simple_kits_round_trip(tmp_path: Path, default_case: SyntheticCase) -> None:
    folder = default_case.save_case_folder(tmp_path / "case_00000")
    img = nib.load(folder / "imaging.nii.gz")
    seg = nib.load(folder / "segmentation.nii.gz")
    np.testing.assert_allclose(img.affine, default_case.affine)
    np.testing.assert_allclose(seg.affine, default_case.affine)
    assert img.get_data_dtype() == np.int16 and seg.get_data_dtype() == np.uint8
    np.testing.assert_array_equal(np.asarray(img.dataobj), default_case.ct)
    np.testing.assert_array_equal(np.asarray(seg.dataobj), default_case.labels)
    assert sorted(p.name for p in folder.iterdir()) == ["imaging.nii.gz", "segmentation.nii.gz"]


# ---------------------------------------------------------------- tier 2: realistic phantom

from kitseg.phantom import (  # noqa: E402
    MaskReadError,
    PhantomParams,
    case_seed,
    generate_phantom_case,
    generate_phantom_dataset,
    synthesize_ct,
    synthesize_ct_with_protocol,
)

KITS_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "kits19"
needs_kits = pytest.mark.skipif(not KITS_DIR.is_dir(), reason=f"real KiTS19 masks not found at {KITS_DIR}")


@pytest.fixture(scope="module")
def label_map() -> tuple[np.ndarray, tuple[float, float, float]]:
    """A small procedural label map (two kidneys, one tumor), odd shape."""
    spacing = (3.0, 1.7, 1.7)
    return make_synthetic_case(shape=(23, 131, 157), spacing=spacing, seed=4).labels, spacing


def _save_mask(path: Path, labels: np.ndarray, affine: np.ndarray, dtype=np.uint8) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(labels.astype(dtype), affine), str(path))
    return path


def _kits_affine(spacing: tuple[float, float, float]) -> np.ndarray:
    sz, sy, sx = spacing
    return np.array([[0, 0, -sx, 12.5], [0, -sy, 0, -30.0], [-sz, 0, 0, 71.0], [0, 0, 0, 1]], dtype=float)


def test_realistic_shape_dtype_and_determinism(label_map) -> None:
    labels, spacing = label_map
    a = synthesize_ct(labels, spacing, np.random.default_rng(5))
    b = synthesize_ct(labels, spacing, np.random.default_rng(5))
    c = synthesize_ct(labels, spacing, np.random.default_rng(6))
    assert a.shape == labels.shape and a.dtype == np.int16
    assert a.min() >= -1024 and a.max() <= 3071
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    # Anatomy around the kidneys: air, fat and bone are all present.
    assert (a < -900).any() and ((a > -150) & (a < -50)).mean() > 0.05 and (a > 300).any()


def test_tumor_not_separable_by_one_threshold(label_map) -> None:
    """Across cases, tumor and kidney HU overlap: no single threshold separates them (>95%)."""
    labels, spacing = label_map
    kidney, tumor, phases = [], [], set()
    for seed in range(8):
        ct, protocol = synthesize_ct_with_protocol(labels, spacing, np.random.default_rng(seed))
        phases.add(protocol.phase)
        kidney.append(ct[labels == 1][::3])
        tumor.append(ct[labels == 2])
    kidney_hu, tumor_hu = np.concatenate(kidney).astype(float), np.concatenate(tumor).astype(float)
    assert len(phases) >= 2
    best = 0.0
    for t in np.percentile(np.concatenate([kidney_hu, tumor_hu]), np.linspace(1, 99, 99)):
        balanced = 0.5 * ((tumor_hu > t).mean() + (kidney_hu <= t).mean())
        best = max(best, balanced, 1.0 - balanced)
    assert best < 0.95, f"a single threshold separates tumor from kidney with balanced accuracy {best:.3f}"


def test_realistic_rejects_bad_labels(label_map) -> None:
    labels, spacing = label_map
    with pytest.raises(ValueError, match="0 \\(background\\), 1 \\(kidney\\) or 2"):
        synthesize_ct(np.full((4, 8, 8), 3, np.uint8), spacing, np.random.default_rng(0))
    with pytest.raises(ValueError, match="spacing"):
        synthesize_ct(labels, (0.0, 1.0, 1.0), np.random.default_rng(0))


def test_phantom_params_round_trip_and_validation() -> None:
    params = PhantomParams(phases=("arterial", "venous"), phase_weights=(1.0, 2.0), noise_sigma_hu=(8.0, 12.0))
    assert PhantomParams.from_dict(params.to_dict()) == params
    with pytest.raises(ValueError, match="phases"):
        PhantomParams(phases=("portal",), phase_weights=(1.0,))
    with pytest.raises(ValueError, match="noise_sigma_hu"):
        PhantomParams(noise_sigma_hu=(30.0, 5.0))
    with pytest.raises(ValueError, match="unknown field"):
        PhantomParams.from_dict({"noise": 3})
    # A value of the wrong kind is named with the kind it takes (not a numpy error from deep inside).
    for bad, message in (({"noise_sigma_hu": 5}, "noise_sigma_hu must be a range [low, high], got 5"),
                         ({"noise_sigma_hu": ["a", "b"]}, "noise_sigma_hu must be a range"),
                         ({"adrenal_probability": None}, "adrenal_probability must be a number, got None"),
                         ({"medulla": 3}, "medulla must be a text, got 3"),
                         ({"hu_scale": [0, 0]}, "hu_scale must be above 0")):
        with pytest.raises(ValueError) as error:
            PhantomParams.from_dict(bad)
        assert message in str(error.value), bad
    assert PhantomParams.from_dict({"cancellous_bone_hu": None}).cancellous_bone_hu is None  # optional: allowed


def test_case_file_round_trip_uint16_and_ras(tmp_path: Path, label_map) -> None:
    labels, spacing = label_map
    affine = _kits_affine(spacing)
    mask = _save_mask(tmp_path / "masks" / "case_00007" / "segmentation.nii.gz", labels, affine, np.uint16)
    out = generate_phantom_case(mask, tmp_path / "out" / "case_00007", seed=3)
    img, seg = nib.load(out / "imaging.nii.gz"), nib.load(out / "segmentation.nii.gz")
    assert img.shape == seg.shape == labels.shape
    np.testing.assert_allclose(img.affine, affine, atol=1e-5)
    np.testing.assert_allclose(seg.affine, affine, atol=1e-5)
    assert img.get_data_dtype() == np.int16 and seg.get_data_dtype() == np.uint8
    np.testing.assert_array_equal(np.asarray(seg.dataobj), labels)
    again = generate_phantom_case(mask, tmp_path / "again", seed=3)
    np.testing.assert_array_equal(np.asarray(img.dataobj), np.asarray(nib.load(again / "imaging.nii.gz").dataobj))
    # A mask stored in RAS: same grid out, and the image is the same anatomy (reoriented).
    ras = nib.as_closest_canonical(nib.load(mask))
    ras_mask = tmp_path / "ras" / "segmentation.nii.gz"
    ras_mask.parent.mkdir()
    nib.save(ras, str(ras_mask))
    ras_out = generate_phantom_case(ras_mask, tmp_path / "ras_out", seed=3)
    ras_img = nib.load(ras_out / "imaging.nii.gz")
    assert ras_img.shape == ras.shape
    np.testing.assert_allclose(ras_img.affine, ras.affine, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(nib.as_closest_canonical(img).dataobj), np.asarray(ras_img.dataobj))


def test_dataset_seeds_do_not_depend_on_order_and_skip_existing(tmp_path: Path, label_map, caplog) -> None:
    labels, spacing = label_map
    masks = tmp_path / "masks"
    for case in ("case_00001", "case_00002"):
        _save_mask(masks / case / "segmentation.nii.gz", labels, _kits_affine(spacing))
    both = generate_phantom_dataset(masks, tmp_path / "all", seed=9, progress=False)
    only = generate_phantom_dataset(masks, tmp_path / "one", cases=["case_00002"], seed=9, progress=False)
    assert [p.name for p in both] == ["case_00001", "case_00002"] and [p.name for p in only] == ["case_00002"]
    read = lambda p: np.asarray(nib.load(p / "imaging.nii.gz").dataobj)  # noqa: E731
    np.testing.assert_array_equal(read(both[1]), read(only[0]))
    assert not np.array_equal(read(both[0]), read(both[1]))
    assert case_seed(9, "case_00001") != case_seed(9, "case_00002") != case_seed(10, "case_00002")
    stamp = (both[0] / "imaging.nii.gz").stat().st_mtime_ns
    generate_phantom_dataset(masks, tmp_path / "all", seed=9, progress=False)
    assert (both[0] / "imaging.nii.gz").stat().st_mtime_ns == stamp
    generate_phantom_dataset(masks, tmp_path / "all", cases=["case_00001"], seed=9, progress=False, overwrite=True)
    assert (both[0] / "imaging.nii.gz").stat().st_mtime_ns != stamp

    # KiTS21's masks (aggregated_MAJ_seg.nii.gz, the annotators' majority vote) draw the same cases.
    kits21 = tmp_path / "kits21"
    for case in ("case_00001", "case_00002"):
        (kits21 / case).mkdir(parents=True)
        shutil.copy(masks / case / "segmentation.nii.gz", kits21 / case / "aggregated_MAJ_seg.nii.gz")
    from_kits21 = generate_phantom_dataset(kits21, tmp_path / "from_kits21", seed=9, progress=False)
    assert [p.name for p in from_kits21] == ["case_00001", "case_00002"]
    np.testing.assert_array_equal(read(from_kits21[1]), read(both[1]))
    with pytest.raises(FileNotFoundError, match=r"no segmentation.nii.gz \(or KiTS21's aggregated_MAJ_seg.nii.gz\) "
                                                r"for case\(s\) case_00003"):
        generate_phantom_dataset(kits21, tmp_path / "none", cases=["case_00003"], progress=False)
    # A case with its annotators' own maps only is not drawn, and said; nnU-Net's label files are not read.
    (kits21 / "case_00003").mkdir()
    shutil.copy(masks / "case_00001" / "segmentation.nii.gz", kits21 / "case_00003" / "aggregated_OR_seg.nii.gz")
    with caplog.at_level("WARNING"):
        generate_phantom_dataset(kits21, tmp_path / "from_kits21", seed=9, progress=False)
    assert "1 case folder(s) without segmentation.nii.gz or aggregated_MAJ_seg.nii.gz are not drawn: case_00003" in (
        caplog.text)
    (tmp_path / "labelsTr").mkdir()
    shutil.copy(masks / "case_00001" / "segmentation.nii.gz", tmp_path / "labelsTr" / "case_00001.nii.gz")
    with pytest.raises(FileNotFoundError, match=r"nnU-Net's label files are not read here: put each NAME.nii.gz "
                                                r"into a folder NAME as segmentation.nii.gz"):
        generate_phantom_dataset(tmp_path / "labelsTr", tmp_path / "none", progress=False)
    with pytest.raises(FileNotFoundError, match=r"case_00001 is one case's folder: give the folder that holds"):
        generate_phantom_dataset(kits21 / "case_00001", tmp_path / "none", progress=False)


def test_workers_draw_the_same_images_and_name_a_bad_mask(tmp_path: Path, label_map) -> None:
    from kitseg.cli import main

    labels, spacing = label_map
    masks = tmp_path / "masks"
    names = ["case_00003", "case_00001", "case_00002"]
    for case in names:
        _save_mask(masks / case / "segmentation.nii.gz", labels, _kits_affine(spacing))
    serial = generate_phantom_dataset(masks, tmp_path / "serial", cases=names, seed=5, progress=False)
    generate_phantom_dataset(masks, tmp_path / "parallel", cases=names[:1], seed=5, progress=False)  # one already there
    parallel = generate_phantom_dataset(masks, tmp_path / "parallel", cases=names, seed=5, progress=False, workers=2)
    assert [p.name for p in parallel] == [p.name for p in serial] == names  # the order asked for
    for a, b in zip(serial, parallel):
        for name in ("imaging.nii.gz", "segmentation.nii.gz"):
            np.testing.assert_array_equal(np.asarray(nib.load(a / name).dataobj), np.asarray(nib.load(b / name).dataobj))
    assert main(["phantom", "--masks", str(masks), "--out", str(tmp_path / "cli"), "--seed", "5", "--workers", "2"]) == 0
    np.testing.assert_array_equal(np.asarray(nib.load(tmp_path / "cli" / "case_00002" / "imaging.nii.gz").dataobj),
                                  np.asarray(nib.load(serial[2] / "imaging.nii.gz").dataobj))
    with pytest.raises(SystemExit):
        main(["phantom", "--masks", str(masks), "--out", str(tmp_path / "zero"), "--workers", "0"])
    for bad in ("case_00005", "case_00004"):
        (masks / bad).mkdir()
        (masks / bad / "segmentation.nii.gz").write_bytes(b"not a nifti file")
    with pytest.raises(MaskReadError, match=r"2 of 5 (.|\n)*case_00004(.|\n)*case_00005"):  # workers' errors, in case order
        generate_phantom_dataset(masks, tmp_path / "bad", progress=False, workers=2)
    assert sorted(p.name for p in (tmp_path / "bad").iterdir()) == sorted(names)  # after the others are drawn


def test_phantom_command_takes_parameter_ranges_from_json(tmp_path: Path, label_map, capsys) -> None:
    from kitseg.cli import main

    labels, spacing = label_map
    masks = tmp_path / "masks"
    _save_mask(masks / "case_00001" / "segmentation.nii.gz", labels, _kits_affine(spacing))
    (tmp_path / "none.json").write_text('{"adrenal_probability": 0}')
    assert main(["phantom", "--masks", str(masks), "--out", str(tmp_path / "cli"), "--params", str(tmp_path / "none.json")]) == 0
    generate_phantom_dataset(masks, tmp_path / "api", seed=0, progress=False, params=PhantomParams(adrenal_probability=0.0))
    read = lambda p: np.asarray(nib.load(p / "case_00001" / "imaging.nii.gz").dataobj)  # noqa: E731
    np.testing.assert_array_equal(read(tmp_path / "cli"), read(tmp_path / "api"))
    (tmp_path / "bad.json").write_text('{"adrenal_probabilty": 0}')
    assert main(["phantom", "--masks", str(masks), "--out", str(tmp_path / "bad"), "--params", str(tmp_path / "bad.json")]) == 2
    assert not (tmp_path / "bad").exists()
    assert "bad.json" in capsys.readouterr().err
    # The object itself, written inline as the help shows it, does what the file does.
    inline = ["--params", ' {"adrenal_probability": 0}']
    assert main(["phantom", "--masks", str(masks), "--out", str(tmp_path / "inline")] + inline) == 0
    np.testing.assert_array_equal(read(tmp_path / "inline"), read(tmp_path / "api"))
    assert main(["phantom", "--masks", str(masks), "--out", str(tmp_path / "typo"), "--params", '{"adrenal_probabilty": 0}']) == 2
    assert "--params" in capsys.readouterr().err and not (tmp_path / "typo").exists()


def test_phantom_never_replaces_a_users_mask_nor_leaves_a_half_written_case(tmp_path: Path, label_map, capsys,
                                                                            monkeypatch) -> None:
    import kitseg.phantom.realistic as realistic
    from kitseg.cli import main

    labels, spacing = label_map
    masks = tmp_path / "masks"
    mask = _save_mask(masks / "case_00001" / "segmentation.nii.gz", labels, _kits_affine(spacing))
    # An output folder holding only a mask (a copy of the user's) is not this tool's: refused, kept.
    copy = tmp_path / "out" / "case_00001" / "segmentation.nii.gz"
    copy.parent.mkdir(parents=True)
    copy.write_bytes(mask.read_bytes())
    params = ["--params", '{"extra_tumors": [2, 2]}']
    assert main(["phantom", "--masks", str(masks), "--out", str(tmp_path / "out")] + params) == 2
    assert "a mask without its image" in capsys.readouterr().err and copy.read_bytes() == mask.read_bytes()
    # A case folder linked to the masks' own is refused, even with --overwrite.
    (tmp_path / "linked").mkdir()
    (tmp_path / "linked" / "case_00001").symlink_to(masks / "case_00001")
    assert main(["phantom", "--masks", str(masks), "--out", str(tmp_path / "linked"), "--overwrite"] + params) == 2
    assert "over the real masks" in capsys.readouterr().err and mask.read_bytes() == copy.read_bytes()

    # Killed while writing a new case: no case folder at all; the next run draws it, leaving no debris.
    write = realistic.save_nifti_atomic

    def fail_on_image(array, affine, path, **kwargs):
        if path.name == "imaging.nii.gz":
            raise KeyboardInterrupt
        return write(array, affine, path, **kwargs)

    monkeypatch.setattr(realistic, "save_nifti_atomic", fail_on_image)
    with pytest.raises(KeyboardInterrupt):
        realistic.generate_phantom_dataset(masks, tmp_path / "new", seed=2, progress=False)
    assert not (tmp_path / "new" / "case_00001").exists()
    monkeypatch.setattr(realistic, "save_nifti_atomic", write)
    assert main(["phantom", "--masks", str(masks), "--out", str(tmp_path / "new"), "--seed", "2"]) == 0
    assert sorted(p.name for p in (tmp_path / "new").iterdir()) == ["case_00001"]
    assert realistic.is_complete_case(tmp_path / "new" / "case_00001")
    assert main(["phantom", "--masks", str(masks), "--out", str(tmp_path / "new"), "--seed", "2"]) == 0
    assert "drew 0 case(s)" in capsys.readouterr().out.splitlines()[-1]
    # Killed while redrawing (--overwrite): the old case stays whole (never the old image beside
    # a new mask), so a run without --overwrite goes on from there.
    case = tmp_path / "new" / "case_00001"
    old = {name: (case / name).read_bytes() for name in ("imaging.nii.gz", "segmentation.nii.gz", "phantom.json")}
    monkeypatch.setattr(realistic, "save_nifti_atomic", fail_on_image)
    with pytest.raises(KeyboardInterrupt):
        realistic.generate_phantom_dataset(masks, tmp_path / "new", seed=3, progress=False, overwrite=True,
                                           params=PhantomParams(extra_tumors=(2, 2)))
    assert {name: (case / name).read_bytes() for name in old} == old
    monkeypatch.setattr(realistic, "save_nifti_atomic", write)
    _save_mask(masks / "case_00002" / "segmentation.nii.gz", labels, _kits_affine(spacing))
    assert main(["phantom", "--masks", str(masks), "--out", str(tmp_path / "new"), "--seed", "2"]) == 0
    assert "drew 1 case(s)" in (out := capsys.readouterr().out) and "1 already there, kept" in out
    assert sorted(p.name for p in (tmp_path / "new").iterdir()) == ["case_00001", "case_00002"]  # no debris
    # Redrawn for real: the new mask and its own image, side by side.
    realistic.generate_phantom_dataset(masks, tmp_path / "new", cases=["case_00001"], seed=3, progress=False,
                                       overwrite=True, params=PhantomParams(extra_tumors=(2, 2)))
    assert (case / "segmentation.nii.gz").read_bytes() != old["segmentation.nii.gz"]
    assert (case / "imaging.nii.gz").read_bytes() != old["imaging.nii.gz"]
    assert json.loads((case / "phantom.json").read_text())["extra_tumors"] == 2  # the record swapped in too
    assert sorted(p.name for p in (tmp_path / "new").iterdir()) == ["case_00001", "case_00002"]


def test_each_case_records_its_draw_and_the_record_redraws_it(tmp_path: Path, label_map) -> None:
    from kitseg.phantom.params import PHASES

    labels, spacing = label_map
    mask = _save_mask(tmp_path / "masks" / "case_00004" / "segmentation.nii.gz", labels, _kits_affine(spacing))
    params = PhantomParams(extra_tumors=(1, 1))
    case = generate_phantom_case(mask, tmp_path / "out" / "case_00004", seed=11, params=params)
    record = json.loads((case / "phantom.json").read_text())
    assert record["format"] == "kitseg-phantom-record" and record["case_seed"] == 11
    assert record["protocol"]["phase"] in PHASES and record["extra_tumors"] == 1
    assert set(record["tumor_look"]) >= {"enhancement_ratio", "necrosis", "heterogeneity_hu"}
    # The measured contrast is the image's own: the tumor's mean HU, and the kidney's within 5 mm.
    image = np.asarray(nib.load(case / "imaging.nii.gz").dataobj).astype(float)
    drawn = np.asarray(nib.load(case / "segmentation.nii.gz").dataobj)
    measured = record["measured_tumor"]
    assert measured["tumor_ml"] == pytest.approx((drawn == 2).sum() * np.prod(spacing) / 1000, abs=1e-3)
    assert measured["tumor_hu_mean"] == pytest.approx(image[drawn == 2].mean(), abs=0.06)
    near = ndimage.distance_transform_edt(drawn != 2, sampling=spacing) <= 5.0
    assert measured["kidney_near_tumor_hu_mean"] == pytest.approx(image[near & (drawn == 1)].mean(), abs=0.06)
    # Seed and parameters from the record draw the same case again, bit for bit.
    again = generate_phantom_case(mask, tmp_path / "again", record["case_seed"], PhantomParams.from_dict(record["params"]))
    np.testing.assert_array_equal(np.asarray(nib.load(again / "imaging.nii.gz").dataobj), image)
    # Without a tumor there is no look nor contrast to record.
    no_tumor = _save_mask(tmp_path / "masks" / "case_00005" / "segmentation.nii.gz", np.where(labels == 2, 1, labels),
                          _kits_affine(spacing))
    record = json.loads((generate_phantom_case(no_tumor, tmp_path / "out" / "case_00005", seed=11) / "phantom.json").read_text())
    assert record["tumor_look"] is None and record["measured_tumor"] is None and record["extra_tumors"] == 0


def test_case_seeds_key_on_the_whole_name_and_the_mask_orientation_code_is_kept(tmp_path: Path, label_map) -> None:
    from kitseg.cli import main

    assert case_seed(0, "case_00001_v2") != case_seed(0, "case_00012")
    assert len({case_seed(0, name) for name in ("case_00001", "case_00001_lr", "case_1x")}) == 3
    with pytest.raises(ValueError, match=">= 0"):
        case_seed(-1, "case_00001")
    labels, spacing = label_map
    cyst = labels.copy()
    cyst[cyst == 1] = 3  # KiTS21's cyst label
    path = _save_mask(tmp_path / "kits21" / "case_00001" / "segmentation.nii.gz", cyst, _kits_affine(spacing))
    with pytest.raises(MaskReadError, match="kits21/case_00001.*label 3 is a cyst; --map-labels 3=1 draws it as kidney"):
        generate_phantom_case(path, tmp_path / "kits21_out", seed=1)
    # Mapped, it draws the phantom of the KiTS19 mask it maps onto, pixel for pixel, and says so.
    plain = _save_mask(tmp_path / "kits19" / "case_00001" / "segmentation.nii.gz", labels, _kits_affine(spacing))
    generate_phantom_case(plain, tmp_path / "kits19_out", seed=case_seed(1, "case_00001"))  # as the command seeds it
    assert main(["phantom", "--masks", str(tmp_path / "kits21"), "--out", str(tmp_path / "kits21_out"),
                 "--seed", "1", "--map-labels", "3=1"]) == 0
    drawn = tmp_path / "kits21_out" / "case_00001"
    for name in ("imaging.nii.gz", "segmentation.nii.gz"):
        np.testing.assert_array_equal(np.asarray(nib.load(str(drawn / name)).dataobj),
                                      np.asarray(nib.load(str(tmp_path / "kits19_out" / name)).dataobj))
    assert json.loads((drawn / "phantom.json").read_text())["label_mapping"] == {"3": 1}
    assert np.array_equal(np.asarray(nib.load(str(path)).dataobj), cyst)  # the mask itself unchanged
    with pytest.raises(SystemExit):
        main(["phantom", "--masks", str(tmp_path), "--out", str(tmp_path / "o"), "--seed", "-1"])
    labels, spacing = label_map
    img = nib.Nifti1Image(labels.astype(np.uint8), _kits_affine(spacing))
    img.set_sform(None, code=0)
    img.set_qform(None, code=0)  # no orientation: the phantom must not claim one
    path = tmp_path / "masks" / "case_00001" / "segmentation.nii.gz"
    path.parent.mkdir(parents=True)
    nib.save(img, str(path))
    out = generate_phantom_case(path, tmp_path / "out", seed=1)
    for name in ("imaging.nii.gz", "segmentation.nii.gz"):
        header = nib.load(out / name).header
        assert (int(header["sform_code"]), int(header["qform_code"])) == (0, 0)


def test_dataset_names_every_unreadable_mask_and_draws_the_rest(tmp_path: Path, label_map, capsys) -> None:
    from kitseg.cli import main
    from kitseg.phantom import realistic

    labels, spacing = label_map
    _save_mask(tmp_path / "masks" / "case_00001" / "segmentation.nii.gz", labels, _kits_affine(spacing))
    for case in ("case_00003", "case_00005"):
        bad = tmp_path / "masks" / case / "segmentation.nii.gz"
        bad.parent.mkdir(parents=True)
        bad.write_bytes(b"not a nifti file")
    with pytest.raises(MaskReadError, match=r"2 of 3 case\(s\) not drawn(.|\n)*case_00003(.|\n)*case_00005"):
        generate_phantom_dataset(tmp_path / "masks", tmp_path / "out", progress=False)
    assert realistic.is_complete_case(tmp_path / "out" / "case_00001") and not (tmp_path / "out" / "case_00003").exists()
    assert main(["phantom", "--masks", str(tmp_path / "masks"), "--out", str(tmp_path / "cli")]) == 2
    err = capsys.readouterr().err
    assert "case_00003" in err and "case_00005" in err and "1 other case(s) are in" in err
    assert realistic.is_complete_case(tmp_path / "cli" / "case_00001")
    with pytest.raises(FileNotFoundError, match="case_00099"):
        generate_phantom_dataset(tmp_path / "masks", tmp_path / "out", cases=["case_00099"], progress=False)


@needs_kits
def test_real_mask_crop(tmp_path: Path) -> None:
    """A crop of a real KiTS19 mask (kidneys + tumor, real geometry) through the file pipeline."""
    img = nib.load(str(KITS_DIR / "case_00149" / "segmentation.nii.gz"))
    labels = np.asarray(img.dataobj)[30:75, 190:370, 100:440]
    assert {1, 2} <= set(np.unique(labels))
    mask = _save_mask(tmp_path / "case_00149" / "segmentation.nii.gz", labels, img.affine)
    out = generate_phantom_case(mask, tmp_path / "out", seed=1)
    ct = np.asarray(nib.load(out / "imaging.nii.gz").dataobj)
    assert ct.shape == labels.shape and ct.dtype == np.int16
    np.testing.assert_allclose(nib.load(out / "imaging.nii.gz").affine, img.affine, atol=1e-5)
    # Kidney tissue is soft tissue (neither fat nor bone) on average, whatever the phase.
    assert -20 < ct[labels == 1].mean() < 300


def test_organ_lesions_are_unlabelled_hard_negatives() -> None:
    """Liver/spleen lesions: painted inside the organ only, with cyst or tumor-like densities."""
    from kitseg.phantom.anatomy import _paint_organ_lesions
    from kitseg.phantom.params import PhantomParams, sample_protocol

    spacing = (3.0, 2.0, 2.0)
    shape = (30, 64, 64)
    Z, Y, X = (np.arange(n, dtype=np.float32) * d for n, d in zip(shape, spacing))
    Z, Y, X = Z[:, None, None], Y[None, :, None], X[None, None, :]
    organ = np.zeros(shape, bool)
    organ[5:25, 10:50, 10:50] = True
    params = PhantomParams(organ_lesion_probability=1.0)
    changed_cases = 0
    for seed in range(6):
        rng = np.random.default_rng(seed)
        protocol = sample_protocol(rng, params)
        hu = np.full(shape, 60.0, np.float32)
        _paint_organ_lesions(hu, organ, spacing, protocol, params, rng, Z, Y, X)
        changed = hu != 60.0
        assert not changed[~organ].any()  # never outside the organ
        changed_cases += bool(changed.any())
        assert np.all((hu[changed] > -40) & (hu[changed] < 400))
    assert changed_cases >= 5
    rng = np.random.default_rng(0)
    hu = np.full(shape, 60.0, np.float32)
    _paint_organ_lesions(hu, organ, spacing, sample_protocol(rng, params), PhantomParams(organ_lesion_probability=0.0),
                         rng, Z, Y, X)
    assert np.all(hu == 60.0)
    with pytest.raises(ValueError, match="organ_lesion_probability"):
        PhantomParams(organ_lesion_probability=1.5)


def test_adrenals_and_splenic_lobules_are_unlabelled_and_change_nothing_else(label_map) -> None:
    """Hard negatives above the kidneys: painted outside them, and no other draw moves."""
    from scipy import ndimage

    labels, spacing = label_map
    with_them = synthesize_ct(labels, spacing, np.random.default_rng(2),
                              PhantomParams(adrenal_probability=1.0, adrenal_nodule_probability=1.0))
    without = synthesize_ct(labels, spacing, np.random.default_rng(2), PhantomParams(adrenal_probability=0.0))
    changed = with_them != without
    assert changed.sum() > 500
    assert not changed[ndimage.binary_erosion(labels > 0, iterations=2)].any()  # the kidneys keep their look
    kidney_distance_mm = ndimage.distance_transform_edt(labels == 0, sampling=spacing)
    assert np.percentile(kidney_distance_mm[changed], 90) < 60.0  # beside the kidneys, not anywhere
    with pytest.raises(ValueError, match="adrenal_probability"):
        PhantomParams(adrenal_probability=-0.1)


def test_radial_medulla_lies_under_the_cortex_and_narrows_towards_the_sinus() -> None:
    """Pyramids: none in the cortex, widest at their bases under it, narrow at their tips."""
    from scipy import ndimage

    from kitseg.phantom.kidney import radial_pyramids

    spacing = (2.0, 1.5, 1.5)
    z, y, x = np.ogrid[:64, :48, :40]
    kidney = ((z - 31.5) * 2 / 55) ** 2 + ((y - 23.5) * 1.5 / 30) ** 2 + ((x - 19.5) * 1.5 / 25) ** 2 < 1  # 11x6x5 cm
    depth, nearest_outside = ndimage.distance_transform_edt(kidney, sampling=spacing, return_indices=True)
    depth = depth.astype(np.float32)
    for seed in range(3):
        medulla = radial_pyramids(depth, nearest_outside, spacing, 6.0, 14.0, np.random.default_rng(seed))
        assert medulla.shape == kidney.shape and 0.0 <= medulla.min() and medulla.max() <= 1.0

        def share(low_mm: float, high_mm: float) -> float:
            return float(medulla[(depth > low_mm) & (depth < high_mm)].mean())

        assert medulla[(depth > 0) & (depth < 4.0)].max() < 0.15  # the cortex
        assert share(7.0, 9.0) > 0.3 and share(12.5, 14.0) < 0.7 * share(7.0, 9.0)
    np.testing.assert_array_equal(radial_pyramids(depth, nearest_outside, spacing, 6.0, 14.0, np.random.default_rng(1)),
                                  radial_pyramids(depth, nearest_outside, spacing, 6.0, 14.0, np.random.default_rng(1)))


def test_medulla_pattern_is_a_validated_parameter(label_map) -> None:
    labels, spacing = label_map
    params = PhantomParams(medulla="blobs")
    assert PhantomParams.from_dict(params.to_dict()) == params and PhantomParams().medulla == "radial"
    with pytest.raises(ValueError, match="medulla"):
        PhantomParams(medulla="cones")
    rng = np.random.default_rng
    old = synthesize_ct(labels, spacing, rng(3), PhantomParams(medulla="blobs", phases=("arterial",), phase_weights=(1.0,)))
    new = synthesize_ct(labels, spacing, rng(3), PhantomParams(phases=("arterial",), phase_weights=(1.0,)))
    assert not np.array_equal(old[labels == 1], new[labels == 1])


def test_vertebral_density_range_changes_only_the_bone(label_map) -> None:
    from kitseg.phantom.params import sample_protocol

    wide, legacy = PhantomParams(), PhantomParams(cancellous_bone_hu=None)
    for params in (wide, legacy, PhantomParams(cancellous_bone_hu=(100.0, 120.0))):
        assert PhantomParams.from_dict(params.to_dict()) == params
    with pytest.raises(ValueError, match="cancellous_bone_hu"):
        PhantomParams(cancellous_bone_hu=(250.0, 70.0))
    bone = {"wide": [], "legacy": []}
    for seed in range(300):
        a, b = sample_protocol(np.random.default_rng(seed), wide), sample_protocol(np.random.default_rng(seed), legacy)
        assert {k: v for k, v in a.hu.items() if k != "bone_cancellous"} == {k: v for k, v in b.hu.items() if k != "bone_cancellous"}
        bone["wide"].append(a.hu["bone_cancellous"])
        bone["legacy"].append(b.hu["bone_cancellous"])
    low, high = wide.cancellous_bone_hu
    assert low <= min(bone["wide"]) < 100.0 and 220.0 < max(bone["wide"]) <= high  # osteoporotic to young
    assert min(bone["legacy"]) > 100.0  # why it was widened: never an osteoporotic vertebra
    # Same draw mapped onto the range: the same case, other vertebrae only.
    labels, spacing = label_map
    old = synthesize_ct(labels, spacing, np.random.default_rng(4), legacy)
    new = synthesize_ct(labels, spacing, np.random.default_rng(4), wide)
    changed = old != new
    assert changed.any() and changed.mean() < 0.05
    np.testing.assert_array_equal(old[labels > 0], new[labels > 0])


def test_extra_tumors_grow_inside_the_kidney_and_the_files_agree(tmp_path: Path, label_map) -> None:
    from scipy import ndimage

    from kitseg.phantom import add_synthetic_tumors

    labels, spacing = label_map
    voxel_ml = float(np.prod(spacing)) / 1000.0
    grown = add_synthetic_tumors(labels, spacing, np.random.default_rng(0), count=3, volume_ml=(1.0, 8.0))
    assert grown.dtype == np.uint8 and grown.shape == labels.shape
    np.testing.assert_array_equal(grown[labels == 2], 2)  # the real tumor stays
    new = (grown == 2) & (labels != 2)
    pieces, n = ndimage.label(new)
    sizes = ndimage.sum(new, pieces, range(1, n + 1)) * voxel_ml
    assert n >= 1 and sizes.max() <= 8.0 * 1.5  # volume drawn in range, outline wobble aside
    # Each grows out of kidney; what lies outside the old kidney touches it (a bulge, not a new organ).
    assert all((labels[pieces == i] == 1).any() for i in range(1, n + 1)) and (labels[new] == 1).mean() > 0.4
    bulge = new & (labels == 0)
    largest_radius_mm = 1.1 * (3 * 8000.0 / (4 * np.pi)) ** (1 / 3)  # 8 mL, the widest axis ratios
    assert bulge.any() and ndimage.distance_transform_edt(labels == 0, sampling=spacing)[bulge].max() <= 0.6 * largest_radius_mm
    np.testing.assert_array_equal(add_synthetic_tumors(labels, spacing, np.random.default_rng(0), 3, (1.0, 8.0)), grown)
    np.testing.assert_array_equal(add_synthetic_tumors(np.zeros_like(labels), spacing, np.random.default_rng(0), 2, (1.0, 8.0)), 0)

    # The case keeps its protocol (drawn first): same phase, tissue values and scanner.
    _, with_tumors = synthesize_ct_with_protocol(grown, spacing, np.random.default_rng(2))
    _, without = synthesize_ct_with_protocol(labels, spacing, np.random.default_rng(2))
    assert with_tumors == without

    # Through the case writer: the segmentation holds the new tumors and the image paints them.
    with pytest.raises(ValueError, match="extra_tumors"):
        PhantomParams(extra_tumors=(2, 1))
    with pytest.raises(ValueError, match="extra_tumor_ml"):
        PhantomParams(extra_tumor_ml=(0.0, 5.0))
    params = PhantomParams(extra_tumors=(2, 2), extra_tumor_ml=(2.0, 6.0))
    assert PhantomParams.from_dict(params.to_dict()) == params
    mask = _save_mask(tmp_path / "masks" / "case_00005" / "segmentation.nii.gz", labels, _kits_affine(spacing))
    plain = generate_phantom_case(mask, tmp_path / "plain", seed=1)
    extra = generate_phantom_case(mask, tmp_path / "extra", seed=1, params=params)
    read = lambda p, name: np.asarray(nib.load(p / name).dataobj)  # noqa: E731
    seg, img = read(extra, "segmentation.nii.gz"), read(extra, "imaging.nii.gz")
    np.testing.assert_array_equal(read(plain, "segmentation.nii.gz"), labels)
    added = (seg == 2) & (labels != 2)
    assert added.sum() * voxel_ml > 2.0
    assert (seg[labels == 2] == 2).all() and set(np.unique(seg)) <= {0, 1, 2}
    assert not np.array_equal(read(plain, "imaging.nii.gz")[added], img[added])
    np.testing.assert_allclose(nib.load(extra / "segmentation.nii.gz").affine, nib.load(extra / "imaging.nii.gz").affine)


def test_hypervascular_enhancement_range_makes_tumors_brighter_than_the_kidney(label_map) -> None:
    from kitseg.phantom.kidney import sample_tumor_look
    from kitseg.phantom.params import sample_protocol

    bright = PhantomParams(hypervascular_probability=1.0, hypervascular_enhancement=(1.5, 1.8))
    assert PhantomParams.from_dict(bright.to_dict()) == bright
    for bad in ({"hypervascular_probability": 1.2}, {"hypervascular_enhancement": (1.8, 0.6)},
                {"hypervascular_enhancement": (-0.1, 1.0)}):
        with pytest.raises(ValueError, match="hypervascular"):
            PhantomParams(**bad)
    protocol = sample_protocol(np.random.default_rng(0), PhantomParams(phases=("arterial",), phase_weights=(1.0,)))
    ratios = {name: [sample_tumor_look(np.random.default_rng(seed), protocol, params).enhancement_ratio
                     for seed in range(200)]
              for name, params in (("default", PhantomParams()), ("bright", bright),
                                   ("weak", PhantomParams(hypervascular_probability=0.0)))}
    assert max(ratios["default"]) <= 1.3 and max(ratios["weak"]) <= 0.65 and min(ratios["bright"]) >= 1.5
    # The whole image: an arterial tumor enhancing 1.5-1.8 times the cortex outshines its kidney;
    # a weakly enhancing one stays darker.
    labels, spacing = label_map
    arterial = {"phases": ("arterial",), "phase_weights": (1.0,)}
    images = {name: synthesize_ct(labels, spacing, np.random.default_rng(3), PhantomParams(**arterial, **extra))
              for name, extra in (("bright", {"hypervascular_probability": 1.0, "hypervascular_enhancement": (1.5, 1.8)}),
                                  ("weak", {"hypervascular_probability": 0.0}))}
    kidney, tumor = labels == 1, labels == 2
    for name, image in images.items():
        brighter = np.median(image[tumor]) > np.median(image[kidney])
        assert brighter == (name == "bright"), name


def test_the_recipes_phantom_parameter_files_are_valid() -> None:
    """Every ``--params`` file the shipped model's recipe names loads: a typo would stop a retrain halfway."""
    import json
    import re

    root = Path(__file__).resolve().parents[1]
    recipe = (root / "scripts" / "train_default_model.sh").read_text()
    named = sorted(set(re.findall(r"(scripts/phantoms_\w+\.json)", recipe)))
    assert len(named) >= 4, named
    for name in named:
        params = PhantomParams.from_dict(json.loads((root / name).read_text()))
        assert PhantomParams.from_dict(params.to_dict()) == params, name


def test_ureters_are_unlabelled_water_beside_and_below_the_kidneys_and_change_nothing_else(label_map) -> None:
    """The renal pelvis leaving the hilum and the ureters: outside the mask, urine-dense, only there."""
    from scipy import ndimage

    labels, spacing = label_map
    drawn = dict(phases=("none",), phase_weights=(1.0,))
    with_them, protocol = synthesize_ct_with_protocol(labels, spacing, np.random.default_rng(2),
                                                      PhantomParams(ureter_probability=1.0, **drawn))
    without = synthesize_ct(labels, spacing, np.random.default_rng(2), PhantomParams(**drawn))
    changed = with_them != without
    assert changed.sum() > 200
    assert not changed[ndimage.binary_erosion(labels > 0, iterations=2)].any()  # the kidneys keep their look
    # Through fat only (they push fat aside, not muscle or bone)...
    assert np.median(without[changed]) < -50.0
    # ... urine-dense where they are, with the scanner's noise and blur on top.
    assert abs(np.median(with_them[changed].astype(float)) - protocol.hu["urine"]) < 40.0
    # They start at the kidneys and run down below them.
    kidney_distance_mm = ndimage.distance_transform_edt(labels == 0, sampling=spacing)
    assert kidney_distance_mm[changed].min() < 5.0
    lowest_kidney_slice = np.flatnonzero((labels > 0).any(axis=(1, 2))).max()
    assert changed[lowest_kidney_slice + 1:].any()
    # Medial: at the kidneys' levels they lie between each kidney's centre and the spine (midway).
    pieces, _ = ndimage.label(labels > 0)
    centres_x = sorted(c[2] for c in ndimage.center_of_mass(labels > 0, pieces, [1, 2]))
    midline = 0.5 * sum(centres_x)
    z, _, x = np.nonzero(changed[: lowest_kidney_slice + 1])
    inward = np.where(x < midline, x > centres_x[0], x < centres_x[1])
    assert inward.mean() > 0.9
    with pytest.raises(ValueError, match="ureter_probability"):
        PhantomParams(ureter_probability=1.5)
    import json  # the file the docs name for training data with them

    shipped = Path(__file__).resolve().parents[1] / "scripts" / "phantoms_ureters.json"
    assert PhantomParams.from_dict(json.loads(shipped.read_text())).ureter_probability == 0.9


def test_scores_by_draw_groups_scores_by_each_cases_record(tmp_path: Path, label_map) -> None:
    import subprocess
    import sys

    from kitseg.metrics import kits_scores, write_scores_csv

    labels, spacing = label_map
    masks, phantoms = tmp_path / "masks", tmp_path / "phantoms"
    for case in ("case_00001", "case_00002"):
        _save_mask(masks / case / "segmentation.nii.gz", labels, _kits_affine(spacing))
    generate_phantom_dataset(masks, phantoms, seed=5, progress=False)
    empty = np.zeros_like(labels)  # case 1 found nothing, case 2 all
    scores = [kits_scores(empty, labels, spacing, case="case_00001"), kits_scores(labels, labels, spacing, case="case_00002")]
    csv_path = write_scores_csv(scores, tmp_path / "scores.csv")
    script = Path(__file__).resolve().parents[1] / "scripts" / "scores_by_draw.py"
    out = subprocess.run([sys.executable, str(script), str(csv_path), str(phantoms)], capture_output=True, text=True,
                         check=True).stdout
    rows = {line[:26].strip(): line[26:].split() for line in out.splitlines()[1:]}
    assert rows["all"][:3] == ["2", "0.5000", "0.500"] and rows["all"][3:] == ["1", "of", "2"]
    phases = [json.loads((phantoms / c / "phantom.json").read_text())["protocol"]["phase"] for c in ("case_00001", "case_00002")]
    for phase in set(phases):
        assert rows[f"phase {phase}"][0] == str(phases.count(phase))
    measured = [json.loads((phantoms / c / "phantom.json").read_text())["measured_tumor"] for c in ("case_00001", "case_00002")]
    signed = [m["tumor_hu_mean"] - m["kidney_near_tumor_hu_mean"] for m in measured]
    assert rows["darker by >= 15 HU"][0] == str(sum(d <= -15 for d in signed))
    assert rows["brighter by >= 15 HU"][0] == str(sum(d >= 15 for d in signed))
    (phantoms / "case_00002" / "phantom.json").unlink()
    failed = subprocess.run([sys.executable, str(script), str(csv_path), str(phantoms)], capture_output=True, text=True)
    assert failed.returncode != 0 and "case_00002/phantom.json: not found" in failed.stderr


def test_an_interrupted_commands_workers_stop_at_once_not_after_their_case() -> None:
    """Ctrl-C or SIGTERM while workers draw phantoms (or prepare training cases): they are stopped,
    not left a minute to finish, nor orphaned by a second signal that kills their parent."""
    import time
    from concurrent.futures import ProcessPoolExecutor

    from kitseg.parallel import stop_workers

    pool = ProcessPoolExecutor(max_workers=2)
    try:
        running = [pool.submit(time.sleep, 60) for _ in range(2)]  # two cases being drawn
        deadline = time.monotonic() + 30
        while not all(f.running() for f in running) and time.monotonic() < deadline:
            time.sleep(0.05)
        processes = list(pool._processes.values())
        start = time.monotonic()
        stop_workers(pool)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    assert time.monotonic() - start < 20  # not the 60 s their work would take
    assert all(not p.is_alive() for p in processes)


def test_a_training_runs_record_of_its_phantoms_redraws_them(tmp_path: Path, label_map) -> None:
    """training.data.phantom_draws (a model's provenance "phantoms"): each case's seed and parameter
    set, which with its mask redraw the case voxel for voxel; real cases are not in it."""
    from kitseg.config import label_mapping
    from kitseg.io import discover_inputs
    from kitseg.phantom import PhantomParams
    from kitseg.phantom.realistic import generate_phantom_case
    from kitseg.training.data import phantom_draws

    labels, spacing = label_map
    masks = tmp_path / "masks"
    for case in ("case_00001", "case_00002"):
        _save_mask(masks / case / "segmentation.nii.gz", labels, _kits_affine(spacing))
    data = tmp_path / "data"
    generate_phantom_dataset(masks, data, cases=["case_00001"], seed=3, progress=False)
    bright = PhantomParams.from_dict({"extra_tumors": [1, 1]})
    generate_phantom_dataset(masks, data, cases=["case_00002"], seed=7, progress=False, params=bright)
    make_synthetic_case(shape=(8, 20, 20), seed=0).save_case_folder(data / "case_00009")  # no record: real, say
    draws = phantom_draws(discover_inputs(data))
    assert set(draws["cases"]) == {"case_00001", "case_00002"} and len(draws["params"]) == 2
    seed, index = draws["cases"]["case_00002"]
    drawn = draws["params"][index]
    again = generate_phantom_case(masks / "case_00002" / "segmentation.nii.gz", tmp_path / "again", seed,
                                  PhantomParams.from_dict(drawn["params"]), label_mapping(drawn["label_mapping"]))
    for name in ("imaging.nii.gz", "segmentation.nii.gz"):
        np.testing.assert_array_equal(np.asarray(nib.load(again / name).dataobj),
                                      np.asarray(nib.load(data / "case_00002" / name).dataobj))
    assert phantom_draws(discover_inputs(data)[-1:]) is None  # real data only: nothing to record
