"""The training cache: prepared cases and training masks on disk, mapped into memory rather than read."""

from __future__ import annotations

import errno

import os
import shutil
from dataclasses import replace

import numpy as np
import pytest

from kitseg.io import InputError, discover_inputs
from kitseg.morphology import dilate_ball
from kitseg.training import preset
from kitseg.training import data as training_data
from kitseg.training.data import load_cases, settle_replaced_entries, training_mask


def _mapped(array: np.ndarray) -> bool:
    return isinstance(array, np.memmap) and not array.flags.writeable


def test_cached_cases_are_mapped_and_equal_the_cases_prepared_in_memory(dataset, tmp_path):
    config = preset("smoke").preprocessing
    in_memory = load_cases(dataset, config, cache_dir=None, progress=False)
    cached = load_cases(dataset, config, cache_dir=tmp_path / "cache", progress=False)
    assert [c.name for c in cached] == [c.name for c in in_memory] == [f"case_{i:05d}" for i in range(4)]
    for a, b in zip(cached, in_memory):
        assert _mapped(a.image) and _mapped(a.labels) and a.cache_stem is not None
        assert a.image.dtype == b.image.dtype == np.float16
        np.testing.assert_array_equal(a.image, b.image)
        np.testing.assert_array_equal(a.labels, b.labels)
        assert a.spacing == b.spacing
    # Several preparation workers write the same cache; this process maps what they wrote.
    with_workers = load_cases(dataset, config, cache_dir=tmp_path / "cache2", progress=False, workers=2)
    for a, b in zip(with_workers, cached):
        assert _mapped(a.image) and a.name == b.name
        np.testing.assert_array_equal(a.image, b.image)


def test_a_prepared_case_is_not_prepared_again_unless_its_files_are_incomplete(dataset, tmp_path, monkeypatch):
    config = preset("smoke").preprocessing
    cache = tmp_path / "cache"
    first = load_cases(dataset, config, cache_dir=cache, progress=False)

    def refuse(*args):
        raise AssertionError("prepared again")

    monkeypatch.setattr(training_data, "_prepare_arrays", refuse)
    again = load_cases(dataset, config, cache_dir=cache, progress=False)
    np.testing.assert_array_equal(again[2].image, first[2].image)
    # A preparation cut short before its record was written leaves no case that looks complete.
    record = next(cache.glob("case_00002-*.json"))
    record.unlink()
    monkeypatch.undo()
    redone = load_cases(dataset, config, cache_dir=cache, progress=False)
    assert record.is_file()
    np.testing.assert_array_equal(redone[2].image, first[2].image)


def test_a_cache_of_the_earlier_format_is_converted_not_prepared_again(dataset, tmp_path, monkeypatch):
    config = preset("smoke").preprocessing
    cache = tmp_path / "cache"
    reference = load_cases(dataset, config, cache_dir=None, progress=False)
    cache.mkdir()
    for case_input, case in zip(sorted(discover_inputs(dataset), key=lambda c: c.name), reference):
        # Until 2026-12-04 a case was one .npz archive, under a key that covered the CT only.
        np.savez(cache / f"{case.name}-{training_data._legacy_cache_key(case_input, config)}.npz",
                 image=case.image, labels=case.labels, spacing=np.array(case.spacing))
    monkeypatch.setattr(training_data, "_prepare_arrays", lambda *a: pytest.fail("prepared again"))
    converted = load_cases(dataset, config, cache_dir=cache, progress=False)
    assert not list(cache.glob("*.npz"))  # the same arrays now live in mappable files
    for a, b in zip(converted, reference):
        assert _mapped(a.image) and a.spacing == b.spacing
        np.testing.assert_array_equal(a.image, b.image)
        np.testing.assert_array_equal(a.labels, b.labels)


def test_entries_keyed_by_path_as_before_are_kept_in_place_and_moved_data_is_not_prepared_again(
        dataset, tmp_path, monkeypatch):
    """Until 2026-12-07 a key covered the files' folder: such entries stay the cases' while the
    data lies where it did; keys now cover names, sizes and times, so data copied with its times
    elsewhere finds its entries too."""
    config = preset("smoke").preprocessing
    cache = tmp_path / "cache"
    inputs = sorted(discover_inputs(dataset), key=lambda c: c.name)
    load_cases(dataset, config, cache_dir=cache, progress=False)
    case = inputs[0]
    # As an earlier version named it: its path-keyed stem (the key's form, pinned here as it was).
    stamps = [item for path in (case.image_path, case.labels_path)
              for item in (str(path.resolve()), path.stat().st_size, path.stat().st_mtime_ns)]
    earlier = training_data._digest([*stamps, config.preparation_key()])
    now = training_data.cache_stem(case, config, cache)
    for f in list(cache.glob(f"{now.name}.*")):
        f.rename(cache / f"{case.name}-{earlier}{f.name[len(now.name):]}")
    assert training_data.cache_stem(case, config, cache).name == f"{case.name}-{earlier}"
    entries = sorted(p.name for p in cache.iterdir())
    monkeypatch.setattr(training_data, "_prepare_arrays", lambda *a: pytest.fail("prepared again"))
    load_cases(dataset, config, cache_dir=cache, progress=False)
    # Copied elsewhere with its times: the others' entries (keyed as now) are found where they are;
    # the path-keyed one would be prepared once more, as its key names the old folder.
    moved = tmp_path / "moved"
    shutil.copytree(dataset, moved)  # copy2: the files' times kept
    load_cases(moved, config, cache_dir=cache, progress=False,
               inputs=[c for c in discover_inputs(moved) if c.name != case.name])
    assert sorted(p.name for p in cache.iterdir()) == entries


def test_corrected_labels_are_prepared_again(dataset, tmp_path, caplog):
    import nibabel as nib

    data = tmp_path / "data"
    shutil.copytree(dataset, data)
    config = preset("smoke").preprocessing
    cache = tmp_path / "cache"
    (case_input,) = [c for c in discover_inputs(data) if c.name == "case_00001"]
    # An archive of the earlier format, older than the labels: they may have changed since (not converted).
    legacy = cache / f"case_00001-{training_data._legacy_cache_key(case_input, config)}.npz"
    cache.mkdir()
    np.savez(legacy, image=np.zeros((1, 1, 1), np.float16), labels=np.zeros((1, 1, 1), np.uint8), spacing=np.ones(3))
    os.utime(legacy, ns=(0, 0))
    before = {c.name: c for c in load_cases(data, config, cache_dir=cache, progress=False)}["case_00001"]
    assert before.image.shape != (1, 1, 1) and not legacy.exists()
    # The user corrects the labels: every tumor voxel becomes kidney.
    path = data / "case_00001" / "segmentation.nii.gz"
    image = nib.load(path)
    corrected = np.asarray(image.dataobj).copy()
    corrected[corrected == 2] = 1
    nib.save(nib.Nifti1Image(corrected, image.affine, image.header), path)
    training_mask(before, preset("smoke").mask)  # cached beside the entry
    # The same case under another recipe, and another folder's case of that name: other runs' entries.
    other_recipe = replace(config, hu_max=config.hu_max + 100)
    load_cases(data, other_recipe, cache_dir=cache, progress=False)
    shutil.copytree(data / "case_00001", tmp_path / "elsewhere" / "case_00001")
    load_cases(tmp_path / "elsewhere", config, cache_dir=cache, progress=False)
    entries = set(cache.glob("case_00001-*"))
    replaced = {p for p in entries if p.name.startswith(before.cache_stem.name + ".")}
    assert len(replaced) == 4  # image, labels, JSON and the training mask
    after = {c.name: c for c in load_cases(data, config, cache_dir=cache, progress=False)}["case_00001"]
    assert (before.labels == 2).any() and not (after.labels == 2).any()
    assert (after.labels == 1).sum() > (before.labels == 1).sum()  # the tumor is kidney now
    # A shared cache (--cache): another job may still train on the entry of the labels before the
    # correction (over NFS, removing it would kill that job): it stays, and a warning names it.
    inputs = discover_inputs(data)
    with caplog.at_level("WARNING"):
        settle_replaced_entries(inputs, config, cache, prune=False)
    assert all(p.exists() for p in replaced)
    assert "1 entry of cases whose files changed since stays in this shared cache" in caplog.text
    assert f"{before.cache_stem.name}.*" in caplog.text
    # A run's own cache (RUN/cache) prunes it, its training mask too; the others' entries stay.
    settle_replaced_entries(inputs, config, cache, prune=True)
    assert not any(p.exists() for p in replaced)
    assert set(cache.glob("case_00001-*")) == entries - replaced | set(cache.glob(f"{after.cache_stem.name}.*"))
    assert len(entries - replaced) == 6  # two entries of three files each
    assert (before.labels == 2).any()  # mapped before: still readable where the system allows it


def test_a_case_whose_name_holds_a_dot_keeps_its_name(dataset, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(dataset / "case_00001", data / "patient.7")
    (case,) = load_cases(data, preset("smoke").preprocessing, cache_dir=tmp_path / "cache", progress=False)
    assert case.name == "patient.7" and _mapped(case.image)


def test_a_damaged_cache_entry_names_its_file(dataset, tmp_path):
    config = preset("smoke").preprocessing
    cache = tmp_path / "cache"
    load_cases(dataset, config, cache_dir=cache, progress=False)
    labels = next(cache.glob("case_00000-*.labels.npy"))
    np.save(labels, np.zeros((3, 4, 5), np.uint8))  # not the recorded shape
    with pytest.raises(InputError, match=r"case_00000-.*inconsistent.*delete the cache folder"):
        load_cases(dataset, config, cache_dir=cache, progress=False)


def test_training_masks_are_cached_per_mask_recipe(dataset, tmp_path):
    config = preset("smoke")
    case = load_cases(dataset, config.preprocessing, cache_dir=tmp_path / "cache", progress=False)[0]
    expected = dilate_ball(case.labels > 0, config.mask.radius, config.mask.dilation_spacing(case.spacing))
    mask = training_mask(case, config.mask)
    assert _mapped(mask)
    np.testing.assert_array_equal(mask, expected)
    files = sorted((tmp_path / "cache").glob(f"{case.cache_stem.name}.mask-*.npy"))
    assert len(files) == 1
    np.testing.assert_array_equal(training_mask(case, config.mask), expected)  # read back, not made again
    wider = replace(config.mask, radius=config.mask.radius + 2)
    assert training_mask(case, wider).sum() > expected.sum()
    assert len(list((tmp_path / "cache").glob(f"{case.cache_stem.name}.mask-*.npy"))) == 2


def test_a_read_only_shared_cache_keeps_new_training_masks_in_memory(dataset, tmp_path, monkeypatch, caplog):
    config = preset("smoke")
    case = load_cases(dataset, config.preprocessing, cache_dir=tmp_path / "cache", progress=False)[0]

    def read_only(path, array):  # a read-only mount (NFS, a container's :ro volume) answers EROFS, not EACCES
        raise OSError(errno.EROFS, "Read-only file system", str(path))

    monkeypatch.setattr(training_data, "save_npy", read_only)
    with caplog.at_level("WARNING"):
        mask = training_mask(case, config.mask)
    expected = dilate_ball(case.labels > 0, config.mask.radius, config.mask.dilation_spacing(case.spacing))
    np.testing.assert_array_equal(mask, expected)
    assert "not writable" in caplog.text and case.name in caplog.text


def test_processes_prepare_their_shares_of_the_cases(dataset, tmp_path, monkeypatch):
    from kitseg.training.data import prepare_cases

    config = preset("smoke").preprocessing
    cache = tmp_path / "cache"
    stems = prepare_cases(dataset, config, cache, progress=False, share=(1, 3))
    assert [s.name.rsplit("-", 1)[0] for s in stems] == ["case_00001"]  # cases 1, 4, ... of 0-3
    assert [p.name.rsplit("-", 1)[0] for p in cache.glob("*.json")] == ["case_00001"]
    for k in (0, 2):
        prepare_cases(dataset, config, cache, progress=False, share=(k, 3))
    assert len(list(cache.glob("*.json"))) == 4
    monkeypatch.setattr(training_data, "_prepare_arrays", lambda *a: pytest.fail("prepared again"))
    cases = load_cases(dataset, config, cache_dir=cache, progress=False)  # all prepared: only mapped
    assert [c.name for c in cases] == [f"case_{i:05d}" for i in range(4)] and all(_mapped(c.image) for c in cases)


def test_prepare_only_fills_the_cache_that_the_training_then_uses(dataset, tmp_path, monkeypatch, capsys):
    from kitseg.cli import main

    run = tmp_path / "run"
    args = ["train", "--data", str(dataset), "--out", str(run), "--preset", "smoke", "--device", "cpu", "--no-progress"]
    assert main([*args, "--prepare-only"]) == 0
    assert "4 cases prepared in" in capsys.readouterr().out
    assert len(list((run / "cache").glob("*.json"))) == 4
    assert not (run / "config.json").exists() and not (run / "model.kseg").exists()  # nothing trained, nothing fixed
    monkeypatch.setattr(training_data, "_prepare_arrays", lambda *a: pytest.fail("prepared again"))
    assert main(args) == 0
    assert (run / "model.kseg").is_file()


def test_a_runs_own_cache_prunes_what_corrected_labels_replace_and_a_shared_one_keeps_it(dataset, tmp_path, caplog):
    """kits-seg train --prepare-only, then labels corrected and prepared again: RUN/cache drops the
    entry of the labels before; a shared --cache keeps it (another job may read it) and names it."""
    import nibabel as nib

    from kitseg.cli import main

    data = tmp_path / "data"
    shutil.copytree(dataset, data)
    shared = tmp_path / "shared"
    runs = {"own": (tmp_path / "run", []), "shared": (tmp_path / "run2", ["--cache", str(shared)])}
    prepare = {name: ["train", "--data", str(data), "--out", str(run), "--preset", "smoke", "--no-progress",
                      "--prepare-only", *extra] for name, (run, extra) in runs.items()}
    for args in prepare.values():
        assert main(args) == 0
    caches = {"own": tmp_path / "run" / "cache", "shared": shared}
    before = {name: set(cache.glob("case_00001-*.json")) for name, cache in caches.items()}
    path = data / "case_00001" / "segmentation.nii.gz"
    image = nib.load(path)
    nib.save(nib.Nifti1Image(np.asarray(image.dataobj) * 0, image.affine, image.header), path)  # all erased
    with caplog.at_level("WARNING"):
        for args in prepare.values():
            assert main(args) == 0
    assert not any(p.exists() for p in before["own"])  # the run's own: pruned
    assert len(list(caches["own"].glob("case_00001-*.json"))) == 1
    assert all(p.exists() for p in before["shared"]) and len(list(shared.glob("case_00001-*.json"))) == 2
    assert f"{shared}: 1 entry of cases whose files changed since stays in this shared cache" in caplog.text


def test_the_cache_size_is_known_from_the_headers_before_anything_is_prepared(dataset, tmp_path):
    config = preset("smoke").preprocessing
    cases = load_cases(dataset, config, cache_dir=tmp_path / "cache", progress=False)
    by_name = {c.name: c for c in cases}
    for case in discover_inputs(dataset):
        assert training_data._stage_voxels(case, config) == by_name[case.name].image.size


def test_a_cache_the_disk_cannot_hold_is_refused_before_preparing_with_the_sizes_named(
        dataset, tmp_path, monkeypatch, capsys):
    import errno
    from collections import namedtuple

    import kitseg.atomic
    from kitseg.cli import main

    config = preset("smoke").preprocessing
    needed = sum(training_data._stage_voxels(c, config) for c in discover_inputs(dataset)) * 3
    usage = namedtuple("usage", "total used free")
    prepare_arrays = training_data._prepare_arrays
    monkeypatch.setattr(kitseg.atomic.shutil, "disk_usage", lambda path: usage(10**12, 10**12 - needed + 1, needed - 1))
    monkeypatch.setattr(training_data, "_prepare_arrays", lambda *a: pytest.fail("prepared without the space"))
    cache = tmp_path / "new" / "cache"  # not made yet: the check looks at the disk it will be on
    with pytest.raises(OSError) as caught:
        load_cases(dataset, config, cache_dir=cache, progress=False)
    assert caught.value.errno == errno.ENOSPC and caught.value.filename == str(cache)
    assert "preparing 4 case(s)" in str(caught.value) and "GB free" in str(caught.value)
    # The command line says it in one line, not a traceback.
    run = tmp_path / "run"
    args = ["train", "--data", str(dataset), "--out", str(run), "--preset", "smoke", "--device", "cpu",
            "--no-progress", "--prepare-only"]
    assert main(args) == 1
    err = capsys.readouterr().err
    assert err.startswith("kits-seg: error: preparing 4 case(s) into the cache needs about") and str(run / "cache") in err
    assert "Traceback" not in err
    # Room for exactly what it needs: prepared.
    monkeypatch.setattr(kitseg.atomic.shutil, "disk_usage", lambda path: usage(10**12, 10**12 - needed, needed))
    monkeypatch.setattr(training_data, "_prepare_arrays", prepare_arrays)
    assert len(load_cases(dataset, config, cache_dir=cache, progress=False)) == 4


def test_a_case_without_labels_is_named_once_per_training(dataset, tmp_path, caplog):
    from kitseg.cli import main

    data = tmp_path / "data"
    data.mkdir()
    for case in dataset.iterdir():
        (data / case.name).symlink_to(case)
    (data / "case_00099").mkdir()
    shutil.copy(dataset / "case_00000" / "imaging.nii.gz", data / "case_00099" / "imaging.nii.gz")  # no mask
    with caplog.at_level("WARNING"):
        assert main(["train", "--data", str(data), "--out", str(tmp_path / "run"), "--preset", "smoke",
                     "--device", "cpu", "--no-progress"]) == 0
    assert caplog.text.count("case(s) without labels (case folders' segmentation.nii.gz or KiTS21's "
                             "aggregated_MAJ_seg.nii.gz, or nnU-Net's labelsTr/NAME.nii.gz for "
                             "imagesTr/NAME_0000.nii.gz) are not trained on: case_00099") == 1


def test_kits21_and_nnunet_layouts_train_on_the_same_cases_as_kits19_folders(dataset, tmp_path, capsys, caplog):
    """KiTS21's reference (aggregated_MAJ_seg.nii.gz) and nnU-Net's raw layout (imagesTr/NAME_0000,
    labelsTr/NAME) are read as KiTS19 case folders: the same names, the same prepared arrays."""
    from kitseg.cli import main

    config = preset("smoke").preprocessing
    kits21, nnunet = tmp_path / "kits21", tmp_path / "Dataset220_KiTS"
    (nnunet / "imagesTr").mkdir(parents=True)
    (nnunet / "labelsTr").mkdir()
    for case in sorted(p.name for p in dataset.iterdir()):
        (kits21 / case).mkdir(parents=True)
        shutil.copy(dataset / case / "imaging.nii.gz", kits21 / case)
        shutil.copy(dataset / case / "segmentation.nii.gz", kits21 / case / "aggregated_MAJ_seg.nii.gz")
        shutil.copy(dataset / case / "imaging.nii.gz", nnunet / "imagesTr" / f"{case}_0000.nii.gz")
        shutil.copy(dataset / case / "segmentation.nii.gz", nnunet / "labelsTr" / f"{case}.nii.gz")
    # nnU-Net's test images have no labels, a label file may have no image: neither trained on, and said.
    shutil.copy(dataset / "case_00000" / "imaging.nii.gz", nnunet / "imagesTr" / "case_00099_0000.nii.gz")
    shutil.copy(dataset / "case_00000" / "segmentation.nii.gz", nnunet / "labelsTr" / "case_00098.nii.gz")
    expected = {c.name: c for c in load_cases(dataset, config, None, progress=False)}
    for data in (kits21, nnunet):
        with caplog.at_level("WARNING"):
            got = {c.name: c for c in load_cases(data, config, None, progress=False)}
        assert got.keys() == expected.keys()
        for name, case in got.items():
            np.testing.assert_array_equal(case.image, expected[name].image)
            np.testing.assert_array_equal(case.labels, expected[name].labels)
    assert "1 case(s) without labels (" in caplog.text and ") are not trained on: case_00099" in caplog.text
    assert "labelsTr: 1 label file(s) without their image (imagesTr/NAME_0000.nii.gz) are not trained on: " \
        "case_00098.nii.gz" in caplog.text
    assert main(["train", "--data", str(nnunet), "--out", str(tmp_path / "run"), "--preset", "smoke",
                 "--prepare-only", "--no-progress"]) == 0
    assert "4 cases prepared" in capsys.readouterr().out
    # A second channel per case is no CT this model reads: refused, naming the folder and the files.
    shutil.copy(dataset / "case_00000" / "imaging.nii.gz", nnunet / "imagesTr" / "case_00000_0001.nii.gz")
    with pytest.raises(InputError, match=r"imagesTr: holds more than one channel per case \(case_00000_0001.nii.gz\)"):
        load_cases(nnunet, config, None, progress=False)
    with pytest.raises(InputError, match=r"no case with labels to train on \(case folders' segmentation.nii.gz or "
                                         r"KiTS21's aggregated_MAJ_seg.nii.gz, or nnU-Net's labelsTr"):
        load_cases(tmp_path / "Dataset220_KiTS" / "labelsTr", config, None, progress=False)
    shutil.rmtree(nnunet / "labelsTr")
    with pytest.raises(InputError, match=r"Dataset220_KiTS: a data set in nnU-Net's layout without labelsTr"):
        load_cases(nnunet, config, None, progress=False)
    # A folder one level too high (KiTS21's repository keeps its cases in data/): said where they are.
    (tmp_path / "kits21_repo").mkdir()
    shutil.move(kits21, tmp_path / "kits21_repo" / "data")
    with pytest.raises(InputError, match=rf"its subfolder data holds case folders: give {tmp_path / 'kits21_repo'}/data"):
        load_cases(tmp_path / "kits21_repo", config, None, progress=False)
    with pytest.raises(InputError, match=r"Dataset220_KiTS is a data set in nnU-Net's layout: give "):
        load_cases(tmp_path, config, None, progress=False)
