"""napari-kits reader, writer, sample data and manifest (no viewer needed)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from .conftest import ORIENTATIONS, REPO, make_affine
from .conftest_plugin import case_folder, isolated_settings, small_case  # noqa: F401 (fixtures)

pytest.importorskip("napari")

from napari_kits._layers import LABEL_COLORS, geometry_of, placement  # noqa: E402
from napari_kits._reader import napari_get_reader, read_kits  # noqa: E402
from napari_kits._save import SaveError  # noqa: E402
from napari_kits._writer import write_labels, write_probability  # noqa: E402

MANIFEST = REPO / "napari_kits" / "napari.yaml"


def _save(array, affine, path):
    img = nib.Nifti1Image(array, affine)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    nib.save(img, str(path))
    return path


def _meta(layer_data):
    """The ``meta`` napari hands a writer: the layer's attributes, metadata included."""
    return {"metadata": layer_data[1]["metadata"], "name": layer_data[1]["name"]}


def test_manifest_validates_and_its_commands_import():
    import npe2
    from npe2.manifest.utils import import_python_name

    manifest = npe2.PluginManifest.from_file(MANIFEST)
    assert manifest.name == "napari-kits"
    for command in manifest.contributions.commands:
        assert callable(import_python_name(command.python_name)), command.python_name
    assert [w.display_name for w in manifest.contributions.widgets] == ["KiTS segmentation"]
    assert {r.accepts_directories for r in manifest.contributions.readers} == {True}
    assert manifest.contributions.sample_data[0].key == "synthetic"


def test_manifest_modules_do_not_import_torch():
    code = (
        "import sys; import napari_kits._reader, napari_kits._writer, napari_kits._sample_data, "
        "napari_kits._widget, napari_kits.launch; "
        "assert 'torch' not in sys.modules, 'torch imported'; "
        "assert 'kitseg.pipeline' not in sys.modules"
    )
    env_path = f"{REPO / 'src'}:{REPO}"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO,
                            env={"PYTHONPATH": env_path, "PATH": "/usr/bin:/bin"})
    assert result.returncode == 0, result.stderr


def test_reader_accepts_nifti_and_case_folders_only(tmp_path, case_folder):
    assert napari_get_reader(str(case_folder)) is read_kits
    assert napari_get_reader(str(case_folder / "imaging.nii.gz")) is read_kits
    assert napari_get_reader(str(tmp_path / "SCAN.NII.GZ")) is read_kits  # upper-case names, as some exporters write
    assert napari_get_reader([str(case_folder)]) is read_kits
    assert napari_get_reader(str(tmp_path / "image.tif")) is None
    assert napari_get_reader(str(tmp_path)) is None  # a folder without imaging.nii.gz
    assert napari_get_reader([str(case_folder), str(case_folder)]) is None


def test_case_folder_gives_ct_and_ground_truth(case_folder, small_case):
    layers = read_kits(str(case_folder))
    assert [t for _, _, t in layers] == ["image", "labels"]
    (ct, ct_kwargs, _), (gt, gt_kwargs, _) = layers
    np.testing.assert_array_equal(ct, small_case.ct)  # KiTS layout is the internal orientation
    np.testing.assert_array_equal(gt, small_case.labels)
    assert ct_kwargs["contrast_limits"] == (-160.0, 240.0) and ct_kwargs["colormap"] == "gray"
    assert ct_kwargs["scale"] == pytest.approx(small_case.spacing)
    assert gt_kwargs["scale"] == ct_kwargs["scale"] and gt_kwargs["translate"] == ct_kwargs["translate"]
    assert gt_kwargs["name"] == "case_00007 ground truth"
    assert geometry_of(gt_kwargs).case_id == "00007"
    assert gt_kwargs["colormap"][1] == LABEL_COLORS[1]


def test_a_kits21_case_folder_opens_with_its_majority_vote_as_ground_truth(tmp_path, case_folder, small_case):
    kits21 = tmp_path / "case_00007"
    kits21.mkdir()
    shutil.copy(case_folder / "imaging.nii.gz", kits21)
    shutil.copy(case_folder / "segmentation.nii.gz", kits21 / "aggregated_MAJ_seg.nii.gz")
    (ct, _, _), (gt, gt_kwargs, _) = read_kits(str(kits21))
    np.testing.assert_array_equal(gt, small_case.labels)
    assert gt_kwargs["name"] == "case_00007 ground truth"
    assert geometry_of(gt_kwargs).read_from == kits21 / "aggregated_MAJ_seg.nii.gz"


@pytest.mark.parametrize("orientation", ORIENTATIONS)
def test_labels_round_trip_through_reader_and_writer(tmp_path, orientation):
    rng = np.random.default_rng(3)
    shape = (11, 9, 7) if orientation == "kits" else (7, 9, 11)
    affine = make_affine(orientation)
    ct = rng.integers(-1000, 1000, size=shape).astype(np.int16)
    labels = rng.integers(0, 3, size=shape).astype(np.uint8)
    ct_path = _save(ct, affine, tmp_path / "ct.nii.gz")
    labels_path = _save(labels, affine, tmp_path / "ct_seg.nii.gz")

    [(ct_data, ct_kwargs, ct_type)] = read_kits(str(ct_path))
    [(lab_data, lab_kwargs, lab_type)] = read_kits(str(labels_path))
    assert (ct_type, lab_type) == ("image", "labels")
    assert lab_kwargs["scale"] == ct_kwargs["scale"] and lab_kwargs["translate"] == ct_kwargs["translate"]
    assert sorted(ct_kwargs["scale"]) == pytest.approx([0.7, 0.8, 2.5])

    # The writer puts the (internal) layer data back on the file's exact grid.
    written = write_labels(str(tmp_path / "out.nii.gz"), lab_data, _meta((lab_data, lab_kwargs, lab_type)))
    back = nib.load(written[0])
    assert back.shape == shape
    np.testing.assert_allclose(back.affine, affine, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(back.dataobj), labels)
    # A label map opened to be corrected is an input too: saved over itself, the message says which.
    before = labels_path.read_bytes()
    with pytest.raises(SaveError, match="refusing to overwrite the labels file it was opened from"):
        write_labels(str(labels_path), lab_data, _meta((lab_data, lab_kwargs, lab_type)))
    assert labels_path.read_bytes() == before

    # World placement: voxel centres of the layer land on the file's world points (projected).
    scale, translate = np.array(ct_kwargs["scale"]), np.array(ct_kwargs["translate"])
    internal = geometry_of(ct_kwargs).source.internal_affine()
    axes = internal[:3, :3] / np.linalg.norm(internal[:3, :3], axis=0)
    for idx in [(0, 0, 0), (2, 3, 4)]:
        world_ras = internal @ np.array([*idx, 1.0])
        np.testing.assert_allclose(translate + scale * np.array(idx), axes.T @ world_ras[:3], atol=1e-6)


def test_writer_appends_suffix_and_refuses_the_input_ct(tmp_path, case_folder):
    (_, ct_kwargs, _), (gt, gt_kwargs, _) = read_kits(str(case_folder))
    out = write_labels(str(tmp_path / "pred"), gt, {"metadata": gt_kwargs["metadata"]})
    assert out == [str(tmp_path / "pred.nii.gz")]
    before = (case_folder / "imaging.nii.gz").read_bytes()
    with pytest.raises(SaveError, match="refusing to overwrite the input CT"):
        write_labels(str(case_folder / "imaging.nii.gz"), gt, {"metadata": gt_kwargs["metadata"]})
    assert (case_folder / "imaging.nii.gz").read_bytes() == before
    with pytest.raises(SaveError, match="no CT geometry"):
        write_labels(str(tmp_path / "x.nii.gz"), gt, {"metadata": {}})
    with pytest.raises(SaveError, match="not a result"):
        write_probability(str(tmp_path / "ct.nii.gz"), gt, {"metadata": ct_kwargs["metadata"]})
    # Any other refusal is a SaveError too, with the path: napari hides a writer's ValueError.
    with pytest.raises(SaveError, match=r"cut\.nii\.gz: .*shape"):
        write_labels(str(tmp_path / "cut.nii.gz"), gt[:-1], {"metadata": gt_kwargs["metadata"]})
    assert not (tmp_path / "cut.nii.gz").exists()
    # napari's File > Save shows the message alone: it names the layer.
    painted = gt.copy()
    painted[0, 0, 0] = 5
    with pytest.raises(SaveError, match="the layer 'my labels' holds label 5"):
        write_labels(str(tmp_path / "p.nii.gz"), painted, {"metadata": gt_kwargs["metadata"], "name": "my labels"})


def test_stage_grid_layers_overlay_the_ct(small_case):
    """A stage-grid voxel's world position equals the CT's at the matching source coordinate."""
    from kitseg.config import PreprocessingConfig
    from kitseg.geometry import Volume
    from kitseg.preprocess import StageGrid

    volume = Volume.from_source_array(small_case.ct, small_case.affine)
    grid = StageGrid.for_volume(volume, PreprocessingConfig())
    ct_scale, ct_translate = map(np.array, placement(volume.affine))
    st_scale, st_translate = map(np.array, placement(grid.affine))
    zoom = np.array(grid.zoom)
    for j in [(0, 0, 0), (3, 10, 20)]:
        source_index = (np.array(j) + 0.5) * zoom - 0.5
        np.testing.assert_allclose(st_translate + st_scale * j, ct_translate + ct_scale * source_index, atol=1e-6)
    assert st_scale[0] == pytest.approx(5.0, rel=0.05)


def test_sample_data_is_a_ct_with_ground_truth():
    from napari_kits._sample_data import make_sample_data

    (ct, kw, kind), (gt, gkw, gkind) = make_sample_data(shape=(12, 40, 44))
    assert (kind, gkind) == ("image", "labels")
    assert ct.shape == gt.shape == (12, 40, 44)
    assert set(np.unique(gt)) <= {0, 1, 2} and (gt == 1).any()
    assert geometry_of(kw).kind == "ct" and geometry_of(gkw).kind == "ground_truth"


def test_reader_tells_label_maps_and_probability_maps_from_cts(tmp_path, case_folder, monkeypatch):
    """Whatever type a label map is stored as, it opens as labels; a saved y1 opens as a probability image."""
    from napari_kits._layers import geometry_of
    from napari_kits._save import save_layer

    [(ct, ct_kwargs, kind)] = read_kits(str(case_folder / "imaging.nii.gz"))
    assert kind == "image" and geometry_of(ct_kwargs).kind == "ct"
    assert ct_kwargs["name"] == case_folder.name and geometry_of(ct_kwargs).case_id == case_folder.name[5:]
    affine = nib.load(str(case_folder / "imaging.nii.gz")).affine
    reference = np.asarray(nib.load(str(case_folder / "segmentation.nii.gz")).dataobj)
    import kitseg.io

    reads = []
    real_read = kitseg.io.read_volume
    monkeypatch.setattr(kitseg.io, "read_volume", lambda path, **kw: reads.append(path) or real_read(path, **kw))
    for dtype, name in ((np.float32, "reader_a.nii.gz"), (np.int16, "case1_gt.nii.gz"), (np.uint8, "x_labels.nii")):
        reads.clear()
        [(data, kwargs, kind)] = read_kits(str(_save(reference.astype(dtype), affine, tmp_path / name)))
        assert kind == "labels" and data.dtype == np.uint8, name
        assert len(reads) == 1, reads  # a label map is read once, not again to check it
        # A reference unasked, unless named as a result (a saved prediction, opened to be corrected).
        assert geometry_of(kwargs).offered_as_reference == (name != "x_labels.nii"), name
    kits21 = reference.copy()
    kits21[reference == 1] = 3  # KiTS21's cysts: KiTS colours, 3 in magenta; a reference (its 3s scored as kidney)
    [(data, kwargs, kind)] = read_kits(str(_save(kits21, affine, tmp_path / "kits21.nii.gz")))
    assert kwargs["colormap"][2] == LABEL_COLORS[2] and geometry_of(kwargs).offered_as_reference
    # KiTS21's per-annotator masks hold 1 for one structure: shown in its class's colour, and no reference unasked.
    for structure, colour in (("tumor", LABEL_COLORS[2]), ("kidney", LABEL_COLORS[1]), ("cyst", "#ff00ff")):
        name = f"{structure}_instance-1_annotation-2.nii.gz"
        [(instance, instance_kwargs, kind)] = read_kits(str(_save((reference == 2).astype(np.uint8), affine,
                                                                  tmp_path / name)))
        assert kind == "labels" and instance_kwargs["colormap"][1] == colour, name
        assert not geometry_of(instance_kwargs).offered_as_reference, name
    # Corrected and saved, its cysts stay: they are the file's convention. A value painted anew is refused.
    assert geometry_of(kwargs).file_labels == (3,)
    from napari_kits._save import SaveError

    corrected = data.copy()
    z = np.nonzero(data == 3)[0][0]
    corrected[z][corrected[z] == 3] = 1  # one slice's cysts made kidney
    saved = save_layer(corrected, geometry_of(kwargs), tmp_path / "kits21_corrected.nii.gz")
    np.testing.assert_array_equal(read_kits(str(saved))[0][0], corrected)
    assert 3 in corrected
    corrected[0, 0, 0] = 5
    with pytest.raises(SaveError, match="holds label 5"):
        save_layer(corrected, geometry_of(kwargs), tmp_path / "kits21_painted.nii.gz")
    y1 = geometry_of(ct_kwargs).with_kind("probability")
    probability = np.linspace(0.0, 1.0, ct.size, dtype=np.float32).reshape(ct.shape)
    saved = save_layer(probability, y1, tmp_path / "scan_y1.nii.gz")
    [(data, kwargs, kind)] = read_kits(str(saved))
    assert kind == "image" and geometry_of(kwargs).kind == "probability"
    np.testing.assert_allclose(data, probability, atol=0.5 / 255 + 1e-6)
    again = save_layer(data, geometry_of(kwargs), tmp_path / "scan_y1_again.nii.gz")  # and back out
    assert nib.load(str(again)).get_fdata().max() == pytest.approx(1.0)


def test_an_organ_map_of_many_classes_opens_as_labels_and_an_8_bit_ct_as_a_ct(tmp_path, case_folder):
    """Another tool's label map (TotalSegmentator's hold over a hundred classes) is no CT to
    segment; a CT stored as 8-bit windowed values, with noise, is one."""
    affine = make_affine("ras")
    organs = np.zeros((6, 80, 128), np.uint8)
    for k in range(62):  # 62 classes, each a block of voxels, as organs are (the real one's rows: 95% flat)
        organs[:, (k // 8) * 10:(k // 8) * 10 + 10, (k % 8) * 16:(k % 8) * 16 + 16] = k
    [(data, kwargs, kind)] = read_kits(str(_save(organs, affine, tmp_path / "organs.nii.gz")))
    assert kind == "labels" and geometry_of(kwargs).kind == "labels"
    assert "colormap" not in kwargs  # napari's own colours: KiTS19's would show 59 classes alike
    assert not geometry_of(kwargs).offered_as_reference  # so never chosen as a reference unasked
    rng = np.random.default_rng(0)
    windowed = np.clip(organs * 3.0 + rng.normal(100, 12, organs.shape), 0, 255).astype(np.uint8)
    [(data, kwargs, kind)] = read_kits(str(_save(windowed, affine, tmp_path / "ct8.nii.gz")))
    assert kind == "image" and geometry_of(kwargs).kind == "ct"


def test_a_saved_class_probability_file_opens_as_one_layer_per_class(tmp_path, case_folder):
    """`kits-seg predict --save-intermediates` writes NAME_probs (channels last): it opens over its CT."""
    from kitseg.io import read_ct, write_on_source_grid
    from napari_kits._layers import geometry_of

    ct = read_ct(case_folder)
    rng = np.random.default_rng(0)
    probs = rng.dirichlet(np.ones(3), size=ct.shape).astype(np.float32)  # (Z, Y, X, 3), rows sum to 1
    path = write_on_source_grid(np.round(probs * 255).astype(np.uint8), ct.source, tmp_path / "scan_probs.nii.gz",
                                scale=1.0 / 255.0)
    layers = read_kits(str(path))
    assert [(kwargs["name"], kind) for _, kwargs, kind in layers] == [
        ("scan_probs P(kidney)", "image"), ("scan_probs P(tumor)", "image")]
    for k, (data, kwargs, _) in enumerate(layers, start=1):
        assert geometry_of(kwargs).kind == "probability" and data.shape == ct.shape
        np.testing.assert_allclose(data, probs[..., k], atol=0.5 / 255 + 1e-6)
    [(_, ct_kwargs, _), _] = read_kits(str(case_folder))
    assert layers[0][1]["scale"] == ct_kwargs["scale"] and layers[0][1]["translate"] == ct_kwargs["translate"]
    # A 4D volume of other values (a multi-phase CT, say) is not taken for probabilities.
    phases = _save(np.full((4, 5, 6, 2), -100, np.int16), np.eye(4), tmp_path / "twophase.nii.gz")
    with pytest.raises(ValueError, match="twophase.nii.gz: a 4D volume whose values are not probabilities"):
        read_kits(str(phases))
    # A y1 where stage 1 found nothing (all zeros) is still a probability map, not empty labels.
    empty = write_on_source_grid(np.zeros(ct.shape, np.uint8), ct.source, tmp_path / "scan_y1.nii.gz", scale=1 / 255)
    [(_, kwargs, kind)] = read_kits(str(empty))
    assert kind == "image" and geometry_of(kwargs).kind == "probability"


def test_a_kits23_case_folders_ground_truth_keeps_its_cysts_when_saved(tmp_path, case_folder):
    """KiTS23's segmentation.nii.gz labels cysts 3: its ground truth, corrected, saves them back."""
    import shutil

    from napari_kits._layers import geometry_of
    from napari_kits._save import save_layer

    folder = tmp_path / "case_00023"
    shutil.copytree(case_folder, folder)
    seg = nib.load(str(folder / "segmentation.nii.gz"))
    labels = np.asarray(seg.dataobj).copy()
    kidney = np.argwhere(labels == 1)[:30]
    labels[tuple(kidney.T)] = 3
    nib.save(nib.Nifti1Image(labels, seg.affine), str(folder / "segmentation.nii.gz"))
    (ct, _, _), (gt, gt_kwargs, kind) = read_kits(str(folder))
    assert kind == "labels" and geometry_of(gt_kwargs).file_labels == (3,)
    saved = save_layer(gt, geometry_of(gt_kwargs), tmp_path / "corrected_gt.nii.gz")
    np.testing.assert_array_equal(read_kits(str(saved))[0][0], gt)
    # A folder given as the file name is refused, not written beside it as `outdir.nii.gz`.
    from napari_kits._save import SaveError

    (tmp_path / "outdir").mkdir()
    with pytest.raises(SaveError, match="outdir: is a folder; choose a file name"):
        save_layer(gt, geometry_of(gt_kwargs), tmp_path / "outdir")
    assert not (tmp_path / "outdir.nii.gz").exists()


def test_save_names_offered_keep_corrections_and_inputs_apart(tmp_path, case_folder):
    from napari_kits._layers import LayerGeometry
    from napari_kits._save import default_filename

    [(_, ct_kwargs, _)] = read_kits(str(case_folder / "imaging.nii.gz"))
    case = geometry_of(ct_kwargs)
    labels = case.with_kind("labels")
    assert default_filename(labels, "labels") == "prediction_00007.nii.gz"  # KiTS19's submission name
    assert default_filename(labels, "labels (edited)") == "prediction_00007_edited.nii.gz"  # not the new result's
    scan = LayerGeometry("labels", case.source, ct_name="synthetic case")
    assert default_filename(scan, "labels") == "synthetic_case_labels.nii.gz"
    assert default_filename(scan, "labels (edited 2)") == "synthetic_case_labels_edited2.nii.gz"  # the second
    # A label map opened from its own file: that name is an input, so the offer is beside it.
    _save(np.zeros((4, 5, 6), np.uint8), np.eye(4), tmp_path / "scan_labels.nii.gz")
    [(_, kwargs, _)] = read_kits(str(tmp_path / "scan_labels.nii.gz"))
    assert default_filename(geometry_of(kwargs), "scan_labels") == "scan_labels_edited.nii.gz"
    # Probability maps opened from their files, named as the reader names them: one name per class.
    data = np.zeros((4, 5, 6, 3), np.float32)
    _save(data, np.eye(4), tmp_path / "scan_probs.nii.gz")
    _save(data[..., 1], np.eye(4), tmp_path / "scan_y1.nii.gz")
    offered = [default_filename(geometry_of(kw), kw["name"])
               for path in ("scan_probs.nii.gz", "scan_y1.nii.gz") for _, kw, _ in read_kits(str(tmp_path / path))]
    assert offered == ["scan_probs_P(kidney)_edited.nii.gz", "scan_probs_P(tumor)_edited.nii.gz",
                       "scan_y1_edited.nii.gz"]


def test_a_dicom_series_opens_as_its_ct_from_its_folder_or_its_files(tmp_path):
    pytest.importorskip("pydicom")
    from kitseg.io import InputError, read_ct

    from .test_dicom import _ct, _oblique, write_series

    files = write_series(tmp_path / "SE4", _ct(), along_row=_oblique()[0], down_column=_oblique()[1])
    expected = read_ct(tmp_path / "SE4")
    for given in (str(tmp_path / "SE4"), str(files[0]), [str(f) for f in files]):
        assert napari_get_reader(given) is read_kits
        (layer,) = read_kits(given)
        array, kwargs, kind = layer
        assert kind == "image" and kwargs["name"] == "SE4"
        np.testing.assert_array_equal(array, expected.array)
        assert geometry_of(kwargs).source.path == tmp_path / "SE4"
    # Files of two folders are no one series; files of two series in one folder are refused, saying so.
    other = write_series(tmp_path / "SE5", _ct())
    assert napari_get_reader([str(files[0]), str(other[0])]) is None
    second = write_series(tmp_path / "SE4", _ct(), series_uid="1.2.826.0.1.9", series_number=9)
    with pytest.raises(InputError, match=r"SE4: the files chosen belong to several series; open one series at a time"):
        read_kits([str(files[0]), str(second[0])])
    (layer,) = read_kits(str(second[0]))
    assert layer[1]["name"] == "SE4_series9"
    # A study's folder: napari would only say the reader refused it; the reader says what to open.
    reader = napari_get_reader(str(tmp_path))
    with pytest.raises(InputError, match=r"holds 2 DICOM series folders \(SE4, SE5\): open one of them"):
        reader(str(tmp_path))


def test_a_case_folder_holding_a_dicom_file_still_opens_with_its_ground_truth(tmp_path, case_folder):
    pytest.importorskip("pydicom")
    from .test_dicom import _ct, write_series

    case = tmp_path / "case_00007"
    shutil.copytree(case_folder, case)
    shutil.copy(write_series(tmp_path / "series", _ct())[0], case / "export.dcm")
    assert [kind for _, _, kind in read_kits(str(case))] == ["image", "labels"]


def test_labels_of_a_dicom_series_save_as_a_dicom_seg_over_it(tmp_path, case_folder):
    """File > Save Layers with a .dcm name: a SEG over the series the CT was read from; what has
    no series to reference is refused, saying what to do."""
    pydicom = pytest.importorskip("pydicom")
    pytest.importorskip("highdicom")
    from napari_kits._layers import META_KEY, RUN_KEY, LayerGeometry, checksum

    from .test_dicom import _ct, _oblique, write_series
    from .test_dicom_seg import read_seg_labels

    files = write_series(tmp_path / "SE4", _ct(), along_row=_oblique()[0], down_column=_oblique()[1])
    (ct,) = read_kits(str(tmp_path / "SE4"))
    ct_geometry = geometry_of(ct[1])
    labels = np.zeros(ct[0].shape, np.uint8)
    labels[1:3, 2:5, 3:7], labels[2, 3, 4] = 1, 2
    meta = {"metadata": {META_KEY: LayerGeometry("labels", ct_geometry.source, None, "SE4")}, "name": "labels"}
    (written,) = write_labels(str(tmp_path / "SE4_labels.dcm"), labels, meta)
    expected = ct_geometry.source.to_source(labels).transpose(2, 1, 0)
    np.testing.assert_array_equal(read_seg_labels(written, files), expected)
    assert pydicom_segment_type(written) == "SEMIAUTOMATIC"  # labels of unknown making
    # As a run wrote them: the model's alone, named; painted since: semiautomatic, the model named.
    run = {"checksum": checksum(labels), "model": "tiny.kseg", "algorithm_type": "automatic"}
    meta["metadata"][RUN_KEY] = run
    (written,) = write_labels(str(tmp_path / "SE4_labels.dcm"), labels, meta)
    assert pydicom_segment_type(written) == "AUTOMATIC"
    algorithm = pydicom.dcmread(written).SegmentSequence[0].SegmentationAlgorithmIdentificationSequence[0]
    assert "tiny.kseg" in str(algorithm.AlgorithmParameters)
    painted = labels.copy()
    painted[0, 0, 0] = 2
    (written,) = write_labels(str(tmp_path / "SE4_labels.dcm"), painted, meta)
    assert pydicom_segment_type(written) == "SEMIAUTOMATIC"
    del meta["metadata"][RUN_KEY]
    with pytest.raises(SaveError, match=r"only labels are saved as a DICOM SEG; save 'y1' as .nii.gz"):
        write_labels(str(tmp_path / "y1.dcm"), labels, {"metadata": {META_KEY: LayerGeometry(
            "y1", ct_geometry.source, None, "SE4")}, "name": "y1"})
    [(_, case_ct, _), (gt, _, _)] = read_kits(str(case_folder))
    nifti_labels = {"metadata": {META_KEY: LayerGeometry("labels", geometry_of(case_ct).source, None, "case")},
                    "name": "labels"}
    with pytest.raises(SaveError, match=r"'labels' is not on a CT read from a DICOM series.*kits-seg dicom-seg "
                                        r"LABELS SERIES"):
        write_labels(str(tmp_path / "gt.dcm"), gt, nifti_labels)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["SE4", "SE4_labels.dcm"]
    # A series opened from one of its files, in a folder that holds another series too: its own SEG.
    second = write_series(tmp_path / "SE4", _ct()[:, ::-1], series_uid="1.2.826.0.1.9", series_number=9)
    (ct9,) = read_kits(str(second[0]))
    meta9 = {"metadata": {META_KEY: LayerGeometry("labels", geometry_of(ct9[1]).source, None, "SE4_series9")},
             "name": "labels"}
    (written,) = write_labels(str(tmp_path / "SE4_series9_labels.dcm"), labels, meta9)
    np.testing.assert_array_equal(read_seg_labels(written, second),
                                  geometry_of(ct9[1]).source.to_source(labels).transpose(2, 1, 0))


def pydicom_segment_type(path) -> str:
    import pydicom

    return pydicom.dcmread(path).SegmentSequence[0].SegmentAlgorithmType


def test_an_unpacked_case_folder_opens_as_the_packed_one_does(tmp_path, case_folder):
    """imaging.nii and segmentation.nii, as some keep KiTS19 unpacked: the CT and its reference."""
    import gzip

    unpacked = tmp_path / case_folder.name
    unpacked.mkdir()
    for name in ("imaging", "segmentation"):
        (unpacked / f"{name}.nii").write_bytes(gzip.decompress((case_folder / f"{name}.nii.gz").read_bytes()))
    assert napari_get_reader(str(unpacked)) is read_kits
    packed, layers = read_kits(str(case_folder)), read_kits(str(unpacked))
    assert [(kw["name"], kind) for _, kw, kind in layers] == [(kw["name"], kind) for _, kw, kind in packed]
    for (data, _, _), (expected, _, _) in zip(layers, packed):
        np.testing.assert_array_equal(data, expected)
    assert read_kits(str(unpacked / "imaging.nii"))[0][1]["name"] == case_folder.name


def test_a_dicom_seg_opens_over_its_series_and_saves_to_a_new_file(tmp_path, monkeypatch):
    """A SEG (File > Open, napari-kits) opens as labels on its series' grid, with the series unless
    it is open: found beside the SEG or among the CTs open. A model's SEG (automatic) is a result to
    correct, one a person drew or corrected a reference; saved, it goes to a new file, as SEG or
    NIfTI, never over the SEG it came from, and says how it was made."""
    pydicom = pytest.importorskip("pydicom")
    pytest.importorskip("highdicom")
    from types import SimpleNamespace

    from kitseg.dicom_seg import read_dicom_seg
    from kitseg.io import InputError
    from napari_kits import _save
    from napari_kits._layers import META_KEY, RUN_KEY, LayerGeometry, checksum
    from napari_kits._save import default_filename
    from napari_kits._widget import _is_reference, _is_result

    from .test_dicom import _ct, _oblique, write_series
    from .test_dicom_seg import _foreign_seg

    files = write_series(tmp_path / "SE4", _ct(), along_row=_oblique()[0], down_column=_oblique()[1])
    (ct,) = read_kits(str(tmp_path / "SE4"))
    labels = np.zeros(ct[0].shape, np.uint8)
    labels[1:3, 2:5, 3:7], labels[2, 3, 4] = 1, 2
    run_labels = {"metadata": {META_KEY: LayerGeometry("labels", geometry_of(ct[1]).source, None, "SE4"),
                               RUN_KEY: {"checksum": checksum(labels), "model": "tiny.kseg",
                                         "algorithm_type": "automatic"}}, "name": "labels"}
    (seg_path,) = write_labels(str(tmp_path / "SE4_labels.dcm"), labels, run_labels)
    assert napari_get_reader(seg_path) is read_kits
    (series_ct, (data, kwargs, kind)) = read_kits(seg_path)  # no CT open: its series comes with it
    np.testing.assert_array_equal(series_ct[0], ct[0])
    assert series_ct[1]["name"] == "SE4" and geometry_of(series_ct[1]).kind == "ct"
    geometry = geometry_of(kwargs)
    np.testing.assert_array_equal(data, labels)
    assert (kind, kwargs["name"], geometry.ct_name) == ("labels", "SE4_labels", "SE4")
    assert (kwargs["scale"], kwargs["translate"]) == (ct[1]["scale"], ct[1]["translate"])  # over its CT
    layer = SimpleNamespace(metadata=kwargs["metadata"], name=kwargs["name"])
    assert _is_result(layer) and not _is_reference(layer)
    assert default_filename(geometry, "SE4_labels") == "SE4_labels_edited.nii.gz"
    # Saved unchanged, still the model's; corrected, semiautomatic: as a SEG under a new name, or as
    # NIfTI; never over the SEG it came from.
    meta = {"metadata": kwargs["metadata"], "name": kwargs["name"]}
    (unchanged,) = write_labels(str(tmp_path / "SE4_labels_copy.dcm"), data, meta)
    assert pydicom_segment_type(unchanged) == "AUTOMATIC"
    data[0, 0, 0] = 1
    with pytest.raises(SaveError, match=r"SE4_labels.dcm: refusing to overwrite the labels file it was opened from"):
        write_labels(seg_path, data, meta)
    (again,) = write_labels(str(tmp_path / "SE4_labels_edited.dcm"), data, meta)
    np.testing.assert_array_equal(read_dicom_seg(again).labels.array, data)
    assert pydicom_segment_type(again) == "SEMIAUTOMATIC"
    # Corrected by a person (semiautomatic), it opens as a reference to score a new run against.
    (_, (_, corrected, _)) = read_kits(again)
    assert _is_reference(SimpleNamespace(metadata=corrected["metadata"], name="SE4_labels_edited"))
    (nifti,) = write_labels(str(tmp_path / "SE4_labels_edited.nii.gz"), data, meta)
    np.testing.assert_array_equal(read_kits(nifti)[0][0], data)
    # Far from its series: found among the CTs open in the viewer (and not opened twice), else
    # refused, saying what to do.
    far = tmp_path / "a" / "b"
    far.mkdir(parents=True)
    shutil.copy(seg_path, far / "SE4_labels.dcm")
    with pytest.raises(InputError, match=r"found in none of .*open the series first"):
        read_kits(str(far / "SE4_labels.dcm"))
    open_ct = SimpleNamespace(metadata=ct[1]["metadata"], name="SE4")
    monkeypatch.setattr(_save, "viewer_layers", lambda: [open_ct])
    ((far_labels, _, _),) = read_kits(str(far / "SE4_labels.dcm"))
    np.testing.assert_array_equal(far_labels, labels)
    # The series open from a copy elsewhere (known by its UID): read onto that CT, not opened again.
    shutil.copytree(tmp_path / "SE4", tmp_path / "copy" / "SE4")
    (copy_ct,) = read_kits(str(tmp_path / "copy" / "SE4"))
    monkeypatch.setattr(_save, "viewer_layers", lambda: [SimpleNamespace(metadata=copy_ct[1]["metadata"], name="SE4")])
    ((_, on_copy, kind),) = read_kits(seg_path)
    assert kind == "labels" and geometry_of(on_copy).source.path == tmp_path / "copy" / "SE4"
    monkeypatch.setattr(_save, "viewer_layers", lambda: [open_ct])
    # Another tool's SEG, drawn by a person, is a reference; painted on, it is a person's still.
    kidney = np.zeros((6, 9, 11), bool)
    kidney[1:4, 2:6, 2:8] = True
    other = _foreign_seg(tmp_path / "SE4" / "SEG_other.dcm", files, kidney, np.zeros_like(kidney))
    ((other_data, other_kwargs, _),) = read_kits(str(other))
    other_layer = SimpleNamespace(metadata=other_kwargs["metadata"], name="SEG_other")
    assert _is_reference(other_layer) and not _is_result(other_layer)
    other_data[0, 0, 0] = 1
    (painted,) = write_labels(str(tmp_path / "SEG_other_edited.dcm"), other_data,
                              {"metadata": other_kwargs["metadata"], "name": "SEG_other"})
    assert pydicom_segment_type(painted) == "MANUAL"
    # Another tool's automatic SEG, saved unchanged: not napari-kits' model's, so semiautomatic; the
    # SEG a person corrected (above), saved unchanged: semiautomatic still.
    automatic_other = pydicom.dcmread(other)
    for segment in automatic_other.SegmentSequence:
        segment.SegmentAlgorithmType, segment.SegmentAlgorithmName = "AUTOMATIC", "TotalSegmentator"
    automatic_other.save_as(tmp_path / "SE4" / "SEG_auto.dcm")
    ((auto_data, auto_kwargs, _),) = read_kits(str(tmp_path / "SE4" / "SEG_auto.dcm"))
    assert _is_result(SimpleNamespace(metadata=auto_kwargs["metadata"], name="SEG_auto"))
    (saved,) = write_labels(str(tmp_path / "SEG_auto_copy.dcm"), auto_data, {"metadata": auto_kwargs["metadata"],
                                                                             "name": "SEG_auto"})
    assert pydicom_segment_type(saved) == "SEMIAUTOMATIC"
    ((corrected_data, corrected, _),) = read_kits(again)  # its CT open: the labels alone
    (saved,) = write_labels(str(tmp_path / "again_copy.dcm"), corrected_data, {"metadata": corrected["metadata"],
                                                                              "name": "x"})
    assert pydicom_segment_type(saved) == "SEMIAUTOMATIC"
    # Saving over the SEG refuses naming the labels layer, not the CT it brought in (napari's source of both).
    ct_from_seg = SimpleNamespace(metadata=series_ct[1]["metadata"], name="SE4", source=SimpleNamespace(path=seg_path))
    assert _save.refuse_open_files(seg_path, [ct_from_seg]) is None
    with pytest.raises(SaveError, match=r"the open layer 'SE4_labels'"):
        _save.refuse_open_files(seg_path, [ct_from_seg, layer])
    # A slice's .dcm (napari hands a selection over file by file, each reading the whole series):
    # refused, saying to open its folder; a slice file without the suffix (`napari-kits FILE`) reads its series.
    slice_file = tmp_path / "SE4" / "slice.dcm"
    files[0].rename(slice_file)
    with pytest.raises(InputError, match=r"slice.dcm: one slice of a DICOM series: open its folder, .*SE4"):
        napari_get_reader(str(slice_file))(str(slice_file))
    assert napari_get_reader(str(files[1])) is read_kits and read_kits(str(files[1]))[0][2] == "image"
    assert napari_get_reader(str(tmp_path / "nothing.dcm")) is None
