"""scripts/overfit_study.py: a run that trains stage 2 on cases its starting model never saw,
from that model's own stage-1 y1, without training fold models."""

from __future__ import annotations

import argparse
import json

import pytest

from kitseg.training.config import preset
from kitseg.training.loop import train

from .conftest import load_script


@pytest.fixture(scope="module")
def study():
    return load_script("overfit_study")


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory):
    from kitseg.phantom import make_synthetic_case

    root = tmp_path_factory.mktemp("phantoms")
    for i in range(5):
        make_synthetic_case(shape=(20, 40, 44), spacing=(2.5, 1.5, 1.5), seed=30 + i).save_case_folder(
            root / f"case_{i:05d}")
    return root


def test_a_run_on_unseen_masks_learns_from_the_models_own_y1(study, phantoms, tmp_path):
    # The starting model: trained on cases 0 and 1, validated on 2.
    base_data = tmp_path / "base_data"
    base_data.mkdir()
    for name in ("case_00000", "case_00001", "case_00002"):
        (base_data / name).symlink_to(phantoms / name, target_is_directory=True)
    config = preset("smoke")
    model = train(base_data, tmp_path / "base", config, device="cpu", progress=False, val_cases=["case_00002"])

    data, run = tmp_path / "data", tmp_path / "run"
    args = argparse.Namespace(phantoms=phantoms, cases=["case_00003", "case_00004"], val_cases=["case_00002"],
                              data=data, run=run, weights=model, preset="smoke", workers=1)
    with pytest.raises(SystemExit, match="trained on the masks of case_00000"):
        study.prepare(argparse.Namespace(**{**vars(args), "cases": ["case_00000", "case_00004"]}))
    with pytest.raises(SystemExit, match="trained on the masks of case_00001_radial"):  # another image, same mask
        study.prepare(argparse.Namespace(**{**vars(args), "cases": ["case_00001_radial", "case_00004"]}))
    with pytest.raises(SystemExit, match="both a training and a validation case"):
        study.prepare(argparse.Namespace(**{**vars(args), "val_cases": ["case_00003"]}))
    with pytest.raises(SystemExit, match="at least 2 masks"):
        study.prepare(argparse.Namespace(**{**vars(args), "cases": ["case_00003"]}))
    assert not run.exists() and not data.exists()  # refused before anything is made
    other = tmp_path / "other_data"
    (other / "case_00001").mkdir(parents=True)
    with pytest.raises(SystemExit, match="holds other cases too"):
        study.prepare(argparse.Namespace(**{**vars(args), "data": other}))
    assert [p.name for p in other.iterdir()] == ["case_00001"]  # no link left behind

    assert study.prepare(args) == 0
    assert sorted(p.name for p in data.iterdir()) == ["case_00002", "case_00003", "case_00004"]
    y1_files = sorted((run / "oof_y1").glob("*.npy"))
    assert [p.stem for p in y1_files] == ["case_00003", "case_00004"]
    inodes = {p.name: p.stat().st_ino for p in y1_files}
    with pytest.raises(SystemExit, match="not an empty folder"):
        study.prepare(args)

    trained = train(data, run, config.replace(augment=False), device="cpu", progress=False,
                    val_cases=["case_00002"], init_from=model, keep_stage1=True)
    assert not list(run.glob("fold*"))  # the y1 handed in were used: no fold model trained
    assert {p.name: p.stat().st_ino for p in (run / "oof_y1").glob("*.npy")} == inodes
    assert json.loads((run / "split.json").read_text())["train"] == ["case_00003", "case_00004"]
    assert trained.is_file()


def test_the_masks_a_model_trained_on_are_found_in_every_member(study):
    provenance = {"combined_from": {
        "stage1": {"provenance": {"train_cases": ["case_00001"], "init_from": {"file": "start.kseg"}}},
        "stage2": [{"provenance": {"train_cases": ["case_00002"]}},
                   {"provenance": {"combined_from": {"stage2": [{"provenance": {"train_cases": ["case_00009_s31"]}}]}}}]}}
    masks, started_from = study.trained_on(provenance)
    assert masks == {"case_00001", "case_00002", "case_00009"}
    assert started_from == {"start.kseg"}
