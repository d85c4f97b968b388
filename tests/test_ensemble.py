"""Stage ensembles: the mean of trained networks' probabilities, stored and loaded like one network."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from kitseg.checkpoint import (
    METADATA_KEY,
    CheckpointError,
    load_bundle,
    make_tiny_bundle,
    provenance_summary,
    read_metadata,
    save_bundle,
)
from kitseg.config import PreprocessingConfig
from kitseg.geometry import Volume
from kitseg.networks import build_network, predict_logits
from kitseg.phantom import make_synthetic_case
from kitseg.pipeline import Segmenter

TINY_KWARGS = {"in_channels": 3, "num_classes": 3, "base_channels": 4, "depth": 2}
TINY_UNETPP = {"architecture": "unetpp2d", "kwargs": TINY_KWARGS}
NESTED = {"architecture": "ensemble", "kwargs": {"members": [TINY_UNETPP, TINY_UNETPP]}}
COMBINE = Path(__file__).resolve().parents[1] / "scripts" / "combine_stages.py"


def test_softmax_of_the_ensemble_is_the_mean_of_its_members_probabilities():
    torch.manual_seed(0)
    ensemble = build_network("ensemble", members=[TINY_UNETPP, TINY_UNETPP]).eval()
    x = torch.randn(2, 3, 24, 20)
    with torch.no_grad():
        probs = torch.softmax(ensemble(x), dim=1)
        members = [torch.softmax(predict_logits(m(x)), dim=1) for m in ensemble.members]
    assert not torch.allclose(members[0], members[1])  # two different networks
    torch.testing.assert_close(probs, (members[0] + members[1]) / 2, atol=1e-6, rtol=0)


def test_a_mix_weighs_the_members_and_is_stored_only_when_given():
    torch.manual_seed(0)
    ensemble = build_network("ensemble", members=[TINY_UNETPP, TINY_UNETPP], mix=[3, 1]).eval()
    x = torch.randn(2, 3, 24, 20)
    with torch.no_grad():
        probs = torch.softmax(ensemble(x), dim=1)
        members = [torch.softmax(predict_logits(m(x)), dim=1) for m in ensemble.members]
    torch.testing.assert_close(probs, 0.75 * members[0] + 0.25 * members[1], atol=1e-6, rtol=0)
    assert ensemble.init_kwargs["mix"] == [3.0, 1.0]
    assert "mix" not in build_network("ensemble", members=[TINY_UNETPP, TINY_UNETPP]).init_kwargs
    # A member at 0 does not count (and is not run): the ensemble is the other member alone.
    alone = build_network("ensemble", members=[TINY_UNETPP, TINY_UNETPP], mix=[0, 1]).eval()
    alone.load_state_dict(ensemble.state_dict())
    calls = []
    alone.members[0].register_forward_hook(lambda *_: calls.append(1))
    with torch.no_grad():
        torch.testing.assert_close(torch.softmax(alone(x), dim=1), members[1], atol=1e-6, rtol=0)
    assert not calls
    # Shares are relative: huge finite numbers make the same mean as small ones.
    huge = build_network("ensemble", members=[TINY_UNETPP, TINY_UNETPP], mix=[1.5e308, 0.5e308]).eval()
    huge.load_state_dict(ensemble.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(huge(x), ensemble(x))  # their sum overflows a float: shares from the largest


@pytest.mark.parametrize("mix", [[1.0], [1.0, -1.0], [0, 0], [1.0, float("nan")], [1.0, float("inf")], [10**400, 1],
                                 [1.0, "2"], [True, 1.0], "1,1"])
def test_bad_mixes_are_refused_with_the_reason(mix):
    with pytest.raises(ValueError, match="mix must"):
        build_network("ensemble", members=[TINY_UNETPP, TINY_UNETPP], mix=mix)


@pytest.mark.parametrize(
    "members, problem",
    [
        ([TINY_UNETPP], "at least 2"),
        ([TINY_UNETPP, NESTED], "another ensemble"),
        ([TINY_UNETPP, {"architecture": "unetpp2d", "kwargs": {**TINY_KWARGS, "num_classes": 2}}], "differ"),
        ([TINY_UNETPP, {"architecture": "unetpp2d"}], "member 1"),
    ],
)
def test_bad_ensembles_are_refused_with_the_reason(members, problem):
    with pytest.raises(ValueError, match=problem):
        build_network("ensemble", members=members)


def _combine(tmp_path: Path, *stage2_files: str, out: str = "ens.kseg", mix=None) -> subprocess.CompletedProcess:
    args = [sys.executable, str(COMBINE), "--stage1", str(tmp_path / "a.kseg"), "--stage2",
            *[str(tmp_path / f) for f in stage2_files], "--out", str(tmp_path / out)]
    if mix is not None:
        args += ["--stage2-mix", *mix]
    return subprocess.run(args, capture_output=True, text=True)


def _stage2_on_one_case(tmp_path: Path, first: str):
    """A function giving a model file's stage-2 probabilities on one synthetic case.

    Every file is run on the same input: ``first``'s preprocessing and stage-1 y1, the mask everywhere.
    """
    case = make_synthetic_case(shape=(12, 40, 44), spacing=(2.5, 1.5, 1.5), seed=3)
    volume = Volume.from_source_array(case.ct, np.diag([2.5, 1.5, 1.5, 1.0]))
    segmenter = Segmenter.from_file(tmp_path / first, device="cpu")
    prepared = segmenter.prepare(volume)
    y1 = segmenter.stage1(prepared)
    mask = np.ones_like(y1, dtype=bool)
    return lambda name: Segmenter.from_file(tmp_path / name, device="cpu").stage2(prepared, y1, mask)


@pytest.mark.parametrize("b_context", [0, 1])
def test_combined_file_with_two_stage2_predicts_their_mean_probability(tmp_path, b_context):
    """combine_stages.py --stage2 A B: one file, stage 2 = mean of A's and B's stage-2 probabilities.

    With B's stage 2 seeing a neighbouring slice on each side (A's not), A's joins widened.
    """
    save_bundle(make_tiny_bundle(seed=1), tmp_path / "a.kseg")
    save_bundle(make_tiny_bundle(seed=2, preprocessing=PreprocessingConfig(stage2_context_slices=b_context)),
                tmp_path / "b.kseg")
    assert _combine(tmp_path, "a.kseg", "b.kseg").returncode == 0
    meta = read_metadata(tmp_path / "ens.kseg")
    assert meta["preprocessing"]["stage2_context_slices"] == b_context
    assert meta["stages"]["2"]["architecture"] == "ensemble"
    assert [s["file"] for s in meta["provenance"]["combined_from"]["stage2"]] == ["a.kseg", "b.kseg"]

    stage2_of = _stage2_on_one_case(tmp_path, "ens.kseg")
    a_probs, b_probs = stage2_of("a.kseg"), stage2_of("b.kseg")
    # Stage probabilities are stored as float16: equal up to its rounding.
    np.testing.assert_allclose(stage2_of("ens.kseg"), (a_probs + b_probs) / 2, atol=2e-3)
    assert _combine(tmp_path, "a.kseg", "b.kseg").returncode != 0  # never overwrites

    # An ensemble file gives its members (each widened where needed), or one of them with FILE@K.
    assert _combine(tmp_path, "ens.kseg", "a.kseg", out="three.kseg").returncode == 0
    assert _combine(tmp_path, "ens.kseg@1", out="member1.kseg").returncode == 0
    np.testing.assert_allclose(stage2_of("three.kseg"), (2 * a_probs + b_probs) / 3, atol=3e-3)
    np.testing.assert_allclose(stage2_of("member1.kseg"), b_probs, atol=2e-3)
    assert read_metadata(tmp_path / "member1.kseg")["provenance"]["combined_from"]["stage2"]["member"] == 1
    missing = _combine(tmp_path, "ens.kseg@2", out="none.kseg")
    assert missing.returncode != 0 and "has 2 network(s); there is no member 2" in missing.stderr


def test_combined_file_with_a_stage2_mix_predicts_the_weighted_mean(tmp_path):
    """--stage2-mix 3 1: stage 2 is 3/4 of A's probabilities and 1/4 of B's; kits-seg info says so."""
    save_bundle(make_tiny_bundle(seed=1), tmp_path / "a.kseg")
    save_bundle(make_tiny_bundle(seed=2), tmp_path / "b.kseg")
    assert _combine(tmp_path, "a.kseg", "b.kseg", out="mixed.kseg", mix=("3", "1")).returncode == 0
    meta = read_metadata(tmp_path / "mixed.kseg")
    assert meta["stages"]["2"]["kwargs"]["mix"] == [3.0, 1.0]
    assert provenance_summary(meta)[1].startswith("stage 2: ensemble of 2 weighted 3:1: ")

    stage2_of = _stage2_on_one_case(tmp_path, "mixed.kseg")
    expected = 0.75 * stage2_of("a.kseg") + 0.25 * stage2_of("b.kseg")
    np.testing.assert_allclose(stage2_of("mixed.kseg"), expected, atol=2e-3)

    # A stranger's file whose mix is no list of floats still gets its summary line (loading names the problem).
    for bad in ([10**400, 1], ["a", 1], "3:1", [True, 1], [0, 0], [1, -1], [1, 1, 1]):
        kwargs = {**meta["stages"]["2"]["kwargs"], "mix": bad}
        bad_meta = {**meta, "stages": {**meta["stages"], "2": {**meta["stages"]["2"], "kwargs": kwargs}}}
        assert provenance_summary(bad_meta)[1].startswith("stage 2: ensemble of 2: ")

    # Taking the weighted file whole without a new mix would drop its shares: refused, and said why.
    dropped = _combine(tmp_path, "mixed.kseg", "b.kseg", out="dropped.kseg")
    assert dropped.returncode != 0 and "weighs its members [3.0, 1.0]; give --stage2-mix" in dropped.stderr
    for bad, problem in ((["1"], "gives 1 share(s) for 2"), (["1", "-1"], "mix must hold finite numbers >= 0")):
        refused = _combine(tmp_path, "a.kseg", "b.kseg", out="bad.kseg", mix=bad)
        assert refused.returncode != 0 and problem in refused.stderr and not (tmp_path / "bad.kseg").exists()


def test_member_weights_study_scores_each_weighting_as_the_weighted_file_predicts(tmp_path):
    """scripts/stage2_member_weights_study.py: its row for a weighting is what a file with that mix scores."""
    import csv

    from kitseg.io import read_ct, read_labels
    from kitseg.metrics import kits_scores

    save_bundle(make_tiny_bundle(seed=1), tmp_path / "a.kseg")
    save_bundle(make_tiny_bundle(seed=2), tmp_path / "b.kseg")
    assert _combine(tmp_path, "a.kseg", "b.kseg").returncode == 0
    case = make_synthetic_case(shape=(12, 40, 44), spacing=(2.5, 1.5, 1.5), seed=3)
    case.save_case_folder(tmp_path / "cases" / "case_00007")
    study = Path(__file__).resolve().parents[1] / "scripts" / "stage2_member_weights_study.py"
    run = subprocess.run([sys.executable, str(study), "--weights", str(tmp_path / "ens.kseg"), "--cases",
                          str(tmp_path / "cases"), "--out", str(tmp_path / "study"), "--mix", "1,1", "3,1"],
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert _combine(tmp_path, "a.kseg", "b.kseg", out="mixed.kseg", mix=("3", "1")).returncode == 0
    volume = read_ct(tmp_path / "cases" / "case_00007" / "imaging.nii.gz")
    reference = read_labels(tmp_path / "cases" / "case_00007" / "segmentation.nii.gz", like=volume).array
    for mix, model in (("1-1", "ens.kseg"), ("3-1", "mixed.kseg")):
        labels = Segmenter.from_file(tmp_path / model, device="cpu").segment(volume).labels
        expected = kits_scores(labels, reference, volume.spacing)
        with open(tmp_path / "study" / f"scores_{mix}.csv") as stream:
            row = next(r for r in csv.DictReader(stream) if r["case"] == "case_00007_cases")
        assert float(row["kidney_dice"]) == pytest.approx(expected.kidney_dice, abs=1e-3), mix
        assert float(row["tumor_ml"]) == pytest.approx(expected.tumor_ml, abs=0.05), mix
    with open(tmp_path / "study" / "false_tumor.csv") as stream:
        row = next(csv.DictReader(stream))
    assert row.keys() == {"case", "1-1", "3-1"}
    assert row["1-1"] != row["3-1"]  # the weighting matters here: the rows above tell them apart


def test_combined_file_can_take_a_mask_in_mm(tmp_path):
    """--mask-radius-mm: the new file's mask is a ball of that many mm; without it, masks must agree."""
    from dataclasses import replace

    from kitseg.config import MaskConfig

    save_bundle(make_tiny_bundle(seed=1), tmp_path / "a.kseg")  # 10 stage-grid voxels
    save_bundle(replace(make_tiny_bundle(seed=2), mask=MaskConfig(0.5, 20.0, "mm")), tmp_path / "b.kseg")
    refused = _combine(tmp_path, "a.kseg", "b.kseg")
    assert refused.returncode != 0 and "differ in mask" in refused.stderr
    args = [sys.executable, str(COMBINE), "--stage1", str(tmp_path / "a.kseg"), "--stage2", str(tmp_path / "a.kseg"),
            str(tmp_path / "b.kseg"), "--out", str(tmp_path / "ens.kseg"), "--mask-radius-mm", "20"]
    assert subprocess.run(args, capture_output=True, text=True).returncode == 0
    assert load_bundle(tmp_path / "ens.kseg").mask == MaskConfig(0.5, 20.0, "mm")
    save_bundle(replace(make_tiny_bundle(seed=3), mask=MaskConfig(0.3)), tmp_path / "c.kseg")
    args[args.index(str(tmp_path / "b.kseg"))] = str(tmp_path / "c.kseg")
    args[args.index(str(tmp_path / "ens.kseg"))] = str(tmp_path / "other.kseg")
    threshold = subprocess.run(args, capture_output=True, text=True)  # the threshold must still agree
    assert threshold.returncode != 0 and "differ in mask" in threshold.stderr


def test_an_ensemble_stage_cannot_be_widened_as_one_network():
    from kitseg.checkpoint import StageModel
    from kitseg.pipeline import widen_stage2

    ensemble = StageModel.from_module(build_network("ensemble", members=[TINY_UNETPP, TINY_UNETPP]))
    assert [m.kwargs for m in ensemble.members] == [TINY_KWARGS, TINY_KWARGS]
    with pytest.raises(ValueError, match="widen its members"):
        widen_stage2(ensemble, 0, 1)


def test_a_member_that_does_not_fit_the_stage_is_refused_on_load(tmp_path):
    save_bundle(make_tiny_bundle(seed=1), tmp_path / "a.kseg")
    save_bundle(make_tiny_bundle(seed=2), tmp_path / "b.kseg")
    assert _combine(tmp_path, "a.kseg", "b.kseg").returncode == 0
    # Rewrite the metadata so that member 1 claims 4 input channels: the file must be refused.
    with np.load(tmp_path / "ens.kseg", allow_pickle=False) as archive:
        arrays = dict(archive)
    meta = json.loads(arrays[METADATA_KEY].tobytes().decode())
    meta["stages"]["2"]["kwargs"]["members"][1]["kwargs"]["in_channels"] = 4
    arrays[METADATA_KEY] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
    with open(tmp_path / "bad.kseg", "wb") as stream:
        np.savez(stream, **arrays)
    with pytest.raises(CheckpointError, match=r"bad\.kseg.*in_channels' is 4 but must be 3"):
        load_bundle(tmp_path / "bad.kseg")
    # A file whose members' mix is not numbers >= 0 is refused the same way, naming it.
    meta["stages"]["2"]["kwargs"]["members"][1]["kwargs"]["in_channels"] = 3
    meta["stages"]["2"]["kwargs"]["mix"] = [1.0, -1.0]
    arrays[METADATA_KEY] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
    with open(tmp_path / "bad_mix.kseg", "wb") as stream:
        np.savez(stream, **arrays)
    with pytest.raises(CheckpointError, match=r"bad_mix\.kseg.*cannot build the network: .*mix must hold"):
        load_bundle(tmp_path / "bad_mix.kseg")
