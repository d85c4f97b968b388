"""Training: the smoke preset end to end, resume after an interruption, and 2-process DDP (gloo)."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from kitseg.checkpoint import load_bundle, read_metadata
from kitseg.config import ConfigError
from kitseg.io import InputError
from kitseg.networks import build_network
from kitseg.phantom import make_synthetic_case
from kitseg.training import preset
from kitseg.training.data import Stage1Sampler, Stage2Sampler, StageCase, load_cases, split_cases
from kitseg.device import mixed_precision_dtype
from kitseg.training.loop import precision_name, stage1_network_kwargs, train

from .conftest import straight_and_resumed_runs

REPO = Path(__file__).resolve().parents[1]


def test_split_is_reproducible_and_disjoint():
    names = [f"case_{i:05d}" for i in range(10)]
    train_a, val_a = split_cases(names, 0.2, seed=3)
    train_b, val_b = split_cases(list(reversed(names)), 0.2, seed=3)
    assert (train_a, val_a) == (train_b, val_b)
    assert len(val_a) == 2 and not set(train_a) & set(val_a)


def test_out_of_fold_split_keeps_images_of_one_mask_together(dataset, tmp_path):
    from kitseg.training.data import out_of_fold_split

    config = preset("smoke")
    cases = load_cases(dataset, config.preprocessing, cache_dir=None, progress=False)
    names = [[c.name for c in fold] for fold in out_of_fold_split(cases, 2)]
    assert names == [[c.name for c in cases[k::2]] for k in range(2)]  # no repeats: as before
    # A second image drawn around case 0's mask (another phantom seed) must share its fold.
    redraw = StageCase("case_00000_seed1", cases[0].image + 0.1, cases[0].labels.copy(), cases[0].spacing)
    folds = out_of_fold_split(sorted([*cases, redraw], key=lambda c: c.name), 2)
    where = {c.name: k for k, fold in enumerate(folds) for c in fold}
    assert where["case_00000_seed1"] == where["case_00000"]
    assert sorted(where) == sorted(c.name for c in [*cases, redraw]) and all(folds)
    # A twin whose labels differ (its own extra tumors) is tied to its patient by its name.
    grown = cases[1].labels.copy()
    grown[grown == 1] = np.where(np.random.default_rng(0).random(int((grown == 1).sum())) < 0.05, 2, 1)
    twin = StageCase(f"{cases[1].name}_bright", cases[1].image + 0.2, grown, cases[1].spacing)
    everything = sorted([*cases, redraw, twin], key=lambda c: c.name)
    folds = out_of_fold_split(everything, 2)
    where = {c.name: k for k, fold in enumerate(folds) for c in fold}
    assert where[twin.name] == where[cases[1].name] and where["case_00000_seed1"] == where["case_00000"]
    assert sorted(where) == sorted(c.name for c in everything)
    # Other names are not tied: a case called case_00001x is its own patient.
    other = StageCase("case_00001x", cases[1].image, grown, cases[1].spacing)
    assert len(out_of_fold_split([cases[1], other], 2)[1]) == 1


def test_a_validation_case_sharing_a_training_label_map_or_patient_is_named(dataset, tmp_path, caplog):
    import shutil

    data = tmp_path / "data"
    shutil.copytree(dataset, data)
    same_mask = make_synthetic_case(shape=(20, 40, 44), spacing=(2.5, 1.5, 1.5), seed=10)  # case_00000's seed
    replace(same_mask, ct=same_mask.ct + 7).save_case_folder(data / "case_00000_seed1")  # another image of it
    # A twin of case_00001 with other labels (its own extra tumors): tied by its name only.
    twin = make_synthetic_case(shape=(20, 40, 44), spacing=(2.5, 1.5, 1.5), seed=11)
    labels = twin.labels.copy()
    labels[(labels == 1) & (np.arange(labels.shape[-1]) < labels.shape[-1] // 2)] = 2
    replace(twin, labels=labels).save_case_folder(data / "case_00001_bright")
    with caplog.at_level("WARNING", logger="kitseg.training.loop"):
        train(data, tmp_path / "run", preset("smoke"), device="cpu", progress=False,
              val_cases=["case_00000_seed1", "case_00001_bright", "case_00003"])
    assert "validation case case_00000_seed1 has the same label map as training case case_00000" in caplog.text
    assert "validation case case_00001_bright is named as another image of training case case_00001" in caplog.text
    assert "case_00003 has the same" not in caplog.text and "case_00003 is named" not in caplog.text


def test_labels_to_stage_keeps_classes(dataset):
    cases = load_cases(dataset, preset("smoke").preprocessing, cache_dir=None, progress=False)
    assert all(set(np.unique(c.labels)) <= {0, 1, 2} for c in cases)
    assert all((c.labels == 2).any() for c in cases)  # small tumors survive the 5 mm grid


def test_samplers_shapes_and_oof_inputs(dataset):
    config = preset("smoke")
    cases = load_cases(dataset, config.preprocessing, cache_dir=None, progress=False)
    rng = np.random.default_rng(0)
    image, target = Stage1Sampler(cases, 1, 32, 1.0).sample(3, rng)
    assert image.shape == (3, 3, 32, 32) and target.shape == (3, 32, 32) and target.any()
    y1 = {c.name: np.full(c.image.shape, 0.5, np.float16) for c in cases}
    img, y, mask, labels = Stage2Sampler(cases, y1, config.mask, 32, 1.0).sample(2, rng)
    assert img.shape == y.shape == mask.shape == (2, 1, 32, 32) and labels.shape == (2, 32, 32)
    h, w = cases[0].image.shape[1:]  # slices smaller than the crop are zero-padded
    assert np.all(y[..., :h, :w] == 0.5) and np.all(y[..., h:, :] == 0)  # the given (out-of-fold) y1
    assert mask.sum() > 0 and (labels == 2).any()


@pytest.mark.parametrize("labelled_slices", [slice(18, 21), slice(0, 2), slice(38, 40)])
def test_out_of_fold_y1_is_the_full_passs_on_the_slices_stage2_trains_on(labelled_slices):
    """predict_y1(mask_slices_only=True): a full pass's y1 where stage 2's training mask reaches, zero elsewhere."""
    from kitseg.training.data import training_mask
    from kitseg.training.loop import predict_y1

    config = preset("smoke")
    rng = np.random.default_rng(0)
    labels = np.zeros((40, 48, 52), np.uint8)
    labels[labelled_slices, 20:28, 10:20] = 1  # in the middle, and at either end of the volume
    case = StageCase("case_00000", rng.uniform(-1, 1, labels.shape).astype(np.float32), labels, (5.0, 3.0, 3.0))
    torch.manual_seed(0)
    net = build_network(config.stage1_architecture, **stage1_network_kwargs(config)).eval()
    full = predict_y1(net, [case], config, torch.device("cpu"))[case.name]
    partial = predict_y1(net, [case], config, torch.device("cpu"), mask_slices_only=True)[case.name]
    mask_slices = training_mask(case, config.mask).any(axis=(1, 2))
    assert 0 < mask_slices.sum() < len(mask_slices)  # the test needs slices outside the mask
    np.testing.assert_allclose(partial[mask_slices], full[mask_slices], atol=1e-6)
    assert not partial[~mask_slices].any() and full[~mask_slices].any()


def test_stage2_sampler_gives_each_slice_its_neighbours(dataset):
    config = preset("smoke")
    cases = load_cases(dataset, config.preprocessing, cache_dir=None, progress=False)
    # y1 = the slice index, so each sample shows which slices it was cut from.
    y1 = {c.name: np.broadcast_to(np.arange(c.image.shape[0], dtype=np.float16)[:, None, None], c.image.shape)
          for c in cases}
    img, y, mask, labels = Stage2Sampler(cases, y1, config.mask, None, 0.5, context=1).sample(16, np.random.default_rng(1))
    assert img.shape[:2] == y.shape[:2] == mask.shape[:2] == (16, 3) and labels.shape == (16,) + img.shape[2:]
    z = y[:, 1, 0, 0]
    n = cases[0].image.shape[0]
    np.testing.assert_array_equal(y[:, 0, 0, 0], np.maximum(z - 1, 0))  # the edge slice repeats, as at inference
    np.testing.assert_array_equal(y[:, 2, 0, 0], np.minimum(z + 1, n - 1))
    assert np.all(mask[:, 1].reshape(16, -1).any(axis=1))  # the sampled slice is inside the mask


def test_stage2_sampler_redraws_the_tumor_contrast_in_half_the_samples(dataset):
    from scipy import ndimage

    from kitseg.training.data import TUMOR_EDGE_SIGMA_PX

    config = preset("smoke")
    case = load_cases(dataset, config.preprocessing, cache_dir=None, progress=False)[0]
    flat = StageCase(case.name, np.zeros_like(case.image), case.labels, case.spacing)  # the image shows only the shift
    y1 = {case.name: np.full(case.image.shape, 0.5, np.float16)}
    img, _, _, labels = Stage2Sampler([flat], y1, config.mask, None, 1.0, tumor_contrast=0.4).sample(40, np.random.default_rng(2))
    shifts = []
    for image, target in zip(img[:, 0], labels):
        edge = ndimage.gaussian_filter((target == 2).astype(np.float32), TUMOR_EDGE_SIGMA_PX)
        shift = float(image.sum() / edge.sum())
        np.testing.assert_allclose(image, shift * edge, atol=1e-6)  # the tumor, edge blurred, and nothing else
        shifts.append(shift)
    shifts = np.array(shifts)
    assert np.all(np.abs(shifts) <= 0.4) and (shifts > 0).any() and (shifts < 0).any()
    assert 8 <= np.count_nonzero(shifts) <= 32  # about half the samples keep the phantom's own contrast
    with pytest.raises(ConfigError, match="window"):
        config.replace(stage2_tumor_contrast_hu=30.0,
                       preprocessing=replace(config.preprocessing, normalization="zscore"))


def _stage2_loss_of(dataset, config):
    """One smoke-sized stage-2 batch, random logits for it, and ``loss(changes)``: the loss that
    ``stage2_task`` builds for that batch under ``config.replace(**changes)``, on those logits."""
    from kitseg.training.loop import stage2_task

    cases = load_cases(dataset, config.preprocessing, cache_dir=None, progress=False)
    y1 = {c.name: np.full(c.image.shape, 0.5, np.float16) for c in cases}
    arrays = stage2_task(cases, [], y1, {}, config, "cpu").draw_batch(4, np.random.default_rng(0))
    tensors = tuple(torch.from_numpy(a) for a in arrays)
    logits = [torch.randn(4, 3, *tensors[3].shape[1:], generator=torch.Generator().manual_seed(0))]
    centre_mask = tensors[2][:, config.preprocessing.stage2_context_slices]

    def loss(**changes):
        task = stage2_task(cases, [], y1, {}, config.replace(**changes), "cpu")
        _, batch_loss = task.make_batch(tensors, np.random.default_rng(0), torch.device("cpu"))
        return batch_loss(logits)

    return tensors[3], logits, centre_mask, loss


def test_stage2_tumor_weight_reaches_the_loss(dataset):
    from kitseg.losses import deep_supervision_loss

    config = preset("smoke").replace(augment=False)
    labels, logits, centre_mask, loss = _stage2_loss_of(dataset, config)
    assert (labels == 2).any()  # the batch shows tumor
    values = []
    for weight in (1.0, 3.0):
        expected = deep_supervision_loss(logits, labels, centre_mask, dice_weight=config.stage2_dice_weight,
                                         class_weights=(1.0, 1.0, weight))
        values.append(loss(stage2_tumor_weight=weight))
        torch.testing.assert_close(values[-1], expected)
    assert values[1] > values[0]  # the tumor pixels count three times
    with pytest.raises(ConfigError, match="stage2_tumor_weight must be > 0, got 0"):
        config.replace(stage2_tumor_weight=0)


def test_stage2_hard_fraction_reaches_the_loss(dataset):
    from kitseg.losses import deep_supervision_loss
    from kitseg.training.config import TrainConfig

    config = preset("smoke").replace(augment=False, stage2_tumor_weight=3.0)
    labels, logits, centre_mask, loss = _stage2_loss_of(dataset, config)
    expected = deep_supervision_loss(logits, labels, centre_mask, dice_weight=config.stage2_dice_weight,
                                     class_weights=(1.0, 1.0, 3.0), hard_fraction=0.1)
    torch.testing.assert_close(loss(stage2_hard_fraction=0.1), expected)
    assert not torch.allclose(expected, deep_supervision_loss(logits, labels, centre_mask,
                                                              dice_weight=config.stage2_dice_weight,
                                                              class_weights=(1.0, 1.0, 3.0)))
    assert TrainConfig.from_dict(config.replace(stage2_hard_fraction=0.1).to_dict()).stage2_hard_fraction == 0.1
    with pytest.raises(ConfigError, match=r"stage2_hard_fraction must be in \(0, 1\], got 0"):
        config.replace(stage2_hard_fraction=0)


def test_augment_noise_hu_sets_the_training_noise_of_both_stages(dataset):
    from kitseg.training.loop import stage1_task, stage2_task

    config = preset("smoke")
    assert config.augment_noise_sigma() == 0.05  # the amount runs made before the option had: they repeat
    narrow = replace(config.preprocessing, hu_min=0.0, hu_max=300.0)
    assert config.replace(preprocessing=narrow).augment_noise_sigma() == pytest.approx(0.1)  # HU, whatever the window
    cases = load_cases(dataset, config.preprocessing, cache_dir=None, progress=False)
    y1 = {c.name: np.full(c.image.shape, 0.5, np.float16) for c in cases}
    makers = {"stage 1": lambda c: stage1_task(cases, [], c, 2, "stage 1", "cpu"),
              "stage 2": lambda c: stage2_task(cases, [], y1, {}, c, "cpu")}
    for stage, make in makers.items():
        tensors = tuple(torch.from_numpy(a) for a in make(config).draw_batch(4, np.random.default_rng(0)))
        inputs = {hu: make(config.replace(augment_noise_hu=hu)).make_batch(tensors, np.random.default_rng(1), torch.device("cpu"))[0]
                  for hu in (0.0, 15.0, 30.0)}
        # The same draws, the noise scaled: the input moves from the noiseless one twice as far at 30 HU.
        moved_15, moved_30 = inputs[15.0] - inputs[0.0], inputs[30.0] - inputs[0.0]
        assert moved_15.abs().max() > 0, stage
        torch.testing.assert_close(moved_30, 2 * moved_15, rtol=1e-4, atol=1e-5)
    with pytest.raises(ConfigError, match="augment_noise_hu must be >= 0, got -1"):
        config.replace(augment_noise_hu=-1)


def test_switches_must_be_booleans():
    # --set takes JSON: "1" would otherwise slip in where true/false is meant.
    with pytest.raises(ConfigError, match="stage2_dice_per_image must be true or false, got 1"):
        preset("cpu").replace(stage2_dice_per_image=1)
    assert preset("cpu").replace(stage2_dice_per_image=True).stage2_dice_per_image is True


def test_train_smoke_end_to_end(dataset, tmp_path):
    config = preset("smoke")
    model = train(dataset, tmp_path / "run", config, device="cpu", progress=False, command="test")
    bundle = load_bundle(model)
    assert bundle.stage1 is not None and bundle.stage2 is not None
    meta = read_metadata(model)
    prov = meta["provenance"]
    assert prov["validation_cases"] and not set(prov["train_cases"]) & set(prov["validation_cases"])
    assert set(prov["final_validation"]["stage2"]) >= {"val_kidney_dice", "val_tumor_dice"}
    for stage in ("stage1", "stage2"):  # the scores of the networks in the model: their best.kseg's
        kept = read_metadata(tmp_path / "run" / stage / "best.kseg")["provenance"]
        assert prov["final_validation"][stage]["step"] == kept["step"] and isinstance(kept["step"], int)
    assert prov["precision"] == precision_name(mixed_precision_dtype(torch.device("cpu")))  # this CPU's
    for sub in ("stage1", "stage2", "fold1", "fold2"):
        assert (tmp_path / "run" / sub / "best.kseg").is_file()
    assert (tmp_path / "run" / "stage2" / "curves.png").stat().st_size > 1000
    import matplotlib.image

    widths = {sub: matplotlib.image.imread(tmp_path / "run" / sub / "curves.png").shape[1] for sub in ("stage2", "fold1")}
    assert widths["fold1"] < 0.6 * widths["stage2"]  # a fold validates nothing: its loss alone, no empty Dice panel
    assert len((tmp_path / "run" / "stage1" / "log.csv").read_text().splitlines()) == 3  # header + 2 epochs
    oof = sorted(p.stem for p in (tmp_path / "run" / "oof_y1").glob("*.npy"))
    assert oof == prov["train_cases"]
    # The same folder with another recipe is refused, naming the field.
    with pytest.raises(ConfigError, match="learning_rate"):
        train(dataset, tmp_path / "run", config.replace(learning_rate=0.1), device="cpu", progress=False)
    # A run recorded before a recipe field existed resumes: the field reads as its default.
    recorded = json.loads((tmp_path / "run" / "config.json").read_text())
    del recorded["stage2_tumor_contrast_hu"]
    (tmp_path / "run" / "config.json").write_text(json.dumps(recorded))
    # Resuming (a run stopped before its model was written) predicts only the out-of-fold y1 still
    # missing (not yet written, or not copied in).
    model.unlink()
    oof_files = sorted((tmp_path / "run" / "oof_y1").glob("*.npy"))
    oof_files[0].unlink()
    kept_times = {p.name: p.stat().st_mtime_ns for p in oof_files[1:]}
    val_times = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "run" / "val_y1").glob("*.npy")}
    assert train(dataset, tmp_path / "run", config, device="cpu", progress=False) == model
    assert oof_files[0].is_file()
    assert {p.name: p.stat().st_mtime_ns for p in oof_files[1:]} == kept_times
    # The same final stage 1: the validation y1 are not predicted again either.
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "run" / "val_y1").glob("*.npy")} == val_times
    assert len(val_times) == len(prov["validation_cases"])


def test_a_validation_tie_keeps_the_checkpoint_of_lower_training_loss(dataset, tmp_path):
    """Dice 0 on every early validation (or 1 on a few easy cases): the best checkpoint is then
    the one of lowest training loss, not the first."""
    from kitseg.training.loop import DistInfo, stage1_task, train_network

    config = preset("smoke").replace(steps_per_epoch=1)
    cases = load_cases(dataset, config.preprocessing, cache_dir=None, progress=False)
    task = replace(stage1_task(cases, [], config, 4, "stage 1", torch.device("cpu")),
                   validate=lambda module: {"val_foreground_dice": 0.0}, key_metric="val_foreground_dice")
    train_network(task, tmp_path / "net", config, torch.device("cpu"), DistInfo(), "1", {}, progress=False)
    with (tmp_path / "net" / "log.csv").open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    lowest = min(rows, key=lambda row: float(row["train_loss"]))
    assert read_metadata(tmp_path / "net" / "best.kseg")["provenance"]["step"] == int(lowest["step"])


def test_a_batch_the_processes_do_not_divide_is_said_as_it_trains(caplog):
    from kitseg.training.loop import _say_batches_shared, per_process_batch

    assert [per_process_batch(12, n) * n for n in (1, 2, 3, 5, 8, 16)] == [12, 12, 12, 10, 8, 16]
    with caplog.at_level("WARNING"):
        _say_batches_shared(preset("paper"), 4)  # 12 and 8: divided
    assert not caplog.text
    with caplog.at_level("WARNING"):
        _say_batches_shared(preset("paper"), 8)
    assert "stage 1's batch of 12 over 8 processes trains as 8 (1 each)" in caplog.text
    assert "--set batch_size_stage1=8" in caplog.text and "stage 2" not in caplog.text


def test_a_resumed_run_keeps_its_split_and_predicts_changed_cases_again(dataset, tmp_path, caplog):
    import shutil

    data = tmp_path / "data"
    shutil.copytree(dataset, data)
    config = preset("smoke")
    run = tmp_path / "run"
    model = train(data, run, config, device="cpu", progress=False)
    split = json.loads((run / "split.json").read_text())
    model.unlink()  # as if stopped before the model was written: the run resumes
    with pytest.raises(ConfigError, match="--val-cases differ"):
        train(data, run, config, device="cpu", progress=False, val_cases=split["train"][:1])
    # A corrected label file: its case's out-of-fold y1 is predicted again, the others are kept.
    edited = split["train"][0]
    seg = data / edited / "segmentation.nii.gz"
    seg.write_bytes(seg.read_bytes())  # same labels, a new file: as after a correction
    oof = {p.name: p.stat().st_mtime_ns for p in (run / "oof_y1").glob("*.npy")}
    shutil.copytree(data / split["train"][1], data / "case_00099")  # added after the run began
    leftover = run / "stage2" / ".state.pt.k1ll3d.tmp"  # what a job killed mid-save leaves
    leftover.write_bytes(b"half a checkpoint")
    half_plot = run / "fold1" / ".curves.png.a1b2c3.png"  # SIGKILL while the curves were drawn
    half_plot.write_bytes(b"half a picture")
    other_run_writing = run / "cache" / ".case_00001-abc.mask-def.npy.x1y2.npy"  # a cache may be shared
    other_run_writing.write_bytes(b"being written")
    with caplog.at_level("WARNING"):
        assert train(data, run, config, device="cpu", progress=False, val_fraction=0.5) == model
    assert "split was drawn with --val-fraction 0.2, not 0.5; it is kept" in caplog.text  # not silently
    assert not leftover.exists() and (run / "stage2" / "state.pt").is_file() and other_run_writing.exists()
    assert not half_plot.exists() and (run / "fold1" / "curves.png").is_file()
    assert "1 case(s) added since this run began are not used" in caplog.text
    assert not list((run / "cache").glob("case_00099-*"))  # nor prepared
    now = {p.name: p.stat().st_mtime_ns for p in (run / "oof_y1").glob("*.npy")}
    assert now[f"{edited}.npy"] != oof[f"{edited}.npy"]
    assert {k: v for k, v in now.items() if k != f"{edited}.npy"} == {k: v for k, v in oof.items() if k != f"{edited}.npy"}
    model.unlink()
    oof_record = run / "oof_y1" / "sources.json"  # which prepared case each out-of-fold y1 came from
    whole = oof_record.read_text()
    oof_record.write_text('{"case_')  # cut short: the stale y1 it would name cannot be told apart
    with pytest.raises(ConfigError, match="oof_y1/sources.json: not readable as JSON"):
        train(data, run, config, device="cpu", progress=False)
    oof_record.write_text(whole)
    shutil.rmtree(data / split["validation"][0])
    with pytest.raises(ConfigError, match="are gone: " + split["validation"][0]):
        train(data, run, config, device="cpu", progress=False)
    (run / "config.json").write_text('{"preset": "smo')  # a job killed mid-write (before writes were atomic)
    with pytest.raises(ConfigError, match="config.json: not readable as JSON"):
        train(data, run, config, device="cpu", progress=False)


def test_training_data_that_cannot_train_is_refused_before_any_training(dataset, tmp_path):
    import shutil

    import nibabel as nib

    config = preset("smoke")
    with pytest.raises(ConfigError, match=r"validation fraction must be in \[0, 1\)"):
        train(dataset, tmp_path / "a", config, device="cpu", progress=False, val_fraction=1.0)
    # One case left to train on, two folds: the message gives the counts and what to do.
    with pytest.raises(ConfigError, match=r"at least 2 patients .* trains on 1 case\(s\) and validates on 3: add"):
        train(dataset, tmp_path / "b", config, device="cpu", progress=False,
              val_cases=["case_00000", "case_00001", "case_00002"])
    data = tmp_path / "data"
    shutil.copytree(dataset, data)
    seg = nib.load(str(data / "case_00002" / "segmentation.nii.gz"))
    labels = np.asarray(seg.dataobj).copy()
    labels[labels == 2] = 3  # KiTS21's cyst label
    nib.save(nib.Nifti1Image(labels, seg.affine), str(data / "case_00002" / "segmentation.nii.gz"))
    with pytest.raises(InputError, match="case_00002/segmentation.nii.gz: holds label 3"):
        train(data, tmp_path / "c", config, device="cpu", progress=False, cache_dir=tmp_path / "shared")
    assert not (tmp_path / "c").exists()  # the run folder it made, empty: not left behind
    with pytest.raises(ConfigError, match=r"validate on fewer \(a lower --val-fraction, or fewer --val-cases\)$"):
        train(dataset, tmp_path / "d", config, device="cpu", progress=False, val_fraction=0.9)


def test_fine_tuning_starts_from_the_given_model(dataset, tmp_path):
    config = preset("smoke")
    base = train(dataset, tmp_path / "base", config, device="cpu", progress=False)
    # A vanishing learning rate: the fine-tuned networks must still hold the given weights.
    still = config.replace(learning_rate=1e-12)
    tuned = train(dataset, tmp_path / "tuned", still, device="cpu", progress=False, init_from=base)
    before, after = load_bundle(base), load_bundle(tuned)
    for key in ("1", "2"):
        for (name, a), b in zip(before.stage(key).module.named_parameters(), after.stage(key).module.parameters()):
            torch.testing.assert_close(a, b, msg=f"stage {key} {name}")
    prov = read_metadata(tuned)["provenance"]
    assert prov["init_from"]["stage2_sha256"] == read_metadata(base)["stages"]["2"]["weights_sha256"]
    # The out-of-fold models start from scratch (the given weights may have seen these cases).
    fold = load_bundle(tmp_path / "tuned" / "fold1" / "best.kseg").stage1.module
    assert any(not torch.equal(a, b) for a, b in zip(fold.parameters(), before.stage1.module.parameters()))
    # Resuming a fine-tuning run without its starting weights is refused.
    tuned.unlink()  # stopped before its model was written (a finished run is only reported)
    with pytest.raises(ConfigError, match=r"started with --init-from model\.kseg"):
        train(dataset, tmp_path / "tuned", still, device="cpu", progress=False)


def test_keep_stage1_trains_stage2_only_against_the_given_stage1(dataset, tmp_path):
    config = preset("smoke")
    base = train(dataset, tmp_path / "base", config, device="cpu", progress=False)
    kept = train(dataset, tmp_path / "kept", config.replace(seed=1), device="cpu", progress=False,
                 init_from=base, keep_stage1=True)
    before, after = load_bundle(base), load_bundle(kept)
    for a, b in zip(before.stage1.module.state_dict().values(), after.stage1.module.state_dict().values()):
        torch.testing.assert_close(a, b)
    assert not (tmp_path / "kept" / "stage1").exists() and (tmp_path / "kept" / "stage2" / "best.kseg").is_file()
    assert (tmp_path / "kept" / "oof_y1").is_dir()  # stage 2 still learns from out-of-fold y1
    # Each validation y1 names the stage-1 weights it came from: the given model's.
    sources = json.loads((tmp_path / "kept" / "val_y1" / "sources.json").read_text())
    assert {s["stage1_sha256"] for s in sources.values()} == {read_metadata(base)["stages"]["1"]["weights_sha256"]}
    prov = read_metadata(kept)["provenance"]
    assert prov["init_from"]["keep_stage1"] and "val_foreground_dice" in prov["final_validation"]["stage1"]
    # Finished, or stopped before its model was written: the same starting weights, or refused.
    for finished in (True, False):
        if not finished:
            kept.unlink()
        with pytest.raises(ConfigError, match="started with --init-from model.kseg --keep-stage1"):  # without it
            train(dataset, tmp_path / "kept", config.replace(seed=1), device="cpu", progress=False, init_from=base)
    with pytest.raises(ConfigError, match="started with no --init-from"):  # a finished run from scratch
        train(dataset, tmp_path / "base", config, device="cpu", progress=False, init_from=base)
    with pytest.raises(ConfigError, match="needs the model to keep it from"):
        train(dataset, tmp_path / "other", config, device="cpu", progress=False, keep_stage1=True)


def test_validation_y1_copied_in_is_kept_only_from_the_same_stage1(dataset, tmp_path, caplog):
    """A fine-tuning run that keeps stage 1 reuses validation y1 hard-linked from a run of that stage 1;
    a y1 recorded as another stage 1's, or an unreadable record, means predicting again."""
    import os

    config, val = preset("smoke"), ["case_00002"]  # one split for both runs
    base = train(dataset, tmp_path / "base", config, device="cpu", progress=False, val_cases=val)
    base_y1 = tmp_path / "base" / "val_y1" / "case_00002.npy"
    base_bytes = base_y1.read_bytes()
    kept = tmp_path / "kept"
    (kept / "val_y1").mkdir(parents=True)
    for f in (tmp_path / "base" / "val_y1").iterdir():  # as the recipe does (cp -al)
        os.link(f, kept / "val_y1" / f.name)
    y1 = kept / "val_y1" / "case_00002.npy"

    def fine_tune():
        (kept / "model.kseg").unlink(missing_ok=True)  # a finished run is not trained again: resumed before its end
        caplog.clear()
        with caplog.at_level("INFO", logger="kitseg.training.loop"):
            train(dataset, kept, config.replace(seed=1), device="cpu", progress=False, val_cases=val, init_from=base,
                  keep_stage1=True)
        return caplog.text

    assert "kept the y1 of 1 validation case(s)" in fine_tune()
    assert y1.stat().st_ino == base_y1.stat().st_ino  # the very file, not predicted again
    # Recorded as another stage 1's: predicted again, written as a new file (the base run's stays).
    sources_path = kept / "val_y1" / "sources.json"
    sources = json.loads(sources_path.read_text())
    sources["case_00002"]["stage1_sha256"] = "0" * 64
    sources_path.write_text(json.dumps(sources))
    assert "kept the y1" not in fine_tune()
    assert y1.stat().st_ino != base_y1.stat().st_ino and base_y1.read_bytes() == base_bytes
    assert json.loads(sources_path.read_text())["case_00002"]["stage1_sha256"] != "0" * 64
    assert "kept the y1 of 1" in fine_tune()  # the record is whole again
    sources_path.write_text('{"case_00002": ')  # a job killed mid-write (the record is a cache)
    assert "not readable as JSON" in fine_tune() and "kept the y1" not in caplog.text

def test_fine_tuning_refuses_a_model_of_another_recipe(dataset, tmp_path):
    base = train(dataset, tmp_path / "base", preset("smoke"), device="cpu", progress=False)
    # A deeper stage 2 is another network (a wider one is grown from it: see the test below).
    deeper = preset("smoke").replace(stage2_kwargs={"base_channels": 4, "depth": 3, "norm": "batch"})
    with pytest.raises(ConfigError, match=r"model\.kseg: stage 2 is unetpp2d"):
        train(dataset, tmp_path / "deeper", deeper, device="cpu", progress=False, init_from=base)
    assert not (tmp_path / "deeper" / "stage1").exists()  # refused before any training


def test_fine_tuning_an_ensemble_starts_stage2_from_its_first_member(dataset, tmp_path, caplog):
    """The shipped model's stage 2 is an ensemble; --init-from takes its first member."""
    import subprocess
    import sys
    from pathlib import Path

    from kitseg.training.loop import load_initial_weights

    config = preset("smoke")
    first = train(dataset, tmp_path / "first", config, device="cpu", progress=False)
    second = train(dataset, tmp_path / "second", config.replace(seed=1), device="cpu", progress=False)
    script = Path(__file__).resolve().parents[1] / "scripts" / "combine_stages.py"
    ensemble = tmp_path / "ensemble.kseg"
    subprocess.run([sys.executable, str(script), "--stage1", str(first), "--stage2", str(first), str(second),
                    "--out", str(ensemble), "--mask-radius-mm", "20"], check=True, capture_output=True)
    with caplog.at_level("WARNING", logger="kitseg.training.loop"):
        states, record = load_initial_weights(ensemble, config)
    # as the shipped model's: its mask (20 mm) is not the recipe's, and the user is told
    assert "reads stage 2 inside y1 >= 0.5 dilated by 20 mm; the model this run makes will use the recipe's " \
        "y1 >= 0.5 dilated by 10 voxels" in caplog.text
    assert "--set 'mask={\"threshold\":0.5,\"radius\":20.0,\"radius_unit\":\"mm\"}'" in caplog.text
    assert "kits-seg predict --radius 20 --radius-mm" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="kitseg.training.loop"):
        load_initial_weights(first, config)  # the same mask as the recipe's: nothing to say
    assert "reads stage 2 inside" not in caplog.text
    expected = load_bundle(first).stage2.module.state_dict()
    assert states["2"].keys() == expected.keys()
    for name, tensor in expected.items():
        torch.testing.assert_close(states["2"][name], tensor, msg=name)
    assert record["stage2_sha256"] == read_metadata(ensemble)["stages"]["2"]["weights_sha256"]


def test_fine_tuning_gives_stage2_neighbouring_slices(dataset, tmp_path):
    """--stage2-context-slices 1 from a 3-channel model: stage 2 starts from exactly the given network."""
    from kitseg.training.loop import load_initial_weights

    plain = preset("smoke")
    base = train(dataset, tmp_path / "base", plain, device="cpu", progress=False)
    wide = plain.replace(preprocessing=replace(plain.preprocessing, stage2_context_slices=1))
    states, _ = load_initial_weights(base, wide)
    before = load_bundle(base).stage2.module.state_dict()
    first = next(name for name, t in before.items() if t.ndim == 4)
    assert states["2"][first].shape[1] == 9
    torch.testing.assert_close(states["2"][first][:, 3:6], before[first])  # the centre slice: the old weights
    assert not states["2"][first][:, :3].any() and not states["2"][first][:, 6:].any()  # neighbours start at zero
    for name, tensor in before.items():
        if name != first:
            torch.testing.assert_close(states["2"][name], tensor, msg=name)
    result = subprocess.run(
        [sys.executable, "-m", "kitseg.cli", "train", "--data", str(dataset), "--out", str(tmp_path / "wide"),
         "--preset", "smoke", "--device", "cpu", "--no-progress", "--stage2-context-slices", "1",
         "--init-from", str(base)],
        capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO / "src")},
    )
    assert result.returncode == 0, result.stderr
    model = load_bundle(tmp_path / "wide" / "model.kseg")
    assert model.preprocessing.stage2_context_slices == 1 and model.stage2.kwargs["in_channels"] == 9
    # A model that already sees neighbours cannot be narrowed back to the paper's input.
    with pytest.raises(ConfigError, match="stage2_context_slices to at least 1"):
        load_initial_weights(tmp_path / "wide" / "model.kseg", plain)


@pytest.mark.parametrize(("fast_bfloat16", "prefetch"), [(False, False), (True, False), (False, True)],
                         ids=["float32", "mixed-bfloat16", "float32-batches-drawn-ahead"])
def test_resume_after_interruption_reproduces_the_uninterrupted_run(dataset, tmp_path, monkeypatch, caplog, fast_bfloat16,
                                                                    prefetch):
    # Both precisions on any CPU: where bfloat16 is not fast here it is emulated, slower but the same arithmetic.
    from kitseg import device as device_module

    monkeypatch.setattr(device_module, "cpu_has_fast_bfloat16", lambda: fast_bfloat16)
    with caplog.at_level("INFO", logger="kitseg.training.loop"):
        straight, resumed, state, steps = straight_and_resumed_runs(dataset, tmp_path, torch.device("cpu"), prefetch)
    assert ("mixed bfloat16" if fast_bfloat16 else "float32") in caplog.text
    assert state["step"] == 2 and not state["finished"]
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        torch.testing.assert_close(a, b, msg=name)
    assert steps == ["2", "4"]


def test_case_preparation_workers_run_one_blas_thread():
    # N workers each with one BLAS thread per core thrash (kitseg.parallel.one_blas_thread).
    from concurrent.futures import ProcessPoolExecutor

    from threadpoolctl import threadpool_info

    from kitseg.parallel import one_blas_thread

    with ProcessPoolExecutor(max_workers=1, initializer=one_blas_thread) as pool:
        pools = pool.submit(threadpool_info).result()
    blas = [p for p in pools if p["user_api"] == "blas"]
    assert blas and all(p["num_threads"] == 1 for p in blas), pools


def _stage2_draw(dataset):
    config = preset("smoke")
    cases = load_cases(dataset, config.preprocessing, cache_dir=None, progress=False)
    y1 = {c.name: (c.labels > 0).astype(np.float32) for c in cases}
    return Stage2Sampler(cases, y1, config.mask, 32, 0.5).sample


def test_batches_drawn_ahead_are_the_batches_drawn_in_line(dataset):
    from kitseg.training.prefetch import Prefetcher, in_line

    draw = _stage2_draw(dataset)
    # From step 3, as a resumed run starts: the thread must follow the same (seed, rank, step) generators.
    with Prefetcher(draw, 7, 1, 3, 9, 4, depth=2) as ahead:
        drawn_ahead = list(ahead)
    drawn_in_line = list(in_line(draw, 7, 1, 3, 9, 4))
    assert len(drawn_ahead) == len(drawn_in_line) == 6
    for (arrays_a, rng_a), (arrays_b, rng_b) in zip(drawn_ahead, drawn_in_line):
        assert len(arrays_a) == 4 and all(isinstance(a, torch.Tensor) for a in arrays_a)
        for a, b in zip(arrays_a, arrays_b):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
        # The step's augmentation continues each generator where the sampler left it.
        assert rng_a.integers(2**62) == rng_b.integers(2**62)
    assert not torch.equal(drawn_in_line[0][0][0], drawn_in_line[1][0][0])  # each step its own batch


def test_an_error_while_drawing_ahead_reaches_the_training_thread(dataset):
    from kitseg.training.prefetch import Prefetcher

    draw = _stage2_draw(dataset)

    def failing(batch, rng):
        if failing.calls == 2:
            raise ValueError("case_00001: cannot be read")
        failing.calls += 1
        return draw(batch, rng)

    failing.calls = 0
    with Prefetcher(failing, 0, 0, 0, 10, 2) as ahead:
        assert len([next(ahead), next(ahead)]) == 2
        with pytest.raises(ValueError, match="case_00001"):
            next(ahead)
    # Leaving early (Ctrl-C, an error in the step) stops the thread, however many steps were left.
    with Prefetcher(draw, 0, 0, 0, 10**6, 2) as endless:
        next(endless)
    assert not endless._thread.is_alive()


def test_training_with_batches_drawn_ahead_equals_training_in_line(dataset, tmp_path):
    from kitseg.training.loop import DistInfo, stage1_task, train_network

    config = preset("smoke").replace(steps_per_epoch=3)
    cases = load_cases(dataset, config.preprocessing, cache_dir=None, progress=False)
    modules = [train_network(stage1_task(cases, [], config, 5, "stage 1", torch.device("cpu")), tmp_path / str(prefetch),
                             config, torch.device("cpu"), DistInfo(), "1", {}, progress=False, prefetch=prefetch)
               for prefetch in (False, True)]
    for (name, a), b in zip(modules[0].state_dict().items(), modules[1].state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)
    logs = [(tmp_path / str(prefetch) / "log.csv").read_text().splitlines() for prefetch in (False, True)]
    assert [line.split(",")[:2] for line in logs[0]] == [line.split(",")[:2] for line in logs[1]]  # step, loss


@pytest.mark.slow
def test_torchrun_two_processes_gloo(dataset, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "kitseg.cli", "train", "--data", str(dataset), "--out", str(tmp_path / "run"),
           "--preset", "smoke", "--device", "cpu", "--no-progress"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    meta = read_metadata(tmp_path / "run" / "model.kseg")
    assert meta["provenance"]["processes"] == 2
    assert json.loads((tmp_path / "run" / "split.json").read_text())["validation"]
    # Rank 0 speaks for the run: each line once.
    assert proc.stdout.count("model: ") == 1 and proc.stderr.count("stage 1 fold 1/2: ") == 1, proc.stderr[-3000:]


def test_combine_stages_script_takes_each_stage_from_its_file(tmp_path):
    """scripts/combine_stages.py: stage 1 of one file, stage 2 of another, provenance of both."""
    import subprocess
    import sys
    from pathlib import Path

    from kitseg.checkpoint import load_bundle, make_tiny_bundle, read_metadata, save_bundle

    save_bundle(make_tiny_bundle(seed=1), tmp_path / "a.kseg")
    save_bundle(make_tiny_bundle(seed=2), tmp_path / "b.kseg")
    script = Path(__file__).resolve().parents[1] / "scripts" / "combine_stages.py"
    args = [sys.executable, str(script), "--stage1", str(tmp_path / "a.kseg"), "--stage2", str(tmp_path / "b.kseg"),
            "--out", str(tmp_path / "ab.kseg")]
    subprocess.run(args, check=True, capture_output=True)
    meta, a, b = (read_metadata(tmp_path / name) for name in ("ab.kseg", "a.kseg", "b.kseg"))
    assert meta["stages"]["1"]["weights_sha256"] == a["stages"]["1"]["weights_sha256"]
    assert meta["stages"]["2"]["weights_sha256"] == b["stages"]["2"]["weights_sha256"]
    assert meta["provenance"]["combined_from"]["stage1"]["file"] == "a.kseg"
    assert load_bundle(tmp_path / "ab.kseg").stage2 is not None
    assert subprocess.run(args, capture_output=True).returncode != 0  # never overwrites


@pytest.fixture(scope="module")
def smoke_run(dataset, tmp_path_factory):
    """A finished smoke-preset run folder (model.kseg, split, cache, out-of-fold y1)."""
    run = tmp_path_factory.mktemp("smoke_run") / "run"
    train(dataset, run, preset("smoke"), device="cpu", progress=False)
    return run


def test_fit_gap_study_scores_training_and_validation_cases_as_training_does(dataset, smoke_run):
    """scripts/fit_gap_study.py: its validation row is the run's own stage-2 validation, re-measured."""
    model = smoke_run / "model.kseg"
    script = REPO / "scripts" / "fit_gap_study.py"
    proc = subprocess.run([sys.executable, str(script), "--run", str(smoke_run), "--data", str(dataset),
                           "--train-cases", "2"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = {line[:25].strip(): line[25:].split() for line in proc.stdout.splitlines()
            if line.startswith(("training", "validation"))}
    assert set(rows) == {"training (out-of-fold y1)", "training (stage 1's y1)", "validation (stage 1's y1)"}
    assert int(rows["training (out-of-fold y1)"][0]) == int(rows["training (stage 1's y1)"][0]) == 2
    recorded = read_metadata(model)["provenance"]["final_validation"]["stage2"]
    validation = rows["validation (stage 1's y1)"]
    n_val, kidney, tumor = int(validation[0]), float(validation[1]), float(validation[2])
    assert n_val == len(json.loads((smoke_run / "split.json").read_text())["validation"])
    # The same networks and y1; only the cached image's float16 rounding differs.
    assert kidney == pytest.approx(recorded["val_kidney_dice"], abs=0.02)
    assert tumor == pytest.approx(recorded["val_tumor_dice"], abs=0.02)
    for title in ("training (out-of-fold y1)", "training (stage 1's y1)"):
        assert all(0.0 <= float(v) <= 1.0 for v in rows[title][1:3])


def test_stage2_head_study_scores_the_head_average_and_each_head(dataset, smoke_run):
    """scripts/stage2_head_study.py: "all" is what training validated; each head alone is pruned inference."""
    model = smoke_run / "model.kseg"
    script = REPO / "scripts" / "stage2_head_study.py"
    proc = subprocess.run([sys.executable, str(script), "--run", str(smoke_run), "--data", str(dataset),
                           "--weights", str(model)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = {line[:14].strip(): [float(v) for v in line[14:].split()[:2]] for line in proc.stdout.splitlines()
            if line.startswith(("all", "head"))}
    depth = preset("smoke").stage2_kwargs["depth"]
    assert list(rows) == ["all (mean)"] + [f"head {k} only" for k in range(1, depth + 1)]
    recorded = read_metadata(model)["provenance"]["final_validation"]["stage2"]
    assert rows["all (mean)"][0] == pytest.approx(recorded["val_kidney_dice"], abs=0.02)
    assert rows["all (mean)"][1] == pytest.approx(recorded["val_tumor_dice"], abs=0.02)
    assert all(0.0 <= v <= 1.0 for scores in rows.values() for v in scores)


def test_stage2_compare_study_scores_each_model_and_writes_csvs_the_other_scripts_read(dataset, smoke_run, tmp_path):
    """scripts/stage2_compare_study.py: a model's row is the run's own validation and does not depend on the
    models scored before it (y1 shared only by an identical stage 1); its CSVs feed the other scripts."""
    import dataclasses

    from kitseg.checkpoint import load_bundle, make_tiny_bundle, save_bundle

    model = smoke_run / "model.kseg"
    run_preprocessing = load_bundle(model).preprocessing
    other = save_bundle(make_tiny_bundle(seed=3, preprocessing=run_preprocessing), tmp_path / "other.kseg")
    shared = save_bundle(dataclasses.replace(load_bundle(model), stage2=load_bundle(other).stage2),
                         tmp_path / "shared.kseg")  # the run's stage 1, another stage 2
    script = REPO / "scripts" / "stage2_compare_study.py"

    def scores(*weights, csv_dir=None):
        args = [sys.executable, str(script), "--run", str(smoke_run), "--data", str(dataset),
                "--weights", *map(str, weights)] + (["--csv-dir", str(csv_dir)] if csv_dir else [])
        proc = subprocess.run(args, capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return {line.split()[0]: [float(v) for v in line.split()[1:3]] for line in proc.stdout.splitlines()
                if line.startswith(str(tmp_path)) or line.startswith(str(model))}

    rows = scores(model, other, shared, csv_dir=tmp_path / "csv")
    recorded = read_metadata(model)["provenance"]["final_validation"]["stage2"]
    assert rows[str(model)][0] == pytest.approx(recorded["val_kidney_dice"], abs=0.02)
    assert rows[str(model)][1] == pytest.approx(recorded["val_tumor_dice"], abs=0.02)
    assert rows[str(other)] == scores(other)[str(other)]  # its own y1, not the run model's
    assert rows[str(shared)] == scores(shared)[str(shared)]  # the run model's y1, reused

    csvs = tmp_path / "csv"
    assert sorted(p.name for p in csvs.iterdir()) == sorted(["other.csv", "shared.csv", f"{smoke_run.name}.csv"])
    n_val = len(json.loads((smoke_run / "split.json").read_text())["validation"])
    compare = subprocess.run([sys.executable, str(REPO / "scripts" / "compare_scores.py"),
                              str(csvs / f"{smoke_run.name}.csv"), str(csvs / "other.csv")], capture_output=True, text=True)
    assert compare.returncode == 0, compare.stderr[-3000:]
    assert f"{n_val} paired cases" in compare.stdout
    summary = {line.split()[0]: line.split()[1:3] for line in compare.stdout.splitlines() if "_dice" in line}
    assert float(summary["kidney_dice"][0]) == pytest.approx(rows[str(model)][0], abs=1e-4)
    assert float(summary["kidney_dice"][1]) == pytest.approx(rows[str(other)][0], abs=1e-4)
    assert float(summary["tumor_dice"][0]) == pytest.approx(rows[str(model)][1], abs=1e-4)
    miss = subprocess.run([sys.executable, str(REPO / "scripts" / "tumor_miss_study.py"), "--gt", str(dataset),
                           "--scores", str(csvs / "other.csv"), "--where", "--weights", str(model)],
                          capture_output=True, text=True)
    assert miss.returncode == 0, miss.stderr[-3000:]
    assert "cases with a tumor" in miss.stdout and "where the reference tumor went" in miss.stdout
    where = [[float(v) for v in line.split()[-5:]] for line in miss.stdout.splitlines() if line.startswith("case_")]
    assert where
    for outside, tumor, kidney, background, cleaned in where:
        assert 0 <= outside <= 1 and 0 <= cleaned <= tumor + kidney + 0.01
        assert tumor + kidney + background == pytest.approx(1, abs=0.015)  # every voxel gets one class (2 decimals)

    def compared(*files: Path) -> dict[str, list[float]]:
        proc = subprocess.run([sys.executable, str(REPO / "scripts" / "compare_scores.py"), *map(str, files)],
                              capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert f"{len(files) // 2 * n_val} paired cases" in proc.stdout  # the same case in two pairs counts twice
        return {line.split()[0]: [float(v) for v in line.split()[1:3]] for line in proc.stdout.splitlines()
                if line.startswith(("kidney_dice", "tumor_dice", "composite_dice"))}

    first = compared(csvs / f"{smoke_run.name}.csv", csvs / "other.csv")
    few = subprocess.run([sys.executable, str(REPO / "scripts" / "compare_scores.py"), str(csvs / "other.csv"),
                          str(csvs / "shared.csv")], capture_output=True, text=True)
    assert ("too few cases to tell" in few.stdout) == (n_val < 5)  # a bootstrap of so few says nothing
    second = compared(csvs / "shared.csv", csvs / "other.csv")
    pooled = compared(csvs / f"{smoke_run.name}.csv", csvs / "other.csv", csvs / "shared.csv", csvs / "other.csv")
    for metric, (mean_a, mean_b) in pooled.items():  # the pairs' cases pooled: the mean of the two means
        assert mean_a == pytest.approx((first[metric][0] + second[metric][0]) / 2, abs=1.5e-4)
        assert mean_b == pytest.approx(first[metric][1], abs=1e-4)
    # Cases of any name are paired (a scan's, a DICOM series'), not only KiTS's case_XXXXX.
    for name in ("a", "b"):
        report = list(csv.DictReader((csvs / "other.csv").open()))
        with (tmp_path / f"named_{name}.csv").open("w", newline="") as stream:
            writer = csv.DictWriter(stream, fieldnames=list(report[0]))
            writer.writeheader()
            writer.writerows({**row, "case": row["case"].replace("case_", "scan")} for row in report)
    assert compared(tmp_path / "named_a.csv", tmp_path / "named_b.csv")
    odd = subprocess.run([sys.executable, str(REPO / "scripts" / "compare_scores.py"), str(csvs / "other.csv")],
                         capture_output=True, text=True)
    assert odd.returncode != 0 and "give pairs of CSVs" in odd.stderr
    # Reports scored differently (here: cysts in, cysts out) are not compared: the difference would be the scoring's.
    for name, mapping in (("in.csv", "3=1"), ("out.csv", "3=0")):
        report = list(csv.DictReader((csvs / "other.csv").open()))
        with (tmp_path / name).open("w", newline="") as stream:
            writer = csv.DictWriter(stream, fieldnames=[*report[0], "label_mapping"])
            writer.writeheader()
            writer.writerows({**row, "label_mapping": mapping} for row in report)
    mixed = subprocess.run([sys.executable, str(REPO / "scripts" / "compare_scores.py"), str(tmp_path / "in.csv"),
                            str(tmp_path / "out.csv")], capture_output=True, text=True)
    assert mixed.returncode != 0 and "scored differently (label_mapping '3=1' and '3=0')" in mixed.stderr
    # Against a reference with no tumor class, tumor is not scored: not compared either.
    for name in ("kidneys_a.csv", "kidneys_b.csv"):
        report = list(csv.DictReader((csvs / "other.csv").open()))
        with (tmp_path / name).open("w", newline="") as stream:
            writer = csv.DictWriter(stream, fieldnames=list(report[0]))
            writer.writeheader()
            writer.writerows({**row, "tumor_dice": "nan", "composite_dice": "nan"} for row in report)
    kidneys = subprocess.run([sys.executable, str(REPO / "scripts" / "compare_scores.py"),
                              str(tmp_path / "kidneys_a.csv"), str(tmp_path / "kidneys_b.csv")],
                             capture_output=True, text=True)
    assert kidneys.returncode == 0 and "tumor_dice      not scored" in kidneys.stdout
    assert "composite_dice  not scored" in kidneys.stdout and "RuntimeWarning" not in kidneys.stderr

    window = dataclasses.replace(run_preprocessing, hu_max=run_preprocessing.hu_max + 100)
    elsewhere = save_bundle(make_tiny_bundle(seed=4, preprocessing=window), tmp_path / "elsewhere.kseg")
    refused = subprocess.run([sys.executable, str(script), "--run", str(smoke_run), "--data", str(dataset),
                              "--weights", str(model), str(elsewhere)], capture_output=True, text=True)
    assert refused.returncode != 0 and "elsewhere.kseg: trained on another grid or intensity window" in refused.stderr


def test_tumor_miss_study_weighs_false_and_missed_tumor_of_predictions(dataset, smoke_run, tmp_path):
    """tumor_miss_study.py --pred: per case, tumor called in the reference kidney, called elsewhere, and missed (mL)."""
    import nibabel as nib

    from kitseg.cli import main as cli

    pred, scores = tmp_path / "pred", tmp_path / "scores.csv"
    pred.mkdir()
    expected, reference_ml = {}, {}
    for folder in sorted(dataset.glob("case_*")):
        reference = nib.load(folder / "segmentation.nii.gz")
        truth = np.asarray(reference.dataobj).astype(np.uint8)
        if not (truth == 2).any():
            continue
        labels = truth.copy()
        tumor = np.argwhere(truth == 2)
        labels[tuple(tumor[: len(tumor) // 3].T)] = 1  # a third of the tumor missed (called kidney)
        kidney = np.argwhere(truth == 1)
        labels[tuple(kidney[:40].T)] = 2  # 40 kidney voxels called tumor
        background = np.argwhere(truth == 0)
        labels[tuple(background[:25].T)] = 2  # 25 voxels outside called tumor
        nib.save(nib.Nifti1Image(labels, reference.affine), pred / f"prediction_{folder.name.removeprefix('case_')}.nii.gz")
        ml = float(np.prod(reference.header.get_zooms()[:3])) / 1000
        expected[folder.name] = [40 * ml, 25 * ml, (len(tumor) // 3) * ml]
        reference_ml[folder.name] = len(tumor) * ml
    assert expected
    assert cli(["evaluate", "--pred", str(pred), "--gt", str(dataset), "--csv", str(scores)]) == 0
    study = [sys.executable, str(REPO / "scripts" / "tumor_miss_study.py"), "--gt", str(dataset), "--scores", str(scores),
             "--weights", str(smoke_run / "model.kseg")]
    proc = subprocess.run([*study, "--pred", str(pred)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    reported = {line.split()[0]: [float(v) for v in line.split()[-3:]] for line in proc.stdout.splitlines()
                if line.startswith("case_")}
    assert set(reported) == set(expected)
    for case, volumes in reported.items():
        assert volumes == pytest.approx(expected[case], abs=0.06)  # printed to 0.1 mL
    bands = [line for line in proc.stdout.splitlines() if line.startswith("  tumor ")]
    outweighs = sum(int(line.rsplit(" ", 1)[1]) for line in bands)
    assert outweighs == sum(false_in + false_out > reference_ml[case] for case, (false_in, false_out, _) in expected.items())
    missing = subprocess.run([*study, "--pred", str(tmp_path)], capture_output=True, text=True)
    assert missing.returncode != 0 and "no prediction for case_" in missing.stderr


def test_stage2_compare_study_scores_under_a_mask_of_given_mm(dataset, smoke_run):
    """--mask-radius-mm R: every model's stage 2 reads a ball of R mm instead of the run's rule."""
    from kitseg.config import MaskConfig
    from kitseg.pipeline import Segmenter
    from kitseg.training.config import TrainConfig
    from kitseg.training.loop import stage1_y1, stage2_dice

    model = smoke_run / "model.kseg"
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "stage2_compare_study.py"), "--run", str(smoke_run),
                           "--data", str(dataset), "--weights", str(model), "--mask-radius-mm", "7.5"],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "radius=7.5, radius_unit='mm'" in proc.stdout
    row = next(line.split() for line in proc.stdout.splitlines() if line.startswith(str(model)))
    config = TrainConfig.from_dict(json.loads((smoke_run / "config.json").read_text()))
    names = json.loads((smoke_run / "split.json").read_text())["validation"]
    cases = [c for c in load_cases(dataset, config.preprocessing, smoke_run / "cache", progress=False) if c.name in names]
    segmenter = Segmenter(load_bundle(model), device="cpu", batch_size=16)
    mm_mask = config.replace(mask=MaskConfig(config.mask.threshold, 7.5, "mm"))
    expected = stage2_dice(segmenter, cases, stage1_y1(segmenter, cases, config), mm_mask)
    assert float(row[1]) == pytest.approx(np.mean([k for k, _ in expected]), abs=1e-4)
    assert float(row[2]) == pytest.approx(np.mean([t for _, t in expected]), abs=1e-4)


def test_the_studies_read_a_cache_kept_outside_the_run_folder(dataset, smoke_run, tmp_path):
    """A run trained with --cache DIR: --cache DIR reads the cases there instead of preparing them again."""
    import shutil

    run = tmp_path / "run"
    run.mkdir()
    for name in ("config.json", "split.json", "model.kseg"):
        shutil.copy(smoke_run / name, run / name)
    shutil.copytree(smoke_run / "cache", tmp_path / "shared_cache")
    outputs = []
    for run_dir, cache in ((smoke_run, []), (run, ["--cache", str(tmp_path / "shared_cache")])):
        proc = subprocess.run([sys.executable, str(REPO / "scripts" / "stage2_compare_study.py"), "--run", str(run_dir),
                               "--data", str(dataset), "--weights", str(run_dir / "model.kseg"), *cache],
                              capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr[-3000:]
        outputs.append(next(line.split()[1:3] for line in proc.stdout.splitlines() if "model.kseg" in line))
    assert outputs[0] == outputs[1]
    assert not (run / "cache").exists()  # nothing prepared again


def test_fine_tuning_into_a_wider_stage2_starts_from_the_given_networks_output(smoke_run):
    """--init-from with a recipe of more stage-2 base channels grows the file's UNet++ (exactly)."""
    from kitseg.networks import predict_logits
    from kitseg.training.loop import load_initial_weights, stage2_network_kwargs

    model = smoke_run / "model.kseg"
    config = preset("smoke")
    wider = config.replace(stage2_kwargs={**config.stage2_kwargs, "base_channels": 6})
    states, record = load_initial_weights(model, wider)
    grown = build_network(wider.stage2_architecture, **stage2_network_kwargs(wider))
    grown.load_state_dict(states["2"])
    given = load_bundle(model).stage2.module
    x = torch.randn(2, given.in_channels, 24, 24)
    with torch.no_grad():
        torch.testing.assert_close(predict_logits(grown.eval()(x)), predict_logits(given.eval()(x)), atol=1e-5, rtol=1e-5)
    assert record["stage2_sha256"] == read_metadata(model)["stages"]["2"]["weights_sha256"]
    narrower = config.replace(stage2_kwargs={**config.stage2_kwargs, "base_channels": 2})
    with pytest.raises(ConfigError, match="recipe builds"):
        load_initial_weights(model, narrower)


def _two_tumor_case() -> StageCase:
    """Two kidneys; the left holds a large tumor, the right one 8 voxels of tumor. The image is x."""
    labels = np.zeros((10, 64, 96), np.uint8)
    labels[2:8, 20:44, 5:40] = 1
    labels[2:8, 20:44, 56:91] = 1
    labels[2:8, 20:44, 5:25] = 2
    labels[4:6, 30:32, 80:82] = 2
    image = np.broadcast_to(np.arange(96, dtype=np.float32), labels.shape).copy()
    return StageCase("case_00000", image, labels, (5.0, 3.0, 3.0))


def test_tumor_lesions_are_the_3d_pieces():
    from kitseg.training.data import tumor_lesions

    lesions = sorted(tumor_lesions(_two_tumor_case().labels), key=len)
    assert [len(v) for v in lesions] == [8, 6 * 24 * 20]
    assert {tuple(v) for v in lesions[0]} == {(z, y, x) for z in (4, 5) for y in (30, 31) for x in (80, 81)}
    assert tumor_lesions(np.ones((3, 4, 4), np.uint8)) == []


@pytest.mark.parametrize("mode, shown", [("slice", (0, 20)), ("lesion", (35, 65))])
def test_lesion_sampling_shows_a_small_tumor_as_often_as_a_large_one(mode, shown):
    """Every sample is a tumor sample; "lesion" crops around each tumor half the time."""
    case = _two_tumor_case()
    y1 = {case.name: np.zeros(case.image.shape, np.float16)}
    sampler = Stage2Sampler([case], y1, preset("smoke").mask, 16, 1.0, tumor_sampling=mode)
    image, _, _, labels = sampler.sample(100, np.random.default_rng(0))
    small_tumor_shown = ((labels == 2) & (image[:, 0] >= 80)).any(axis=(1, 2))
    assert shown[0] <= small_tumor_shown.sum() <= shown[1]
    if mode == "lesion":
        assert (labels == 2).any(axis=(1, 2)).all()  # the crop is around a tumor, always


def test_slice_sampling_draws_what_it_drew_before_lesion_sampling_existed():
    """Runs recorded before ``tumor_sampling`` repeat bit for bit: the same draws, in the same order."""
    from kitseg.training.data import _crop_window

    case = _two_tumor_case()
    sampler = Stage2Sampler([case], {case.name: np.zeros(case.image.shape, np.float16)}, preset("smoke").mask, 16, 0.5)
    mask = sampler.masks[0]
    mask_slices, tumor_slices = np.flatnonzero(mask.any(axis=(1, 2))), case.tumor_slices
    rng, ref = np.random.default_rng(3), np.random.default_rng(3)
    for _ in range(50):
        # The sampler of 2026-12-04: a case, a tumor slice or a mask slice, then a crop around a random mask pixel.
        ci = int(ref.integers(1))
        z = int(ref.choice(tumor_slices)) if ref.random() < 0.5 else int(ref.choice(mask_slices))
        ys, xs = np.nonzero(mask[z])
        pick = int(ref.integers(ys.size))
        window = (*_crop_window(16, mask.shape[1], ys[pick], ref), *_crop_window(16, mask.shape[2], xs[pick], ref))
        assert sampler.draw_window(rng) == (ci, z, window)


def test_tumor_sampling_must_be_known():
    with pytest.raises(ConfigError, match="tumor_sampling"):
        replace(preset("cpu"), tumor_sampling="random")


def test_every_setting_of_the_shipped_models_recipe_is_a_valid_one() -> None:
    """Each ``--set`` of ``scripts/train_default_model.sh`` names a field of the `cpu` preset with a
    value it takes (a typo would stop a retrain hours in), and every training there goes through
    ``kits_train``, which adds float32 as every shipped network trained."""
    import re

    from kitseg.training.cli import parse_settings
    from kitseg.training.config import TrainConfig

    recipe = (REPO / "scripts" / "train_default_model.sh").read_text()
    commands = "\n".join(line for line in recipe.splitlines() if not line.lstrip().startswith("#"))
    items = [quoted or bare for quoted, bare in re.findall(r"--set\s+(?:'([^']*)'|([^\s\"'}]+))", commands)]
    assert len(items) == len(re.findall(r"--set\b", commands)) >= 8, items  # none skipped by the pattern
    config = preset("cpu")
    for item in items:  # one at a time: a field set twice is checked at each value
        TrainConfig.from_dict({**config.to_dict(), **parse_settings([item], config)})
    assert parse_settings(items, config)["mask"]["radius_unit"] == "mm"
    assert commands.count("$KITS train") == 1
    assert re.search(r'PRECISION=\$\{PRECISION-"--set amp=false"\}\nkits_train\(\) \{ \$KITS train "\$@" \$PRECISION; \}',
                     commands)
    with pytest.raises(ConfigError, match="unknown field 'ampp'"):
        parse_settings(["ampp=false"], config)


def test_set_with_an_object_changes_only_the_keys_it_names():
    from kitseg.training.cli import parse_settings

    config = preset("smoke")
    changes = parse_settings(['stage1_kwargs={"base_channels":8}', 'preprocessing={"hu_min":-100}',
                              'preprocessing={"hu_max":300}'], config)
    assert changes["stage1_kwargs"] == {**config.stage1_kwargs, "base_channels": 8}  # depth 2, batch norm kept
    assert changes["preprocessing"] == {**config.preprocessing.to_dict(), "hu_min": -100, "hu_max": 300}
    with pytest.raises(ConfigError, match=r"'yes' is no JSON value .*; amp is true in this recipe"):
        parse_settings(["amp=yes"], config)
    later = parse_settings(["mask=5", 'mask={"radius":3}'], config)["mask"]  # the later one counts, on the recipe's
    assert later == {**config.mask.to_dict(), "radius": 3}


def test_label_values_of_another_convention_train_once_mapped(dataset, tmp_path, capsys):
    import shutil

    import nibabel as nib

    from kitseg.cli import main

    data = tmp_path / "data"
    shutil.copytree(dataset, data)
    seg_path = data / "case_00002" / "segmentation.nii.gz"
    seg = nib.load(str(seg_path))
    labels = np.asarray(seg.dataobj).copy()
    cyst = labels.copy()
    cyst[labels == 2] = 3  # as KiTS21/23 label cysts
    nib.save(nib.Nifti1Image(cyst, seg.affine), str(seg_path))
    config = preset("smoke")
    with pytest.raises(InputError, match=r"case_00002/segmentation.nii.gz: holds label 3.*--map-labels 3=1"):
        load_cases(data, config.preprocessing, cache_dir=None, progress=False)
    # Mapped onto KiTS19's values, the case trains as the original did; the file is left as it was.
    expected = {c.name: c.labels for c in load_cases(dataset, config.preprocessing, cache_dir=None, progress=False)}
    mapped = config.replace(label_mapping={"3": 2})
    run = tmp_path / "run"
    with pytest.raises(InputError, match="holds label 3"):
        train(data, run, config, device="cpu", progress=False)
    assert not (run / "config.json").exists()  # refused before training: the fix it names may use the same --out
    # Two of the cases carry a phantom's record (as kits-seg phantom writes it): the model keeps how they were drawn.
    for name, seed in (("case_00000", 11), ("case_00003", 12)):
        (data / name / "phantom.json").write_text(json.dumps({"case_seed": seed, "params": {"extra_tumors": [0, 0]}}))
    train(data, run, mapped, device="cpu", progress=False)
    drawn = read_metadata(run / "model.kseg")["provenance"]["phantoms"]
    assert drawn == {"params": [{"params": {"extra_tumors": [0, 0]}, "label_mapping": {}}],
                     "cases": {"case_00000": [11, 0], "case_00003": [12, 0]}}
    cached = {c.name: c for c in load_cases(data, config.preprocessing, run / "cache", progress=False,
                                            mapping=mapped.labels_mapped())}
    np.testing.assert_array_equal(cached["case_00002"].labels, expected["case_00002"])
    assert np.array_equal(np.asarray(nib.load(str(seg_path)).dataobj), cyst)
    assert json.loads((run / "config.json").read_text())["label_mapping"] == {"3": 2}
    # Resuming with another mapping is another recipe: refused, naming it.
    with pytest.raises(ConfigError, match=r'differs in: label_mapping \(the run\'s \{"3":2\}, here \{"3":1\}\)'):
        train(data, run, config.replace(label_mapping={"3": 1}), device="cpu", progress=False)
    # The command line: --map-labels goes into the recipe; a value that is no KiTS19 class is refused.
    assert main(["train", "--data", str(data), "--out", str(tmp_path / "cli"), "--preset", "smoke",
                 "--map-labels", "3=2", "--prepare-only", "--no-progress"]) == 0
    assert "4 cases prepared" in capsys.readouterr().out
    assert main(["train", "--data", str(data), "--out", str(tmp_path / "bad"), "--preset", "smoke",
                 "--map-labels", "3=4"]) == 2
    assert "--map-labels 3=4: labels map to a KiTS19 class: 0 (background), 1 (kidney), 2 (tumor)" in (
        capsys.readouterr().err)
    assert not (tmp_path / "bad").exists()


def test_a_finished_run_is_kept_as_trained_and_says_what_changed_since(dataset, tmp_path, caplog):
    import shutil

    import nibabel as nib

    from kitseg.cli import main

    data = tmp_path / "data"
    shutil.copytree(dataset, data)
    config = preset("smoke")
    run = tmp_path / "run"
    model = train(data, run, config, device="cpu", progress=False, command="first")
    prov = read_metadata(model)["provenance"]
    assert [i["command"] for i in prov["invocations"]] == ["first"]
    split = json.loads((run / "split.json").read_text())
    for k in (1, 2):  # a fold model records the cases it learnt from, not the run's
        fold = read_metadata(run / f"fold{k}" / "best.kseg")["provenance"]
        assert fold["validation_cases"] == [] and set(fold["train_cases"]) < set(split["train"])
        assert sorted(fold["train_cases"] + fold["out_of_fold_y1_of"]) == split["train"]
    written = model.read_bytes()
    # The data moved (copied with its files' times): the same cases, not prepared again.
    entries = sorted(p.name for p in (run / "cache").iterdir())
    shutil.copytree(data, tmp_path / "moved")
    assert main(["train", "--data", str(tmp_path / "moved"), "--out", str(tmp_path / "run2"), "--preset", "smoke",
                 "--cache", str(run / "cache"), "--prepare-only", "--no-progress"]) == 0
    assert sorted(p.name for p in (run / "cache").iterdir()) == entries
    with caplog.at_level("INFO"):
        assert train(tmp_path / "moved", run, config, device="cpu", progress=False, val_fraction=0.5) == model
    assert "differ from the files" not in caplog.text
    assert "split was drawn with --val-fraction 0.2, not 0.5" in caplog.text
    caplog.clear()
    # Edited labels, a case added with values the recipe would refuse, a case gone, other
    # --val-cases: nothing is trained or prepared again, the model stays as it was, and what
    # changed is named.
    edited = split["train"][0]
    seg = data / edited / "segmentation.nii.gz"
    img = nib.load(str(seg))
    labels = np.asarray(img.dataobj).copy()
    labels[labels == 1] = 2
    nib.save(nib.Nifti1Image(labels, img.affine), str(seg))
    shutil.copytree(data / split["train"][1], data / "case_00099")
    nib.save(nib.Nifti1Image(labels + 1, img.affine), str(data / "case_00099" / "segmentation.nii.gz"))  # a 3
    shutil.move(data / split["validation"][0], tmp_path / "set_aside")
    with caplog.at_level("INFO"):
        assert train(data, run, config, device="cpu", progress=False, command="again",
                     val_cases=[split["train"][1]]) == model
    assert model.read_bytes() == written and not list((run / "cache").glob("case_00099-*"))
    differ = f"1 case(s) differ from the files this finished run's model learnt from (edited, or another --data): {edited}"
    assert differ in caplog.text and "finished already" in caplog.text
    assert f"1 case(s) of this run are not in it now: {split['validation'][0]}" in caplog.text
    assert "--val-cases differ from the validation cases this run was trained with" in caplog.text
    shutil.move(tmp_path / "set_aside", data / split["validation"][0])
    # --prepare-only on it prepares its split's cases only (the added one would be refused).
    assert main(["train", "--data", str(data), "--out", str(run), "--preset", "smoke", "--prepare-only",
                 "--no-progress"]) == 0
    assert not list((run / "cache").glob("case_00099-*"))
    # The model written again from its finished networks keeps the record of what they learnt from.
    model.unlink()
    assert train(data, run, config, device="cpu", progress=False, command="re-export") == model
    assert [i["command"] for i in read_metadata(model)["provenance"]["invocations"]] == ["first", "re-export"]
    caplog.clear()
    with caplog.at_level("INFO"):
        train(data, run, config, device="cpu", progress=False)
    assert differ in caplog.text
    # Its split gone, a run that has trained cannot say what it validated on: refused, even
    # without its other records.
    copy = tmp_path / "copy"
    shutil.copytree(run, copy)
    (copy / "split.json").unlink()
    with pytest.raises(ConfigError, match="split.json: is missing, but this run has trained already"):
        train(data, copy, config, device="cpu", progress=False, val_cases=[split["train"][1]])
    (copy / "model.kseg").unlink()
    (copy / "config.json").unlink()
    with pytest.raises(ConfigError, match="split.json: is missing, but this run has trained already"):
        train(data, copy, config, device="cpu", progress=False)
    # The run folder may not lie within the data set.
    with pytest.raises(ConfigError, match="lies within the data folder"):
        train(data, data / "case_00000", config, device="cpu", progress=False)
    assert not (data / "case_00000" / "config.json").exists()


def test_a_mapping_of_every_other_value_is_kept_and_read_back_as_typed():
    """``*=0`` (TotalSegmentator's kidneys: 2=1 3=1 *=0) through the CLI's parse, the recipe's JSON
    and back: the same mapping, the same text, the same cache key."""
    import json

    from kitseg.cli import parse_map_labels
    from kitseg.config import OTHER_LABELS
    from kitseg.io import CaseInput
    from kitseg.training.config import TrainConfig
    from kitseg.training.data import _cache_key

    parsed = parse_map_labels(["2=1", "3=1", "*=0"])
    config = preset("smoke").replace(label_mapping=parsed)
    assert config.label_mapping == {"2": 1, "3": 1, "*": 0}
    again = TrainConfig.from_dict(json.loads(json.dumps(config.to_dict())))
    assert again == config and again.labels_mapped() == {2: 1, 3: 1, OTHER_LABELS: 0} == parsed
    case = CaseInput("case_00000", Path(__file__), Path(__file__))
    assert _cache_key(case, config.preprocessing, again.labels_mapped()) == _cache_key(case, config.preprocessing, parsed)
    with pytest.raises(ConfigError, match="-1=0: a label value is 0..255"):
        preset("smoke").replace(label_mapping={"-1": 0})
