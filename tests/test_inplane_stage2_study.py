"""scripts/inplane_stage2_study.py: y1 brought onto a finer grid as the CT's grid would, and a run
handed them trains stage 2 on them rather than predicting new ones."""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil

import numpy as np
import pytest

from kitseg.checkpoint import load_bundle
from kitseg.config import PreprocessingConfig
from kitseg.preprocess import StageGrid
from kitseg.training.config import preset
from kitseg.training.data import open_cached_case
from kitseg.training.loop import train

from .conftest import load_script, make_affine


@pytest.fixture(scope="module")
def study():
    return load_script("inplane_stage2_study")


def test_y1_resampled_between_stage_grids_matches_the_way_through_the_ct_grid(study):
    # 5 mm slices, as the stage grids': the two ways differ only in-plane
    shape, affine = (15, 200, 180), make_affine("kits", spacing=(5.0, 0.8, 0.8))
    coarse = StageGrid.for_config(shape, affine, PreprocessingConfig(inplane_spacing_mm=2.0))
    fine = StageGrid.for_config(shape, affine, PreprocessingConfig(inplane_spacing_mm=1.0))
    z, y, x = np.meshgrid(*(np.linspace(0, 1, n) for n in coarse.shape), indexing="ij")
    y1 = 1 / (1 + np.exp(-8 * (np.sin(3 * y) * np.cos(2 * x) + z - 0.6)))  # smooth, in [0, 1]
    direct = study.resample_inplane(y1, fine.shape)
    through_ct = fine.to_stage(coarse.to_source(y1))
    assert direct.shape == fine.shape and direct.min() >= 0 and direct.max() <= 1
    # the two ways differ by 0.002 here; corners aligned instead of centres, or half a fine voxel off, by 0.02
    assert np.abs(direct - through_ct).max() < 0.005
    with pytest.raises(ValueError, match="slices differ"):
        study.resample_inplane(y1, (fine.shape[0] + 1,) + fine.shape[1:])


def test_a_fine_grid_run_trains_on_the_resampled_y1_without_predicting_any(study, dataset, tmp_path, caplog):
    config, val = preset("smoke"), ["case_00003"]
    base = tmp_path / "base"
    train(dataset, base, config, device="cpu", progress=False, val_cases=val)
    run, cache, init = tmp_path / "fine", tmp_path / "cache", tmp_path / "init.kseg"
    args = argparse.Namespace(data=dataset, from_run=base, init=base / "model.kseg", spacing=1.5, cache=cache,
                              out_run=run, out_init=init, workers=1)
    assert study.prepare(args) == 0
    oof = sorted((run / "oof_y1").glob("*.npy"))
    assert len(oof) == 3 and (run / "val_y1" / "case_00003.npy").is_file()
    inodes = {p.name: p.stat().st_ino for p in oof}
    stem = cache / json.loads((run / "oof_y1" / "sources.json").read_text())[oof[0].stem]
    fine_image = open_cached_case(stem).image
    assert np.load(oof[0]).shape == fine_image.shape
    assert fine_image.shape[1] > np.load(base / "oof_y1" / oof[0].name).shape[1]

    # The coarse run and starting model are read, never written over; a coarse run without every
    # case's y1, or with validation y1 of another stage 1 (the fine run would predict them again
    # on its own grid), is refused.
    with pytest.raises(SystemExit, match="must differ"):
        study.prepare(argparse.Namespace(**{**vars(args), "out_run": base}))
    other = tmp_path / "other"
    shutil.copytree(base / "val_y1", other / "val_y1")
    with pytest.raises(SystemExit, match="no y1 for 3 case"):
        study.prepare(argparse.Namespace(**{**vars(args), "from_run": other, "out_run": tmp_path / "fine2"}))
    records = json.loads((other / "val_y1" / "sources.json").read_text())
    records["case_00003"]["stage1_sha256"] = "0" * 64
    (other / "val_y1" / "sources.json").write_text(json.dumps(records))
    with pytest.raises(SystemExit, match="not recorded as made by"):
        study.prepare(argparse.Namespace(**{**vars(args), "from_run": other, "out_run": tmp_path / "fine3"}))

    fine = dataclasses.replace(config.preprocessing, inplane_spacing_mm=1.5)
    with caplog.at_level("INFO", logger="kitseg.training.loop"):
        model = train(dataset, run, config.replace(preprocessing=fine, seed=1), device="cpu", progress=False,
                      val_cases=val, cache_dir=cache, init_from=init, keep_stage1=True)
    assert "kept the y1 of 1 validation case(s)" in caplog.text
    assert not (run / "fold1").exists()  # no out-of-fold stage 1 trained: the y1 handed in were used
    assert {p.name: p.stat().st_ino for p in (run / "oof_y1").glob("*.npy")} == inodes
    meta = json.loads((run / "oof_y1" / "sources.json").read_text())
    assert set(meta) == {p.stem for p in oof}
    assert load_bundle(model).preprocessing.inplane_spacing_mm == 1.5
