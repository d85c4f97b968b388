"""`kits-seg` end to end on synthetic cases: outputs overlay their inputs, errors are one clear line."""

from __future__ import annotations

import csv
import dataclasses
import gzip
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from kitseg.checkpoint import save_bundle
from kitseg.cli import main
from kitseg.config import MaskConfig
from kitseg.phantom import make_synthetic_case
from kitseg.training.config import preset

from .conftest import make_affine


@pytest.fixture(scope="module")
def weights(tmp_path_factory, tiny_bundle):
    return save_bundle(tiny_bundle, tmp_path_factory.mktemp("w") / "tiny.kseg")


@pytest.fixture(scope="module")
def cases(tmp_path_factory):
    root = tmp_path_factory.mktemp("cases")
    for i, seed in enumerate((1, 2)):
        make_synthetic_case(shape=(18, 36, 40), spacing=(3.0, 1.6, 1.6), seed=seed).save_case_folder(
            root / f"case_{i:05d}"
        )
    return root


def test_predict_case_folder_writes_kits_name_on_the_input_grid(tmp_path, cases, weights):
    out = tmp_path / "out"
    assert main(["predict", str(cases / "case_00001"), "-o", str(out), "--weights", str(weights)]) == 0
    pred = nib.load(str(out / "prediction_00001.nii.gz"))
    ct = nib.load(str(cases / "case_00001" / "imaging.nii.gz"))
    assert pred.shape == ct.shape
    np.testing.assert_allclose(pred.affine, ct.affine)
    assert pred.get_data_dtype() == np.uint8
    assert set(np.unique(np.asarray(pred.dataobj))) <= {0, 1, 2}


def test_predict_file_in_ras_with_intermediates(tmp_path, weights):
    case = make_synthetic_case(shape=(16, 30, 34), spacing=(2.0, 1.5, 1.5), seed=5)
    ras_ct = np.ascontiguousarray(case.ct.transpose(2, 1, 0))  # a file stored (x, y, z)
    affine = make_affine("ras", (2.0, 1.5, 1.5))
    src = tmp_path / "scan.nii.gz"
    nib.save(nib.Nifti1Image(ras_ct, affine), str(src))
    out = tmp_path / "out"
    args = ["predict", str(src), "-o", str(out), "--weights", str(weights), "--save-intermediates"]
    assert main(args) == 0
    for name in ("scan_labels", "scan_y1", "scan_mask", "scan_probs"):
        img = nib.load(str(out / f"{name}.nii.gz"))
        assert img.shape[:3] == ras_ct.shape, name
        np.testing.assert_allclose(img.affine, affine, err_msg=name)
    y1 = nib.load(str(out / "scan_y1.nii.gz")).get_fdata()
    assert 0.0 <= y1.min() and y1.max() <= 1.0
    probs = nib.load(str(out / "scan_probs.nii.gz")).get_fdata()
    assert probs.shape == ras_ct.shape + (3,)
    np.testing.assert_allclose(probs.sum(axis=-1), 1.0, atol=0.02)
    # Read back by the engine, channels last, each channel oriented as read_volume orients a
    # 3D file holding it alone.
    from kitseg.io import read_probabilities, read_volume

    internal_probs = read_probabilities(out / "scan_probs.nii.gz")
    assert internal_probs.array.shape == read_volume(src).shape + (3,)
    for c in range(3):
        alone = tmp_path / f"class{c}.nii.gz"
        nib.save(nib.Nifti1Image(probs[..., c].astype(np.float32), affine), str(alone))
        np.testing.assert_allclose(internal_probs.array[..., c], read_volume(alone).array, atol=1e-6)
    y1_path = out / "scan_y1.nii.gz"
    np.testing.assert_allclose(read_probabilities(y1_path).array, read_volume(y1_path, integer_ok=False).array)
    # A second run refuses to replace the outputs, naming one; --overwrite replaces them.
    assert main(args) == 2
    assert main(args + ["--overwrite"]) == 0


def test_predict_a_4d_file_of_one_volume_gives_the_same_labels_on_its_3d_grid(tmp_path, cases, weights):
    # Some converters store a single volume as (X, Y, Z, 1): segmented as the 3D volume it holds.
    ct = nib.load(str(cases / "case_00000" / "imaging.nii.gz"))
    as_4d = tmp_path / "in4d" / "scan.nii.gz"
    as_4d.parent.mkdir()
    nib.save(nib.Nifti1Image(np.asarray(ct.dataobj)[..., None], ct.affine), str(as_4d))
    out = tmp_path / "out"
    assert main(["predict", str(as_4d), "-o", str(out), "--weights", str(weights)]) == 0
    assert main(["predict", str(cases / "case_00000"), "-o", str(out), "--weights", str(weights)]) == 0
    labels = nib.load(str(out / "scan_labels.nii.gz"))
    assert labels.shape == ct.shape
    np.testing.assert_allclose(labels.affine, ct.affine)
    from_3d = nib.load(str(out / "prediction_00000.nii.gz"))
    np.testing.assert_array_equal(np.asarray(labels.dataobj), np.asarray(from_3d.dataobj))


def test_an_interrupted_folder_run_is_finished_with_skip_existing(tmp_path, cases, weights, capsys, caplog):
    out = tmp_path / "out"
    args = ["predict", str(cases), "-o", str(out), "--weights", str(weights), "--save-intermediates"]
    assert main(args) == 0
    first = (out / "prediction_00000.nii.gz").stat().st_mtime_ns
    labels_1 = (out / "prediction_00001.nii.gz").stat().st_mtime_ns
    (out / "prediction_00001_probs.nii.gz").unlink()  # stopped while writing case 1's last output
    assert main(args) == 2
    assert "--skip-existing to segment only the cases without outputs" in capsys.readouterr().err
    with caplog.at_level("INFO"):
        assert main(args + ["--skip-existing"]) == 0
    assert "1 of 2 case(s) have all their outputs already and are left as they are" in caplog.text
    assert (out / "prediction_00000.nii.gz").stat().st_mtime_ns == first  # left as it was
    assert (out / "prediction_00001_probs.nii.gz").is_file()  # case 1's missing output written
    assert (out / "prediction_00001.nii.gz").stat().st_mtime_ns == labels_1  # and its labels kept as they were
    with pytest.raises(SystemExit):  # one or the other
        main(args + ["--skip-existing", "--overwrite"])
    capsys.readouterr()
    assert main(args + ["--skip-existing"]) == 0
    assert "every case has its outputs already; nothing to do" in capsys.readouterr().out


def test_predict_says_which_mask_rule_it_applies(tmp_path, cases, weights, caplog):
    from kitseg.checkpoint import load_bundle

    mm_model = tmp_path / "mm.kseg"
    save_bundle(dataclasses.replace(load_bundle(weights), mask=MaskConfig(0.5, 20.0, "mm")), mm_model)
    out = tmp_path / "out"
    with caplog.at_level("INFO"):
        assert main(["predict", str(cases / "case_00000"), "-o", str(out), "--weights", str(mm_model),
                     "--radius", "20"]) == 0
    assert "--radius 20 is read in stage-grid voxels; this model's own radius is in mm" in caplog.text
    assert "stage-2 mask: y1 >= 0.5 dilated by 20 voxels (the model's: y1 >= 0.5 dilated by 20 mm)" in caplog.text
    caplog.clear()
    with caplog.at_level("INFO"):  # a unit alone changes nothing for a model in mm: said so
        assert main(["predict", str(cases / "case_00000"), "-o", str(out), "--weights", str(mm_model),
                     "--radius-mm", "--overwrite"]) == 0
    assert "--radius-mm without --radius: the model's own radius, 20 mm, applies" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING"):  # replacing the labels alone: the earlier run's intermediates are named
        assert main(["predict", str(cases / "case_00000"), "-o", str(out), "--weights", str(weights),
                     "--save-intermediates", "--overwrite"]) == 0
        assert main(["predict", str(cases / "case_00000"), "-o", str(out), "--weights", str(weights),
                     "--overwrite"]) == 0
    assert "3 intermediate file(s) of an earlier run stay as they were" in caplog.text


def test_predict_cleanup_only_removes_whole_pieces(tmp_path, cases, weights):
    """By default stray pieces go and minor tumor calls become kidney (kitseg.postprocess);
    --no-cleanup keeps the raw labels."""
    from scipy import ndimage

    from kitseg.postprocess import CleanupRules, remove_stray_components

    case = str(cases / "case_00000")
    base = ["predict", case, "--weights", str(weights)]
    assert main(base + ["-o", str(tmp_path / "clean")]) == 0
    assert main(base + ["-o", str(tmp_path / "raw"), "--no-cleanup"]) == 0
    clean = np.asarray(nib.load(str(tmp_path / "clean" / "prediction_00000.nii.gz")).dataobj)
    raw = np.asarray(nib.load(str(tmp_path / "raw" / "prediction_00000.nii.gz")).dataobj)
    expected = raw.copy()
    remove_stray_components(expected, CleanupRules())
    np.testing.assert_array_equal(clean, expected)
    # Every piece of the raw map is either kept whole or cleared whole; within a kept piece,
    # only tumor becomes kidney.
    pieces, count = ndimage.label(raw > 0, structure=ndimage.generate_binary_structure(3, 1))
    for piece in range(1, count + 1):
        inside = pieces == piece
        changed = clean[inside] != raw[inside]
        assert not clean[inside].any() or (clean[inside].all() and np.all(raw[inside][changed] == 2)
                                            and np.all(clean[inside][changed] == 1))


@pytest.mark.parametrize(("flags", "mode"), [(["--mirror"], "both"), (["--mirror", "stage2"], "stage2")])
def test_predict_with_mirroring_writes_the_mirrored_average(tmp_path, cases, weights, flags, mode):
    from kitseg.io import read_ct
    from kitseg.pipeline import Segmenter

    case = cases / "case_00000"
    assert main(["predict", str(case), "--weights", str(weights), "-o", str(tmp_path), *flags, "--no-cleanup"]) == 0
    written = np.asarray(nib.load(str(tmp_path / "prediction_00000.nii.gz")).dataobj)
    volume = read_ct(case / "imaging.nii.gz")
    expected = Segmenter.from_file(weights, device="cpu", mirror=mode).segment(volume, cleanup=None).labels
    np.testing.assert_array_equal(written, volume.source.to_source(expected))


@pytest.mark.parametrize("weight", [None, "0", "0.4"])
def test_predict_reads_kidney_or_tumor_with_the_asked_slice_smoothing(tmp_path, cases, weights, weight):
    from kitseg.io import read_ct
    from kitseg.pipeline import TUMOR_SLICE_SMOOTHING, Segmenter

    case = cases / "case_00000"
    flags = [] if weight is None else ["--tumor-smoothing", weight]
    assert main(["predict", str(case), "--weights", str(weights), "-o", str(tmp_path), *flags, "--no-cleanup"]) == 0
    written = np.asarray(nib.load(str(tmp_path / "prediction_00000.nii.gz")).dataobj)
    volume = read_ct(case / "imaging.nii.gz")
    smoothing = TUMOR_SLICE_SMOOTHING if weight is None else float(weight)
    expected = Segmenter.from_file(weights, device="cpu", tumor_slice_smoothing=smoothing).segment(volume, cleanup=None)
    np.testing.assert_array_equal(written, volume.source.to_source(expected.labels))


def test_predict_folder_then_evaluate_csv(tmp_path, cases, weights, capsys):
    out = tmp_path / "out"
    assert main(["predict", str(cases), "-o", str(out), "--weights", str(weights)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["prediction_00000.nii.gz", "prediction_00001.nii.gz"]
    csv_path = tmp_path / "scores.csv"
    assert main(["evaluate", "--pred", str(out), "--gt", str(cases), "--csv", str(csv_path)]) == 0
    rows = list(csv.DictReader(csv_path.open()))
    assert [r["case"] for r in rows[:2]] == ["case_00000", "case_00001"]
    for column in ("kidney_dice", "tumor_dice", "composite_dice", "kidney_ml", "tumor_ml"):
        assert column in rows[0]
    # Each case's line says what was found, in the volumes evaluate measures.
    said = dict(re.findall(r"^(case_\d+): (.*?); prediction_", capsys.readouterr().out, re.M))
    for row in rows[:2]:
        kidney, tumor = float(row["kidney_ml"]), float(row["tumor_ml"])
        if kidney == 0:
            assert said[row["case"]] == "no kidney found"
            continue
        numbers = [float(v) for v in re.findall(r"[\d.]+(?= mL)", said[row["case"]])]
        assert numbers == pytest.approx([kidney, tumor] if tumor else [kidney], abs=0.051)
        assert said[row["case"]].endswith(" mL" if tumor else ", no tumor")


def test_evaluate_ground_truth_against_itself_is_perfect(tmp_path, cases, capsys):
    pred = tmp_path / "pred"
    pred.mkdir()
    for case in ("case_00000", "case_00001"):
        seg = nib.load(str(cases / case / "segmentation.nii.gz"))
        nib.save(seg, str(pred / case.replace("case_", "prediction_") ) + ".nii.gz")
    csv_path = tmp_path / "s.csv"
    assert main(["evaluate", "--pred", str(pred), "--gt", str(cases), "--csv", str(csv_path)]) == 0
    rows = list(csv.DictReader(csv_path.open()))
    assert all(float(r["kidney_dice"]) == 1.0 and float(r["tumor_dice"]) == 1.0 for r in rows)
    assert all(r["tumors_found"] == r["ref_tumors"] and r["false_tumors"] == "0" for r in rows[:2])
    found = sum(int(r["tumors_found"]) for r in rows[:2])
    assert f"a tumor counts when at least 0.5 of it is labelled tumor): {found} of {found} (100%)" in capsys.readouterr().out
    for bad in ("0", "half"):
        with pytest.raises(SystemExit):
            main(["evaluate", "--pred", str(pred), "--gt", str(cases), "--found-share", bad])
        assert f"--found-share: must be a number in (0, 1], got {bad}" in capsys.readouterr().err

    # Two thirds of case_00000's tumor relabelled kidney: missed at the default half, found at 0.3.
    seg = nib.load(str(cases / "case_00000" / "segmentation.nii.gz"))
    labels = np.asarray(seg.dataobj).copy()
    tumor = np.flatnonzero(labels == 2)
    labels.flat[tumor[: 2 * tumor.size // 3]] = 1
    nib.save(nib.Nifti1Image(labels, seg.affine, seg.header), str(pred / "prediction_00000.nii.gz"))
    counts = {}
    for share in ("0.5", "0.3"):
        report = tmp_path / f"found_{share}.csv"
        assert main(["evaluate", "--pred", str(pred), "--gt", str(cases), "--csv", str(report), "--found-share", share]) == 0
        row = next(csv.DictReader(report.open()))
        assert float(row["found_share"]) == float(share) and row["label_mapping"] == ""
        counts[share] = (int(row["ref_tumors"]), int(row["tumors_found"]))
    assert counts["0.5"] == (counts["0.5"][0], counts["0.5"][0] - 1) and counts["0.3"][1] == counts["0.3"][0]

    # The same counts pooled by tumor size, tumor by tumor.
    total = sum(int(r["ref_tumors"]) for r in csv.DictReader((tmp_path / "found_0.5.csv").open()) if r["case"] != "mean")
    study = subprocess.run([sys.executable, str(Path(__file__).parents[1] / "scripts" / "tumor_detection_study.py"),
                            str(pred), str(cases), "--found-shares", "0.5", "0.3"], capture_output=True, text=True)
    assert study.returncode == 0, study.stderr
    assert f"2 cases, {total} reference tumors" in study.stdout
    assert f"found (at least 0.5 labelled tumor): {total - 1} of {total}" in study.stdout
    assert f"found (at least 0.3 labelled tumor): {total} of {total}" in study.stdout
    assert "false tumor pieces: 0 in 0 of 2 cases" in study.stdout


def test_errors_are_one_line_naming_the_input(tmp_path, weights, capsys):
    assert main(["predict", str(tmp_path / "nope.nii.gz"), "-o", str(tmp_path), "--weights", str(weights)]) == 2
    err = capsys.readouterr().err
    assert "nope.nii.gz: no such file" in err and err.count("\n") == 1
    bad = tmp_path / "bad.nii.gz"
    bad.write_bytes(b"\x00" * 10)
    assert main(["predict", str(bad), "-o", str(tmp_path / "o"), "--weights", str(weights)]) == 2
    assert "bad.nii.gz: cannot be read as NIfTI" in capsys.readouterr().err
    pickled = tmp_path / "model.kseg"
    pickled.write_bytes(b"\x80\x04K\x01.")
    case = make_synthetic_case(shape=(8, 20, 20), seed=0)
    case.save_case_folder(tmp_path / "case_00009")
    assert main(["predict", str(tmp_path / "case_00009"), "-o", str(tmp_path / "o"), "--weights", str(pickled)]) == 2
    assert "model.kseg" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()  # a run refused before it began leaves no output folder behind
    (tmp_path / "afile").write_text("")
    assert main(["predict", str(tmp_path / "case_00009"), "-o", str(tmp_path / "afile" / "out"),
                 "--weights", str(weights)]) == 2
    assert f"cannot create the output folder ({tmp_path / 'afile'} is a file)" in capsys.readouterr().err


def test_a_full_disk_is_one_line_naming_the_output_and_the_earlier_file_stays(tmp_path, cases, weights, capsys,
                                                                                monkeypatch):
    import errno

    out = tmp_path / "out"
    assert main(["predict", str(cases / "case_00000"), "-o", str(out), "--weights", str(weights)]) == 0
    written = out / "prediction_00000.nii.gz"
    before = written.read_bytes()

    def disk_full(img, filename):  # as gzip's write() fails on a full disk: no file named
        Path(filename).write_bytes(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("kitseg.io.nib.save", disk_full)
    assert main(["predict", str(cases / "case_00000"), "-o", str(out), "--weights", str(weights), "--overwrite"]) == 1
    err = capsys.readouterr().err
    assert err == f"kits-seg: error: No space left on device: {written}\n"
    assert written.read_bytes() == before and [p.name for p in out.iterdir()] == [written.name]  # no partial file


def test_a_read_only_output_folder_is_one_line_naming_the_output_not_a_temporary_file(tmp_path, cases, weights,
                                                                                       capsys, monkeypatch):
    import errno
    import tempfile

    def read_only(prefix, suffix, dir):  # as on a read-only mount (root ignores a chmod'ed folder)
        raise OSError(errno.EROFS, "Read-only file system", str(Path(dir) / f"{prefix}x1y2{suffix}"))

    monkeypatch.setattr(tempfile, "mkstemp", read_only)
    out = tmp_path / "out"
    assert main(["predict", str(cases / "case_00000"), "-o", str(out), "--weights", str(weights)]) == 1
    assert capsys.readouterr().err == f"kits-seg: error: Read-only file system: {out / 'prediction_00000.nii.gz'}\n"


def test_info_prints_metadata(weights, capsys):
    assert main(["info", "--weights", str(weights)]) == 0
    out = capsys.readouterr().out
    assert "devices:" in out and "unetpp2d" in out and "  version: kitseg " in out and len(out.splitlines()) < 30
    assert main(["info", "--weights", str(weights), "--json"]) == 0
    meta = json.loads(capsys.readouterr().out)  # the whole record, machine-readable
    assert meta["schema_version"] >= 1 and "stages" in meta


def test_info_says_where_the_shipped_model_came_from(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    # The provenance, followed to its runs (every member of a stage-2 ensemble).
    assert "  stage 1: trained " in out
    stage2 = next(line for line in out.splitlines() if line.startswith("  stage 2: "))
    members = stage2.removeprefix("  stage 2: ").split(" | ")
    if members[0].startswith("ensemble of "):
        count, members[0] = members[0].removeprefix("ensemble of ").split(": ", 1)
        assert int(count) == len(members) >= 2, stage2
    assert all(member.startswith("trained ") for member in members), stage2


def test_info_into_a_closed_pipe_stops_quietly(weights):
    """`kits-seg info | head`: the reader leaves before the end; no traceback, the Unix SIGPIPE status."""
    import os
    import subprocess
    import sys

    # `true` exits at once, so the pipe is closed before kits-seg writes a byte.
    shell = f"set -o pipefail; {sys.executable} -m kitseg.cli info --weights {weights} | true"
    result = subprocess.run(["bash", "-c", shell], capture_output=True, text=True,
                            env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")})
    assert "Traceback" not in result.stderr and "BrokenPipe" not in result.stderr, result.stderr
    assert result.returncode == 141


def test_shipped_default_model_segments_the_sample(tmp_path, capsys):
    """No --weights: the model inside the package, on the built-in sample case (kits-seg sample)."""
    assert main(["sample", "--out", str(tmp_path)]) == 0
    out = tmp_path / "out"
    assert main(["predict", str(tmp_path / "case_00000"), "-o", str(out), "--device", "cpu"]) == 0
    assert main(["evaluate", "--pred", str(out), "--gt", str(tmp_path), "--csv", str(tmp_path / "s.csv")]) == 0
    rows = list(csv.DictReader((tmp_path / "s.csv").open()))
    # A trained model finds the sample's kidneys; the random tiny one scores near 0.
    assert float(rows[0]["kidney_dice"]) > 0.7
    assert main(["info"]) == 0
    assert "default.kseg" in capsys.readouterr().out


# ---------------------------------------------------------------------------- bad input, nothing lost
def test_evaluate_report_never_replaces_an_input_or_an_earlier_report(tmp_path, cases, capsys):
    gt = cases / "case_00000" / "segmentation.nii.gz"
    before = gt.read_bytes()
    assert main(["evaluate", "--pred", str(gt), "--gt", str(gt), "--csv", str(gt), "--overwrite"]) == 2
    assert "refusing to write the report over it" in capsys.readouterr().err and gt.read_bytes() == before
    report = tmp_path / "scores.csv"
    report.write_text("an earlier report")
    assert main(["evaluate", "--pred", str(gt), "--gt", str(gt), "--csv", str(report)]) == 2
    assert "exists already; pass --overwrite" in capsys.readouterr().err
    assert report.read_text() == "an earlier report"
    assert main(["evaluate", "--pred", str(gt), "--gt", str(gt), "--csv", str(report), "--overwrite"]) == 0
    assert list(csv.DictReader(report.open()))[0]["kidney_dice"] == "1.0"
    assert main(["evaluate", "--pred", str(gt), "--gt", str(gt), "--csv", str(tmp_path)]) == 2
    assert "is a folder" in capsys.readouterr().err
    ct = cases / "case_00000" / "imaging.nii.gz"  # not scored, but no report's place either
    before = ct.read_bytes()
    assert main(["evaluate", "--pred", str(gt), "--gt", str(gt), "--csv", str(ct), "--overwrite"]) == 2
    assert "is named as an image or model file" in capsys.readouterr().err and ct.read_bytes() == before


def test_evaluate_scores_what_pairs_and_takes_a_case_folder_as_ground_truth(tmp_path, cases, weights, capsys,
                                                                           caplog):
    out = tmp_path / "out"
    assert main(["predict", str(cases / "case_00000"), "-o", str(out), "--weights", str(weights),
                 "--save-intermediates"]) == 0
    capsys.readouterr()
    # One case folder as the ground truth, beside a prediction folder holding intermediates too.
    assert main(["evaluate", "--pred", str(out), "--gt", str(cases / "case_00000")]) == 0
    one = capsys.readouterr().out
    assert main(["evaluate", "--pred", str(out), "--gt", str(cases)]) == 0
    assert capsys.readouterr().out.splitlines()[1] == one.splitlines()[1]  # the same case, the same scores
    assert one.splitlines()[1].startswith("case_00000 ")
    assert main(["evaluate", "--pred", str(out), "--gt", str(cases / "case_00001")]) == 2  # another case's
    assert "prediction_00000.nii.gz: is case_00000's prediction, not case_00001's" in capsys.readouterr().err
    # A prediction with no ground truth is named and left out; the others are scored.
    shutil.copy(out / "prediction_00000.nii.gz", out / "prediction_00042.nii.gz")
    with caplog.at_level("WARNING"):
        assert main(["evaluate", "--pred", str(out), "--gt", str(cases)]) == 0
    assert "1 prediction(s) have no ground truth and are not scored: prediction_00042.nii.gz" in caplog.text
    assert "mean (1)" in capsys.readouterr().out
    assert main(["evaluate", "--pred", str(out), "--gt", str(cases / "case_00000")]) == 2
    assert "2 predictions (prediction_00000.nii.gz, prediction_00042.nii.gz) need a ground-truth folder" in (
        capsys.readouterr().err)


def test_evaluate_names_the_bad_label_map_and_the_cases_left_unscored(tmp_path, cases, capsys, caplog):
    pred = tmp_path / "pred"
    pred.mkdir()
    seg = nib.load(str(cases / "case_00000" / "segmentation.nii.gz"))
    labels = np.asarray(seg.dataobj).copy()
    nib.save(nib.Nifti1Image(labels, seg.affine), str(pred / "prediction_00000.nii.gz"))
    with caplog.at_level("WARNING"):
        assert main(["evaluate", "--pred", str(pred), "--gt", str(cases)]) == 0
    assert "1 case(s) have no prediction and are not scored: case_00001" in caplog.text
    labels[labels == 1] = 5
    nib.save(nib.Nifti1Image(labels, seg.affine), str(pred / "prediction_00000.nii.gz"))
    assert main(["evaluate", "--pred", str(pred), "--gt", str(cases)]) == 2
    assert "prediction_00000.nii.gz: holds label 5" in capsys.readouterr().err
    nib.save(nib.Nifti1Image(labels[:-1].clip(0, 2), seg.affine), str(pred / "prediction_00000.nii.gz"))
    assert main(["evaluate", "--pred", str(pred), "--gt", str(cases)]) == 2
    err = capsys.readouterr().err
    assert "differs from the ground truth's" in err and "case_00000/segmentation.nii.gz" in err
    ct = cases / "case_00000" / "imaging.nii.gz"  # the CT given as the ground truth by mistake
    assert main(["evaluate", "--pred", str(pred / "prediction_00000.nii.gz"), "--gt", str(ct)]) == 2
    assert "imaging.nii.gz: holds values -1" in (err := capsys.readouterr().err) and "not a label map" in err
    assert err.rstrip().endswith("a CT?")


def test_phantom_refuses_to_write_over_its_masks_and_names_a_bad_mask(tmp_path, cases, capsys):
    masks = tmp_path / "masks"
    (masks / "case_00000").mkdir(parents=True)
    mask = masks / "case_00000" / "segmentation.nii.gz"
    mask.write_bytes((cases / "case_00000" / "segmentation.nii.gz").read_bytes())
    assert main(["phantom", "--masks", str(masks), "--out", str(masks)]) == 2
    assert "is the --masks folder" in capsys.readouterr().err
    assert mask.read_bytes() == (cases / "case_00000" / "segmentation.nii.gz").read_bytes()
    mask.write_bytes(b"not a mask")
    assert main(["phantom", "--masks", str(masks), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    message = err[err.index("kits-seg: error:"):].splitlines()  # after the progress bar, no traceback
    assert message[0].startswith("kits-seg: error: 1 of 1 case(s) not drawn") and "Traceback" not in err
    assert len(message) == 2 and message[1].startswith(f"  cannot read the mask {mask}: ")


def test_predict_checks_options_and_output_folder_before_any_work(tmp_path, cases, weights, capsys):
    case = str(cases / "case_00000")
    with pytest.raises(SystemExit):  # argparse: exit 2 with usage
        main(["predict", case, "-o", str(tmp_path / "o"), "--weights", str(weights), "--batch-size", "0"])
    assert "at least 1" in capsys.readouterr().err
    assert main(["predict", case, "-o", str(tmp_path / "o"), "--weights", str(weights), "--stage2-level", "99"]) == 2
    assert "kits-seg: error:" in capsys.readouterr().err
    assert main(["predict", case, "-o", str(tmp_path / "o"), "--weights", str(weights), "--device", "bogus"]) == 2
    assert "bogus" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["predict", case, "-o", str(tmp_path / "o"), "--weights", str(weights), "--tumor-smoothing", "0.5"])
    assert "weight in [0, 0.5), not '0.5'" in capsys.readouterr().err
    assert main(["predict", case, "-o", str(tmp_path / "o"), "--weights", str(weights), "--radius", "inf"]) == 2
    assert "radius must be a finite number" in capsys.readouterr().err
    a_file = tmp_path / "afile"
    a_file.write_text("x")
    assert main(["predict", case, "-o", str(a_file), "--weights", str(weights)]) == 2
    assert "afile: is a file" in capsys.readouterr().err and a_file.read_text() == "x"
    assert main(["predict", case, "-o", str(tmp_path / "result.nii.gz"), "--weights", str(weights)]) == 2
    assert "result.nii.gz: -o/--output takes a folder" in capsys.readouterr().err
    assert not (tmp_path / "result.nii.gz").exists()
    # A link to the CT where its labels would go: refused before the work, --overwrite or not.
    linked = tmp_path / "linked"
    linked.mkdir()
    (linked / "prediction_00000.nii.gz").symlink_to(cases / "case_00000" / "imaging.nii.gz")
    before = (cases / "case_00000" / "imaging.nii.gz").read_bytes()
    assert main(["predict", case, "-o", str(linked), "--weights", str(weights), "--overwrite"]) == 2
    err = capsys.readouterr().err
    assert "prediction_00000.nii.gz: is the input " in err and "imaging.nii.gz (a link to it?)" in err
    assert (cases / "case_00000" / "imaging.nii.gz").read_bytes() == before
    # A CT refused once the model has loaded: the output folder the run made is not left behind, empty.
    no_ct = tmp_path / "no_ct.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((8, 20, 20), np.uint8), make_affine("ras")), str(no_ct))
    assert main(["predict", str(no_ct), "-o", str(tmp_path / "made"), "--weights", str(weights)]) == 2
    assert "a label map, not a CT" in capsys.readouterr().err and not (tmp_path / "made").exists()


def test_predict_batch_goes_past_an_unreadable_ct_and_ignores_its_own_earlier_results(tmp_path, weights, capsys):
    folder = tmp_path / "scans"
    folder.mkdir()
    good = make_synthetic_case(shape=(12, 28, 30), spacing=(3.0, 1.6, 1.6), seed=3)
    nib.save(nib.Nifti1Image(good.ct, make_affine("ras", (3.0, 1.6, 1.6))), str(folder / "a.nii.gz"))
    nib.save(nib.Nifti1Image(good.ct, make_affine("ras", (3.0, 1.6, 1.6))), str(folder / "c.nii.gz"))
    whole = folder / "b.nii.gz"
    nib.save(nib.Nifti1Image(good.ct, make_affine("ras", (3.0, 1.6, 1.6))), str(whole))
    whole.write_bytes(whole.read_bytes()[: len(whole.read_bytes()) // 2])  # a header, then half the voxels
    assert main(["predict", str(folder), "-o", str(folder), "--weights", str(weights)]) == 2
    err = capsys.readouterr().err
    assert "b.nii.gz: the voxel data cannot be read" in err and "1 of 3 case(s)" in err
    assert sorted(p.name for p in folder.iterdir()) == ["a.nii.gz", "a_labels.nii.gz", "b.nii.gz", "c.nii.gz",
                                                        "c_labels.nii.gz"]
    whole.unlink()
    # Again into the same folder: a_labels is a's result, not a fourth CT.
    assert main(["predict", str(folder), "-o", str(folder), "--weights", str(weights), "--overwrite"]) == 0
    assert sorted(p.name for p in folder.iterdir()) == ["a.nii.gz", "a_labels.nii.gz", "c.nii.gz", "c_labels.nii.gz"]


def test_train_refuses_bad_settings_and_a_wrong_data_folder_leaves_no_run(tmp_path, cases, capsys, caplog):
    run = tmp_path / "run"
    with caplog.at_level("WARNING"):
        assert main(["train", "--data", str(tmp_path / "nope"), "--out", str(run), "--device", "cpu"]) == 2
    assert "nope" in capsys.readouterr().err and not run.exists()
    assert "the paper preset (30000 + 30000 steps" in caplog.text and "--preset cpu" in caplog.text  # the default
    assert main(["train", "--data", str(cases), "--out", str(run), "--set", "learning_rate=abc"]) == 2
    assert "learning_rate" in capsys.readouterr().err
    assert main(["train", "--data", str(cases), "--out", str(run), "--set", "learning_rate"]) == 2
    assert "expected FIELD=JSON" in capsys.readouterr().err
    assert main(["train", "--data", str(cases), "--out", str(run), "--set", 'learning_rate="x"']) == 2
    assert "learning_rate" in capsys.readouterr().err
    assert main(["train", "--data", str(cases), "--out", str(run), "--set", "tumor_sampling=random"]) == 2
    err = capsys.readouterr().err  # a text field's value needs no JSON quotes; it is then checked
    assert "tumor_sampling must be one of slice, lesion, got 'random'" in err and "JSON" not in err
    assert main(["train", "--data", str(cases), "--out", str(run), "--set", "tumor_samplng=lesion"]) == 2
    assert "unknown field 'tumor_samplng'; fields: preset, preprocessing," in capsys.readouterr().err
    assert not run.exists()
    assert main(["train", "--data", str(cases), "--out", str(run), "--device", "bogus"]) == 2
    assert "bogus" in capsys.readouterr().err and not run.exists()


def test_info_shows_a_refused_models_metadata_and_then_fails(tmp_path, weights, capsys):
    from .test_checkpoint import _rewrite

    tampered = tmp_path / "tampered.kseg"
    tampered.write_bytes(weights.read_bytes())

    def bump(entries):
        key = next(k for k in entries if k.startswith("stage2/") and k.endswith("weight"))
        entries[key] = entries[key] + np.float32(1e-3)

    _rewrite(tampered, arrays=bump)
    assert main(["info", "--weights", str(tampered)]) == 2
    captured = capsys.readouterr()
    assert "  stages: 1: unet2d" in captured.out and "do not match their sha256" in captured.err
    assert main(["info", "--weights", str(tmp_path)]) == 2
    assert "is a folder; a model is one .kseg file" in capsys.readouterr().err


def test_train_checks_the_networks_and_whole_numbers_before_making_a_run_folder(tmp_path, cases, capsys):
    run = tmp_path / "run"
    for setting, message in (
            ('stage1_kwargs={"base_channels":"x"}', "stage 1: network 'unet2d': base_channels must be an integer"),
            ('stage2_kwargs={"norm":"banana"}', "stage 2: network 'unetpp2d': norm must be one of"),
            ('stage1_kwargs={"nonsense":3}', "unexpected keyword argument 'nonsense'"),
            ("stage2_kwargs=[]", "stage2_kwargs must be a JSON object"),
            ("batch_size_stage1=2.5", "batch_size_stage1 must be a whole number, got 2.5"),
            ("crop_stage2=true", "crop_stage2 must be a whole number, got True"),
            ("seed=-5", "seed must be >= 0, got -5"),
            ("preset=paper", "choose the recipe with --preset")):
        assert main(["train", "--data", str(cases), "--out", str(run), "--preset", "smoke", "--device", "cpu",
                     "--set", setting]) == 2, setting
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, (setting, err)
        assert not run.exists()
    with pytest.raises(SystemExit):  # the flags are checked by argparse, naming the flag
        main(["train", "--data", str(cases), "--out", str(run), "--seed", "-5"])
    assert "argument --seed: expected a whole number of at least 0" in capsys.readouterr().err
    # A split that cannot be trained on is refused before it is kept (it would bind the corrected command).
    assert main(["train", "--data", str(cases), "--out", str(run), "--preset", "smoke", "--device", "cpu",
                 "--val-cases", "case_00099"]) == 2
    assert "validation case(s) not in" in capsys.readouterr().err and not run.exists()
    assert main(["train", "--data", str(cases), "--out", str(run), "--preset", "smoke", "--device", "cpu",
                 "--val-fraction", "0.5", "--set", "oof_folds=3"]) == 2
    err = capsys.readouterr().err
    assert "needs training images of at least 3 patients" in err and "or fewer folds (--set oof_folds=2)" in err
    assert not run.exists()  # 2 images cannot make 3 folds: said before any case is prepared
    # The command changed as the message says is judged afresh, not as "another configuration".
    assert main(["train", "--data", str(cases), "--out", str(run), "--preset", "smoke", "--device", "cpu",
                 "--val-fraction", "0.5", "--set", "oof_folds=2"]) == 2
    assert "needs training images of at least 2 patients" in capsys.readouterr().err
    assert not run.exists()  # 2 cases, half for validation: 1 to train on, for 2 folds
    # Two names, one mask: one patient, known only once the cases are prepared; refused then, and
    # the run's records go (the corrected command starts afresh), its prepared cases stay.
    twins = tmp_path / "twins"
    for name, source in (("case_00000", "case_00000"), ("case_00003", "case_00000"), ("case_00001", "case_00001")):
        shutil.copytree(cases / source, twins / name)
    assert main(["train", "--data", str(twins), "--out", str(run), "--preset", "smoke", "--device", "cpu",
                 "--val-cases", "case_00001", "--set", "oof_folds=2"]) == 2
    assert "needs training images of at least 2 patients" in capsys.readouterr().err
    assert not (run / "split.json").exists() and not (run / "config.json").exists() and (run / "cache").is_dir()
    shutil.rmtree(run)
    # A run folder whose recipe no longer passes the checks (an older version stored 2.0): named.
    old = tmp_path / "old"
    old.mkdir()
    (old / "config.json").write_text(json.dumps({**preset("smoke").to_dict(), "steps_per_epoch": 2.0}))
    assert main(["train", "--data", str(cases), "--out", str(old), "--preset", "smoke", "--device", "cpu"]) == 2
    assert "config.json: steps_per_epoch must be a whole number, got 2.0; use a new --out folder" in \
        capsys.readouterr().err
    run.write_text("notes")
    assert main(["train", "--data", str(cases), "--out", str(run), "--preset", "smoke", "--device", "cpu"]) == 2
    assert "run: is a file; --out takes a run folder" in capsys.readouterr().err and run.read_text() == "notes"


def test_predict_refuses_a_mask_given_as_the_ct_and_names_the_case_folders_it_skips(tmp_path, cases, weights, capsys,
                                                                                  caplog):
    masks_only = tmp_path / "masks" / "case_00007"
    masks_only.mkdir(parents=True)
    shutil.copy(cases / "case_00000" / "segmentation.nii.gz", masks_only)
    assert main(["predict", str(masks_only), "-o", str(tmp_path / "o"), "--weights", str(weights)]) == 2
    assert "case_00007: a KiTS19 case folder without its CT (imaging.nii.gz or imaging.nii)" in capsys.readouterr().err
    mask_file = str(masks_only / "segmentation.nii.gz")
    assert main(["predict", mask_file, "-o", str(tmp_path / "o"), "--weights", str(weights)]) == 2
    assert f"{mask_file}: holds only the values 0, 1, 2: a label map, not a CT" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()  # the folder it made, left empty, is not left behind
    # A folder of cases: the whole ones are segmented, the others named.
    mixed = tmp_path / "mixed"
    shutil.copytree(cases / "case_00000", mixed / "case_00000")
    shutil.copytree(masks_only, mixed / "case_00007")
    (mixed / "more").mkdir()  # a folder of CTs inside: one level is read, and the rest is named
    shutil.copy(cases / "case_00000" / "imaging.nii.gz", mixed / "more" / "scan.nii.gz")
    with caplog.at_level("WARNING", logger="kitseg.io"):
        assert main(["predict", str(mixed), "-o", str(tmp_path / "o2"), "--weights", str(weights)]) == 0
    assert "1 case folder(s) without imaging.nii.gz or imaging.nii skipped: case_00007" in caplog.text
    assert "1 subfolder(s) holding NIfTI files but no imaging.nii.gz or imaging.nii are not searched: more" in caplog.text
    assert [p.name for p in (tmp_path / "o2").iterdir()] == ["prediction_00000.nii.gz"]
    # A flat folder of CTs with a stray mask: the CTs are segmented, the mask is named and skipped.
    flat = tmp_path / "flat"
    flat.mkdir()
    shutil.copy(cases / "case_00000" / "imaging.nii.gz", flat / "a.nii.gz")
    shutil.copy(cases / "case_00000" / "segmentation.nii.gz", flat)
    caplog.clear()
    with caplog.at_level("WARNING", logger="kitseg.io"):
        assert main(["predict", str(flat), "-o", str(tmp_path / "o4"), "--weights", str(weights)]) == 0
    assert "segmentation.nii.gz is a KiTS19 mask, not a CT: skipped" in caplog.text
    assert [p.name for p in (tmp_path / "o4").iterdir()] == ["a_labels.nii.gz"]
    # A folder where an output file would go: said before any work, by its own name.
    (tmp_path / "o3" / "prediction_00000.nii.gz").mkdir(parents=True)
    assert main(["predict", str(cases / "case_00000"), "-o", str(tmp_path / "o3"), "--weights", str(weights),
                 "--overwrite"]) == 2
    assert "o3/prediction_00000.nii.gz: is a folder, where an output file would go" in capsys.readouterr().err


def test_sample_never_writes_over_a_case_folders_mask(tmp_path, cases, capsys):
    folder = tmp_path / "case_00000"
    folder.mkdir()
    mask = folder / "segmentation.nii.gz"
    original = (cases / "case_00000" / "segmentation.nii.gz").read_bytes()
    mask.write_bytes(original)
    assert main(["sample", "--out", str(tmp_path)]) == 2
    assert "case_00000: holds segmentation.nii.gz already" in capsys.readouterr().err
    assert mask.read_bytes() == original and not (folder / "imaging.nii.gz").exists()
    # Unpacked, too: a sample written beside it would hide it.
    mask.rename(folder / "segmentation.nii")
    assert main(["sample", "--out", str(tmp_path)]) == 2
    assert "case_00000: holds segmentation.nii already" in capsys.readouterr().err
    (folder / "segmentation.nii").rename(mask)
    with pytest.raises(SystemExit):
        main(["sample", "--out", str(tmp_path / "x"), "--seed", "-1"])
    assert "whole number of at least 0" in capsys.readouterr().err
    assert main(["sample", "--out", str(mask)]) == 2  # a file
    assert f"{mask}: is a file; --out takes a folder" in capsys.readouterr().err


def test_evaluate_takes_an_empty_case_dice_in_0_1_or_nan(tmp_path, cases, capsys):
    with pytest.raises(SystemExit):
        main(["evaluate", "--pred", str(cases), "--gt", str(cases), "--empty-value", "7"])
    assert "must be a Dice in [0, 1] or nan, got 7" in capsys.readouterr().err
    # Both empty: the Dice is the value asked for, here the official script's NaN.
    seg = nib.load(str(cases / "case_00000" / "segmentation.nii.gz"))
    empty = tmp_path / "empty.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros(seg.shape, np.uint8), seg.affine), str(empty))
    report = tmp_path / "scores.csv"
    assert main(["evaluate", "--pred", str(empty), "--gt", str(empty), "--empty-value", "nan", "--csv", str(report)]) == 0
    with open(report, newline="") as fh:
        row = next(csv.DictReader(fh))
    assert np.isnan(float(row["kidney_dice"])) and np.isnan(float(row["tumor_dice"]))
    assert row["empty_value"] == "nan"  # said in the report, as is the found share
    # With a case that has a kidney, the mean is over one case of two: said, not hidden under "mean (2)".
    folder = tmp_path / "two"
    folder.mkdir()
    for name, source in (("full", cases / "case_00000" / "segmentation.nii.gz"), ("none", empty)):
        shutil.copy(source, folder / f"{name}.nii.gz")
        shutil.copy(source, folder / f"{name}_labels.nii.gz")
    capsys.readouterr()
    assert main(["evaluate", "--pred", str(folder), "--gt", str(folder), "--empty-value", "nan"]) == 0
    assert "means over the cases not nan: kidney 1 of 2, tumor 1 of 2, composite 1 of 2" in capsys.readouterr().out


def test_evaluate_names_a_case_alike_scored_alone_or_in_a_folder(tmp_path, cases, capsys):
    """A report joins another by case name (compare_scores.py): a file scored alone is named as a
    folder's run names it."""
    pred = tmp_path / "prediction_00000.nii.gz"
    shutil.copy(cases / "case_00000" / "segmentation.nii.gz", pred)
    scan = tmp_path / "scan_labels.nii.gz"
    shutil.copy(pred, scan)
    for given, reference, name in ((pred, cases / "case_00000" / "segmentation.nii.gz", "case_00000"),
                                   (pred, cases / "case_00000", "case_00000"),
                                   (scan, cases / "case_00000" / "segmentation.nii.gz", "scan")):
        assert main(["evaluate", "--pred", str(given), "--gt", str(reference)]) == 0
        assert capsys.readouterr().out.splitlines()[1].split()[0] == name


def test_evaluate_scores_another_tools_kidney_map_as_the_ground_truth(tmp_path, cases, capsys, caplog):
    """A TotalSegmentator-style reference (1 spleen, 2 right kidney, 3 left kidney, 5 liver; no tumor class):
    --map-gt-labels maps its values alone, and tumor is not scored rather than scored 0."""
    seg = nib.load(str(cases / "case_00000" / "segmentation.nii.gz"))
    labels = np.asarray(seg.dataobj).copy()
    assert (labels == 2).any()
    totalseg = np.where(labels > 0, 2, 0).astype(np.uint8)
    totalseg[:, :, labels.shape[2] // 2:][totalseg[:, :, labels.shape[2] // 2:] == 2] = 3  # the other side
    totalseg[0][labels[0] == 0] = 5  # organs elsewhere
    totalseg[-1][labels[-1] == 0] = 1
    gt, pred = tmp_path / "gt", tmp_path / "pred"
    gt.mkdir(), pred.mkdir()
    nib.save(nib.Nifti1Image(totalseg, seg.affine), str(gt / "scan.nii.gz"))
    nib.save(nib.Nifti1Image(labels, seg.affine), str(pred / "scan_labels.nii.gz"))
    assert main(["evaluate", "--pred", str(pred), "--gt", str(gt)]) == 2
    assert "--map-gt-labels 2=1 3=1 '*=0'" in capsys.readouterr().err  # said how
    report = tmp_path / "s.csv"
    with caplog.at_level("WARNING"):
        assert main(["evaluate", "--pred", str(pred), "--gt", str(gt), "--map-gt-labels", "2=1", "3=1", "*=0",
                     "--csv", str(report)]) == 0
    assert "tumor is not scored" in caplog.text
    assert "own classes" not in caplog.text  # another tool's 1 and 2 are not KiTS19's: no false alarm
    assert "tumor not scored" in capsys.readouterr().out
    row = next(csv.DictReader(report.open()))
    assert float(row["kidney_dice"]) == 1.0  # the prediction's kidney and tumor against the mapped kidneys
    assert row["tumor_dice"] == row["composite_dice"] == row["false_tumors"] == "nan" and float(row["tumor_ml"]) > 0
    assert (row["label_mapping"], row["gt_label_mapping"]) == ("", "2=1 3=1 *=0")
    # The same mapping given for both files would take the prediction's kidney (1) too: said as it is.
    caplog.clear()
    with caplog.at_level("WARNING"):
        assert main(["evaluate", "--pred", str(pred), "--gt", str(gt), "--map-labels", "2=1", "3=1", "*=0"]) == 0
    assert "--map-labels 1=0 2=1 changes KiTS19's own classes (0 background, 1 kidney, 2 tumor) in every file" \
        in caplog.text


def test_evaluate_maps_another_conventions_labels_when_asked(tmp_path, cases, capsys, caplog):
    gt = tmp_path / "gt" / "case_00000"
    gt.mkdir(parents=True)
    seg = nib.load(str(cases / "case_00000" / "segmentation.nii.gz"))
    labels = np.asarray(seg.dataobj).copy()
    pred = tmp_path / "pred"
    pred.mkdir()
    nib.save(nib.Nifti1Image(labels, seg.affine), str(pred / "prediction_00000.nii.gz"))
    with_cyst = labels.copy()
    kidney = np.argwhere(labels == 1)
    z = kidney[len(kidney) // 2][0]
    with_cyst[z][labels[z] == 1] = 3  # one slice of kidney labelled cyst, as KiTS21/23 do
    nib.save(nib.Nifti1Image(with_cyst, seg.affine), str(gt / "segmentation.nii.gz"))
    assert main(["evaluate", "--pred", str(pred), "--gt", str(gt)]) == 2
    assert "holds label 3" in (err := capsys.readouterr().err) and "--map-labels 3=1" in err
    # Cysts within the kidney region: the prediction's kidney there matches.
    assert main(["evaluate", "--pred", str(pred), "--gt", str(gt), "--map-labels", "3=1",
                 "--csv", str(tmp_path / "in.csv")]) == 0
    # Cysts left out of it: the prediction's kidney there is now false kidney.
    assert main(["evaluate", "--pred", str(pred), "--gt", str(gt), "--map-labels", "3=0",
                 "--csv", str(tmp_path / "out.csv")]) == 0
    inside, outside = (list(csv.DictReader((tmp_path / f).open())) for f in ("in.csv", "out.csv"))
    assert float(inside[0]["kidney_dice"]) == pytest.approx(1.0) and float(outside[0]["kidney_dice"]) < 0.99
    # Each report says how it was scored, in every row (the mean row too).
    assert {row["label_mapping"] for row in inside} == {"3=1"} and {row["label_mapping"] for row in outside} == {"3=0"}
    assert np.array_equal(np.asarray(nib.load(str(gt / "segmentation.nii.gz")).dataobj), with_cyst)  # not changed
    with caplog.at_level("WARNING"):  # allowed, but every tumor would then be kidney: said
        assert main(["evaluate", "--pred", str(pred), "--gt", str(gt), "--map-labels", "3=1", "2=1"]) == 0
    assert "--map-labels 2=1 changes KiTS19's own classes" in caplog.text
    assert main(["evaluate", "--pred", str(pred), "--gt", str(gt), "--map-labels", "3:1"]) == 2
    assert "--map-labels 3:1: expected FROM=TO" in capsys.readouterr().err
    assert main(["evaluate", "--pred", str(pred), "--gt", str(gt), "--map-labels", "3=1", "3=2"]) == 2
    assert "label 3 is mapped twice" in capsys.readouterr().err


def test_info_takes_the_model_as_its_argument_too(weights, capsys):
    assert main(["info", str(weights)]) == 0
    assert "unetpp2d" in capsys.readouterr().out
    assert main(["info", str(weights), "--weights", str(weights.with_name("other.kseg"))]) == 2
    assert "two models given" in capsys.readouterr().err


def test_sigterm_stops_a_command_as_ctrl_c_does_leaving_no_temporary_file(tmp_path, monkeypatch, capsys):
    """A scheduler's SIGTERM unwinds the command: the atomic write in progress is removed, not left hidden."""
    import os
    import signal
    import time

    import kitseg.cli
    from kitseg.atomic import atomic_path

    def writes_then_gets_killed(args):
        with atomic_path(tmp_path / "scores.csv") as tmp:
            tmp.write_text("half")
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(10)  # the handler raises before this ends
        return 0

    monkeypatch.setattr(kitseg.cli, "cmd_info", writes_then_gets_killed)
    before = signal.getsignal(signal.SIGTERM)
    started = time.monotonic()
    assert main(["info"]) == 128 + signal.SIGTERM
    assert time.monotonic() - started < 5
    assert capsys.readouterr().err == "kits-seg: stopped (SIGTERM)\n"
    assert list(tmp_path.iterdir()) == []
    assert signal.getsignal(signal.SIGTERM) == before  # the caller's handler is back


def test_train_refuses_a_run_folder_in_the_data_and_checks_prepare_only_cases(tmp_path, cases, capsys):
    assert main(["train", "--data", str(cases), "--out", str(cases), "--preset", "smoke", "--device", "cpu"]) == 2
    assert "lies within the data folder" in capsys.readouterr().err
    assert main(["train", "--data", str(cases), "--out", str(cases / "case_00000" / "run"), "--preset", "smoke",
                 "--prepare-only"]) == 2
    assert "lies within the data folder" in capsys.readouterr().err
    assert not (cases / "case_00000" / "run").exists()
    run = tmp_path / "run"
    assert main(["train", "--data", str(cases), "--out", str(run), "--preset", "smoke", "--prepare-only",
                 "--val-cases", "case_00042"]) == 2
    assert "validation case(s) not in" in capsys.readouterr().err and not run.exists()
    # A model on another grid: the fields that differ, and the preset whose grid it is.
    from kitseg.weights import default_weights_path

    assert main(["train", "--data", str(cases), "--out", str(run), "--preset", "smoke", "--device", "cpu",
                 "--init-from", str(default_weights_path())]) == 2
    err = capsys.readouterr().err
    assert "inplane_spacing_mm 2.0 (the recipe's: 3.0)" in err and "fine-tune with --preset cpu" in err, err
    assert "PreprocessingConfig(" not in err and not run.exists()


def test_a_ctrl_c_dropped_in_a_finalizer_is_raised_at_the_next_check():
    """Python drops an exception raised in a finalizer; the training loop's per-step check raises it again."""
    import os
    import signal
    import time

    from kitseg.interrupt import raise_if_stop_requested, stop_on_signals

    class Finalized:
        def __del__(self):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(2)  # the handler's KeyboardInterrupt ends this, and Python drops it

    before = signal.getsignal(signal.SIGINT)
    with stop_on_signals():
        dropped = Finalized()
        del dropped  # "Exception ignored in: <function Finalized.__del__ ...>"
        with pytest.raises(KeyboardInterrupt):
            raise_if_stop_requested()
    raise_if_stop_requested()  # outside the block nothing is pending
    assert signal.getsignal(signal.SIGINT) == before


def test_kits21_and_nnunet_layouts_are_predicted_and_scored_as_case_folders_are(tmp_path, cases, weights, capsys,
                                                                               caplog):
    """KiTS21 keeps its reference as aggregated_MAJ_seg.nii.gz; nnU-Net's raw layout names a CT
    imagesTr/NAME_0000.nii.gz and its labels labelsTr/NAME.nii.gz. Both score as KiTS19's folders."""
    kits21, nnunet, unpacked = tmp_path / "kits21", tmp_path / "Dataset220_KiTS", tmp_path / "unpacked"
    (nnunet / "imagesTr").mkdir(parents=True)
    (nnunet / "labelsTr").mkdir()
    for case in ("case_00000", "case_00001"):
        (kits21 / case).mkdir(parents=True)
        (unpacked / case).mkdir(parents=True)  # gunzipped, as some keep the data for faster reading
        for name in ("imaging", "segmentation"):
            (unpacked / case / f"{name}.nii").write_bytes(gzip.decompress((cases / case / f"{name}.nii.gz").read_bytes()))
        shutil.copy(cases / case / "imaging.nii.gz", kits21 / case / "imaging.nii.gz")
        shutil.copy(cases / case / "segmentation.nii.gz", kits21 / case / "aggregated_MAJ_seg.nii.gz")
        shutil.copy(cases / case / "imaging.nii.gz", nnunet / "imagesTr" / f"{case}_0000.nii.gz")
        shutil.copy(cases / case / "segmentation.nii.gz", nnunet / "labelsTr" / f"{case}.nii.gz")
    # An annotator's own map beside the majority vote is not the reference.
    empty = nib.load(str(cases / "case_00000" / "segmentation.nii.gz"))
    nib.save(nib.Nifti1Image(np.zeros(empty.shape, np.uint8), empty.affine), str(kits21 / "case_00000" /
                                                                               "aggregated_OR_seg.nii.gz"))

    reference = tmp_path / "reference.csv"
    assert main(["predict", str(cases), "-o", str(tmp_path / "ref_pred"), "--weights", str(weights)]) == 0
    assert main(["evaluate", "--pred", str(tmp_path / "ref_pred"), "--gt", str(cases), "--csv", str(reference)]) == 0
    expected = [(r["case"], r["kidney_dice"], r["tumor_dice"]) for r in csv.DictReader(reference.open())][:2]

    layouts = {"kits21": (kits21, kits21, ["prediction_00000.nii.gz", "prediction_00001.nii.gz"]),
               "nnunet": (nnunet / "imagesTr", nnunet / "labelsTr",
                          ["case_00000_0000_labels.nii.gz", "case_00001_0000_labels.nii.gz"]),
               "unpacked": (unpacked, unpacked, ["prediction_00000.nii.gz", "prediction_00001.nii.gz"])}
    references = {"kits21": "{gt}/{case}/aggregated_MAJ_seg.nii.gz", "nnunet": "{gt}/{case}.nii.gz",
                  "unpacked": "{gt}/{case}/segmentation.nii"}
    for layout, (data, gt, written) in layouts.items():
        out = tmp_path / f"pred_{layout}"
        assert main(["predict", str(data), "-o", str(out), "--weights", str(weights)]) == 0
        assert sorted(p.name for p in out.iterdir()) == written
        report = tmp_path / f"{layout}.csv"
        caplog.clear()
        with caplog.at_level("WARNING"):
            assert main(["evaluate", "--pred", str(out), "--gt", str(gt), "--csv", str(report)]) == 0
        assert "not scored" not in caplog.text
        rows = list(csv.DictReader(report.open()))
        assert [(r["case"], r["kidney_dice"], r["tumor_dice"]) for r in rows][:2] == expected
        assert [(r["prediction_file"], r["reference_file"]) for r in rows] == [
            (str(out / name), references[layout].format(gt=gt, case=case))
            for name, case in zip(written, ("case_00000", "case_00001"))] + [("", "")]
    # The data set's folder stands for its labelsTr; a reference without a prediction is named.
    shutil.copy(nnunet / "labelsTr" / "case_00001.nii.gz", nnunet / "labelsTr" / "case_00099.nii.gz")
    caplog.clear()
    with caplog.at_level("WARNING"):
        assert main(["evaluate", "--pred", str(tmp_path / "pred_nnunet"), "--gt", str(nnunet)]) == 0
    assert "Dataset220_KiTS: 1 case(s) have no prediction and are not scored: case_00099" in caplog.text
    # Two predictions of one reference would weigh its case twice in the means: refused, naming both.
    shutil.copy(tmp_path / "pred_nnunet" / "case_00001_0000_labels.nii.gz", tmp_path / "pred_nnunet" /
                "case_00001_labels.nii.gz")
    capsys.readouterr()
    assert main(["evaluate", "--pred", str(tmp_path / "pred_nnunet"), "--gt", str(nnunet)]) == 2
    assert ("case_00001_0000_labels.nii.gz and case_00001_labels.nii.gz are both predictions of "
            f"{(nnunet / 'labelsTr' / 'case_00001.nii.gz').resolve()}") in capsys.readouterr().err
    # A folder given one level too high: said where the cases are.
    (tmp_path / "kits21_repo").mkdir()
    shutil.move(kits21, tmp_path / "kits21_repo" / "data")
    kits21 = tmp_path / "kits21_repo" / "data"
    assert main(["predict", str(tmp_path / "kits21_repo"), "-o", str(tmp_path / "nothing"), "--weights",
                 str(weights)]) == 2
    assert f"its subfolder data holds case folders: give {kits21}" in capsys.readouterr().err
    assert main(["evaluate", "--pred", str(tmp_path / "pred_kits21"), "--gt", str(tmp_path / "kits21_repo")]) == 2
    assert f"its subfolder data holds case folders: give {kits21}" in capsys.readouterr().err
    # nnU-Net's data set folder itself holds no CT: said which of its folders does.
    assert main(["predict", str(nnunet), "-o", str(tmp_path / "nothing"), "--weights", str(weights)]) == 2
    said = capsys.readouterr().err
    assert "Dataset220_KiTS: no CT found" in said and "nnU-Net's layout: give its imagesTr folder" in said
    # One KiTS21 case folder as the ground truth.
    capsys.readouterr()
    assert main(["evaluate", "--pred", str(tmp_path / "pred_kits21" / "prediction_00001.nii.gz"),
                 "--gt", str(kits21 / "case_00001")]) == 0
    assert capsys.readouterr().out.splitlines()[1].startswith("case_00001 ")


def test_log_lines_are_written_above_a_progress_bar_not_after_it():
    """A checkpoint saved while a bar is drawn: the bar is cleared, the line written on its own."""
    import io
    import logging

    from tqdm import tqdm

    from kitseg.cli import _BarSafeHandler

    stream = io.StringIO()
    handler = _BarSafeHandler(stream)
    handler.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
    bar = tqdm(total=10, file=stream, desc="stage 1")
    bar.update(5)
    handler.emit(logging.LogRecord("kitseg", logging.INFO, "", 0, "Saved checkpoint", None, None))
    bar.close()
    before, line, _ = re.split(r"(INFO Saved checkpoint\n)", stream.getvalue())
    assert before.endswith("\r") and before.rstrip("\r").split("\r")[-1].strip() == ""  # the bar cleared first
