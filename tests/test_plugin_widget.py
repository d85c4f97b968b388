"""The KiTS segmentation dock widget driven end to end in a real viewer (Xvfb), tiny model."""

from __future__ import annotations

import re
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from .conftest_plugin import case_folder, isolated_settings, small_case, tiny_kseg  # noqa: F401 (fixtures)

pytest.importorskip("napari")
pytestmark = pytest.mark.gui

RUN_TIMEOUT_MS = 60_000


@pytest.fixture
def viewer_widget(make_napari_viewer, tiny_kseg, case_folder):
    from napari_kits._reader import read_kits
    from napari_kits._widget import KitsWidget

    viewer = make_napari_viewer()
    for data, kwargs, kind in read_kits(str(case_folder)):
        getattr(viewer, f"add_{kind}")(data, **kwargs)
    widget = KitsWidget(viewer)
    viewer.window.add_dock_widget(widget, name="KiTS segmentation")
    assert widget.set_weights(tiny_kseg)
    return viewer, widget


def _run(qtbot, widget, start, task, outcome="done"):
    with qtbot.waitSignal(widget.run_finished, timeout=RUN_TIMEOUT_MS) as blocker:
        assert start() is not None, widget.last_error
    assert blocker.args == [task, outcome], widget.last_error


def _wait_mask(qtbot, widget):
    qtbot.waitUntil(lambda: widget._session.mask_layer is not None and widget._mask_worker is None
                    and not widget._mask_timer.isActive(), timeout=RUN_TIMEOUT_MS)


def _engine_labels(widget, mask):
    """What the engine gives for the session's y1 and this mask (the widget must agree)."""
    seg, prepared = widget._segmenter, widget._session.prepared
    probs = seg.stage2(prepared, widget._session.y1, mask.astype(bool))
    return seg.labels_on_source(prepared, probs)


def test_viewer_opens_case_folder_through_the_plugin(make_napari_viewer, case_folder):
    from napari_kits._registration import ensure_registered

    ensure_registered()
    viewer = make_napari_viewer()
    viewer.open(str(case_folder), plugin="napari-kits")
    viewer.open(str(case_folder / "imaging.nii.gz"), plugin="napari-kits")
    # The folder's CT opened alone is named after its case too (napari tells the two apart).
    assert [layer.name for layer in viewer.layers] == ["case_00007", "case_00007 ground truth", "case_00007 [1]"]
    ct, gt, _ = viewer.layers
    assert gt.__class__.__name__ == "Labels" and gt.data.shape == ct.data.shape
    np.testing.assert_allclose(ct.scale, (2.5, 1.5, 1.5))
    np.testing.assert_allclose(gt.translate, ct.translate)
    assert tuple(ct.contrast_limits) == (-160.0, 240.0)


def test_workflow_stage1_mask_stage2_score_save(qtbot, viewer_widget, small_case, case_folder, tmp_path):
    from kitseg.metrics import kits_scores
    from kitseg.pipeline import make_mask

    viewer, widget = viewer_widget
    ct_layer = viewer.layers["case_00007"]

    # Stage 1: y1 on the stage grid (5 mm slices), probabilities in [0, 1], placed over the CT.
    _run(qtbot, widget, widget.run_stage1, "stage 1")
    session = widget._session
    y1_layer = session.y1_layer
    assert y1_layer.name == "y1" and y1_layer.data.shape == (12, 64, 72)
    assert 0.0 <= float(y1_layer.data.min()) and float(y1_layer.data.max()) <= 1.0
    assert y1_layer.data.max() > 0
    np.testing.assert_allclose(y1_layer.scale, (5.0, 1.5, 1.5))
    def box(layer):  # napari's extent runs between voxel centres; the voxels' outer edges:
        return layer.extent.world + np.array([-0.5, 0.5])[:, None] * np.asarray(layer.scale)

    np.testing.assert_allclose(box(y1_layer), box(ct_layer), atol=1e-6)  # same physical box
    assert y1_layer.metadata["kitseg"].stage_grid.shape == (12, 64, 72)
    # The status says what was done and what comes next; with y1 under the threshold everywhere, why
    # stage 2 would find nothing.
    assert "Stage 1 done on cpu: " in widget.status.text() and "Model loaded" not in widget.status.text()
    assert ("then run stage 2" in widget.status.text()) == (float(session.y1.max()) >= 0.5)
    assert widget._stage1_note(np.zeros((2, 2, 2), np.float32)).endswith(
        "so the mask is empty and stage 2 would label nothing (no kidney in this scan?).")

    # The mask follows the controls (debounced, in a worker) and matches the engine's.
    _wait_mask(qtbot, widget)
    mask_layer = session.mask_layer
    np.testing.assert_array_equal(mask_layer.data, make_mask(session.y1, 0.5, 10.0))
    assert mask_layer.contour == 2  # an outline: y1 shows inside it
    mask_layer.contour = 0  # the user fills it: rebuilt masks stay so
    with qtbot.waitSignal(widget.mask_updated, timeout=RUN_TIMEOUT_MS):
        widget.threshold_spin.setValue(0.0)  # y1 >= 0 everywhere: the whole stage grid
    assert mask_layer.data.all() and mask_layer.contour == 0
    with qtbot.waitSignal(widget.mask_updated, timeout=RUN_TIMEOUT_MS):
        widget.radius_spin.setValue(2.0)
    np.testing.assert_array_equal(widget._session.mask_layer.data, make_mask(session.y1, 0.0, 2.0))
    assert widget.settings.value("mask/threshold") is not None  # persisted
    painted_layer = widget._session.mask_layer
    painted_layer.data[0] = 0  # painted, then the controls move: the painting is kept aside
    painted = painted_layer.data.copy()
    with qtbot.waitSignal(widget.mask_updated, timeout=RUN_TIMEOUT_MS):
        widget.radius_spin.setValue(2.5)
    assert painted_layer in viewer.layers and painted_layer.name == "mask (edited)" and not painted_layer.visible
    np.testing.assert_array_equal(painted_layer.data, painted)
    assert widget._session.mask_layer is not painted_layer and widget._session.mask_layer.name == "mask"
    np.testing.assert_array_equal(widget._session.mask_layer.data, make_mask(session.y1, 0.0, 2.5))
    assert "kept as 'mask (edited)'" in widget.status.text()
    with qtbot.waitSignal(widget.mask_updated, timeout=RUN_TIMEOUT_MS):
        widget.radius_spin.setValue(2.0)
    np.testing.assert_array_equal(widget._session.mask_layer.data, make_mask(session.y1, 0.0, 2.0))

    # Stage 2 on the full mask: labels on the CT grid, as the engine computes them.
    _run(qtbot, widget, widget.run_stage2, "stage 2")
    labels_layer = session.labels_layer
    assert labels_layer.name == "labels" and labels_layer.data.shape == ct_layer.data.shape
    np.testing.assert_allclose(labels_layer.scale, ct_layer.scale)
    np.testing.assert_allclose(labels_layer.translate, ct_layer.translate)
    full = _engine_labels(widget, session.mask_layer.data)
    np.testing.assert_array_equal(labels_layer.data, full)
    assert (labels_layer.data > 0).any()  # otherwise the erased-mask check below proves nothing
    assert viewer.layers.selection.active is labels_layer and labels_layer.editable
    assert viewer.layers[-1] is labels_layer
    # What the run wrote, and its model, go with the layer: a DICOM SEG of it unchanged is "automatic".
    from napari_kits._layers import RUN_KEY, checksum

    assert labels_layer.metadata[RUN_KEY] == {"checksum": checksum(full), "model": widget.weights_path.name,
                                              "algorithm_type": "automatic"}
    from kitseg.metrics import describe_found

    found = describe_found(labels_layer.data, small_case.spacing)
    assert f"Segmented on cpu: {found}; paint to correct, then save." in widget.status.text()

    # Stray-piece clean-up is on by default; unchecked, the raw argmax comes back (and it persists).
    from napari_kits._settings import read_bool

    widget.cleanup_check.setChecked(False)
    _run(qtbot, widget, widget.run_stage2, "stage 2")
    seg, prepared = widget._segmenter, session.prepared
    raw = seg.labels_on_source(prepared, seg.stage2(prepared, session.y1, session.mask_layer.data > 0), cleanup=None)
    np.testing.assert_array_equal(labels_layer.data, raw)
    assert read_bool(widget.settings, "labels/cleanup", True) is False
    widget.cleanup_check.setChecked(True)

    # The mask rebuilt after stage 2 is shown again, and the labels made with the one before are said to be so.
    mask_layer = session.mask_layer
    assert not mask_layer.visible
    with qtbot.waitSignal(widget.mask_updated, timeout=RUN_TIMEOUT_MS):
        widget.threshold_spin.setValue(0.05)
    assert mask_layer.visible and "The mask changed; 'labels' was made with the one before" in widget.status.text()
    with qtbot.waitSignal(widget.mask_updated, timeout=RUN_TIMEOUT_MS):
        widget.threshold_spin.setValue(0.0)

    # Paint: erase the mask; stage 2 must honour the layer's current data -> all background.
    session.mask_layer.data[:] = 0
    _run(qtbot, widget, widget.run_stage2, "stage 2")
    assert widget._session.labels_layer is labels_layer  # updated in place, not duplicated
    assert not labels_layer.data.any() and "Segmented on cpu: no kidney found" in widget.status.text()

    # Back to the full mask; score against the ground truth.
    session.mask_layer.data[:] = 1
    _run(qtbot, widget, widget.run_stage2, "stage 2")
    widget.gt_combo.setCurrentIndex(widget.gt_combo.findText("case_00007 ground truth"))
    widget.pred_combo.setCurrentIndex(widget.pred_combo.findData(labels_layer))
    with qtbot.waitSignal(widget.scores_updated, timeout=RUN_TIMEOUT_MS):
        widget.compute_scores()
    expected = kits_scores(labels_layer.data, small_case.labels, small_case.spacing)
    got = widget.last_scores
    assert got.kidney_dice == pytest.approx(expected.kidney_dice)
    assert got.tumor_dice == pytest.approx(expected.tumor_dice)
    assert widget.table.item(0, 0).text() == f"{expected.kidney_dice:.4f}"
    assert widget.table.item(1, 0).text() == f"{expected.tumor_dice:.4f}"
    assert widget.table.item(2, 0).text() == f"{expected.composite_dice:.4f}"
    assert widget.table.item(0, 2).text() == f"{expected.ref_kidney_ml:.1f}"
    assert widget.detection_label.text().startswith(f"Tumors found: {expected.tumors_found} of {expected.ref_tumors}")
    assert widget.detection_label.text().endswith(
        f"false tumor pieces: {expected.false_tumors} ({expected.false_tumor_ml:.1f} mL)")

    # Worst slice jumps the viewer there.
    worst = widget.worst_slice()
    assert worst is not None
    widget.go_to_worst_slice()
    assert viewer.dims.point[0] == pytest.approx(ct_layer.translate[0] + worst * ct_layer.scale[0])
    widget.plot.slice_clicked.emit(3)
    assert viewer.dims.point[0] == pytest.approx(ct_layer.translate[0] + 3 * ct_layer.scale[0])

    # Correct the labels (paste the reference) -> scores recompute by themselves: Dice 1.
    with qtbot.waitSignal(widget.scores_updated, timeout=RUN_TIMEOUT_MS):
        labels_layer.data = small_case.labels.copy()
    assert widget.last_scores.kidney_dice == 1.0 and widget.last_scores.tumor_dice == 1.0
    tumors = widget.last_scores.ref_tumors
    shares = ", ".join(["100%"] * min(tumors, 3)) + (", …" if tumors > 3 else "")
    assert tumors >= 1 and widget.detection_label.text() == (
        f"Tumors found: {tumors} of {tumors} (labelled tumor: {shares}); false tumor pieces: 0 (0.0 mL)")
    # Erased with the brush, then undone (Ctrl+Z): napari's undo sends no paint event; scored again all the same.
    labels_layer.brush_size = 40
    with qtbot.waitSignal(widget.scores_updated, timeout=RUN_TIMEOUT_MS):
        labels_layer.paint(tuple(np.argwhere(labels_layer.data == 2)[0]), 0)
    assert widget.last_scores.tumor_dice < 1.0
    with qtbot.waitSignal(widget.scores_updated, timeout=RUN_TIMEOUT_MS):
        labels_layer.undo()
    assert widget.last_scores.kidney_dice == 1.0 and widget.last_scores.tumor_dice == 1.0

    # Save on the source grid; never over the input CT; ask before replacing.
    out = tmp_path / "case_00007_corrected.nii.gz"
    with qtbot.waitSignal(widget.saved, timeout=RUN_TIMEOUT_MS):
        widget.save_layer(labels_layer, out)
    saved, source = nib.load(str(out)), nib.load(str(case_folder / "imaging.nii.gz"))
    assert saved.shape == source.shape
    np.testing.assert_allclose(saved.affine, source.affine, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(saved.dataobj), small_case.labels)

    before = (case_folder / "imaging.nii.gz").read_bytes()
    assert widget.save_layer(labels_layer, case_folder / "imaging.nii.gz") is None
    assert "refusing to overwrite the input CT" in widget.last_error
    assert (case_folder / "imaging.nii.gz").read_bytes() == before

    stamp = out.stat().st_mtime_ns
    widget._confirm_overwrite = lambda path: False
    assert widget.save_layer(labels_layer, out) is None and out.stat().st_mtime_ns == stamp
    widget._confirm_overwrite = lambda path: True
    labels_layer.data = np.zeros_like(labels_layer.data)
    with qtbot.waitSignal(widget.saved, timeout=RUN_TIMEOUT_MS):
        widget.save_layer(labels_layer, out)
    assert not np.asarray(nib.load(str(out)).dataobj).any()

    # y1 (probability, slope 1/255) and the mask (>= 0.5) on the source grid too.
    for layer, name in ((session.y1_layer, "y1"), (session.mask_layer, "mask")):
        with qtbot.waitSignal(widget.saved, timeout=RUN_TIMEOUT_MS):
            widget.save_layer(layer, tmp_path / name)
        img = nib.load(str(tmp_path / f"{name}.nii.gz"))
        assert img.shape == source.shape
        np.testing.assert_allclose(img.affine, source.affine, atol=1e-6)
    y1_back = np.asarray(nib.load(str(tmp_path / "y1.nii.gz")).get_fdata())
    expected_y1 = session.prepared.grid.to_source(session.y1)  # the engine's way back
    np.testing.assert_allclose(y1_back, expected_y1, atol=1.0 / 255 + 1e-6)
    assert np.asarray(nib.load(str(tmp_path / "mask.nii.gz")).dataobj).all()


def test_run_all_reuses_the_loaded_model(qtbot, viewer_widget):
    viewer, widget = viewer_widget
    mine = viewer.add_image(np.full((4, 5, 6), 7.0, np.float32), name="P(kidney)")  # the user's own layer
    widget.probs_check.setChecked(True)
    _run(qtbot, widget, widget.run_all, "run all")
    first = widget._segmenter
    session = widget._session
    assert session.y1_complete and session.mask_layer is not None
    assert session.labels_layer.data.shape == session.ct_layer.data.shape
    assert set(session.probability_layers) == {"kidney", "tumor"}
    assert mine in viewer.layers and (mine.data == 7.0).all()  # found by the session, not by name
    assert all(layer in viewer.layers and layer is not mine for layer in session.probability_layers.values())
    np.testing.assert_array_equal(session.labels_layer.data, _engine_labels(widget, session.mask_layer.data))
    # Run again without them: the earlier run's probabilities go, rather than lie beside new labels.
    widget.probs_check.setChecked(False)
    stale = list(session.probability_layers.values())
    _run(qtbot, widget, widget.run_stage2, "stage 2")
    assert not any(layer in viewer.layers for layer in stale) and not session.probability_layers
    assert "The earlier run's class probabilities were removed" in widget.status.text()
    assert mine in viewer.layers  # the user's own layer of that name stays
    # The mask layer closed: stage 2 waits for it, and its button says how to get it back.
    viewer.layers.remove(session.mask_layer)
    widget._update_buttons()
    assert not widget.stage2_button.isEnabled()
    assert widget.stage2_button.toolTip().startswith("The mask layer is gone: move the threshold or radius")
    _run(qtbot, widget, widget.run_stage1, "stage 1")
    assert widget._segmenter is first  # cached, not rebuilt per click


def test_a_run_is_scored_once_its_result_is_filled_not_while_its_layer_is_empty(qtbot, viewer_widget, monkeypatch):
    from kitseg.pipeline import Segmenter

    viewer, widget = viewer_widget
    slow = Segmenter._forward_probs

    def slowed(self, net, batch, *args):
        time.sleep(0.3)  # the empty labels layer the run adds first stays empty for a while
        return slow(self, net, batch, *args)

    monkeypatch.setattr(Segmenter, "_forward_probs", slowed)
    scored_during_run = []
    widget.scores_updated.connect(lambda: scored_during_run.append(widget._worker is not None))
    _run(qtbot, widget, widget.run_all, "run all")
    qtbot.waitUntil(lambda: bool(scored_during_run) and widget._score_worker is None, timeout=RUN_TIMEOUT_MS)
    assert scored_during_run == [False]  # after the run: before, the empty layer was scored (Dice 0) mid-run


def test_cancel_stage1_keeps_layers_consistent(qtbot, viewer_widget, monkeypatch):
    from kitseg.pipeline import Progress, Segmenter

    viewer, widget = viewer_widget
    slow = Segmenter._forward_probs

    def slowed(self, net, batch, *args):
        time.sleep(0.05)
        return slow(self, net, batch, *args)

    monkeypatch.setattr(Segmenter, "_forward_probs", slowed)
    widget.batch_spin.setValue(1)
    cancelled = []

    def cancel_on_first_batch(event):
        if isinstance(event, Progress) and event.step == "stage 1" and not cancelled:
            cancelled.append(event.done)
            widget.cancel()

    with qtbot.waitSignal(widget.run_finished, timeout=RUN_TIMEOUT_MS) as blocker:
        worker = widget.run_stage1()
        worker.yielded.connect(cancel_on_first_batch)
    assert blocker.args == ["stage 1", "cancelled"]
    session = widget._session
    y1 = session.y1_layer.data
    assert y1.shape == (12, 64, 72) and y1 is session.y1
    assert y1[0].any() and not y1[-1].any()  # finished batches kept, the rest untouched
    assert not session.y1_complete and session.mask_layer is None
    assert "mask" not in [layer.name for layer in viewer.layers]
    assert not widget.stage2_button.isEnabled() and widget.stage1_button.isEnabled()
    assert widget.run_stage2() is None and "stage 1 first" in widget.last_error

    # Running again completes and brings the mask.
    _run(qtbot, widget, widget.run_stage1, "stage 1")
    _wait_mask(qtbot, widget)
    assert session.y1_complete and widget.stage2_button.isEnabled()


def test_cancel_stage2_leaves_the_labels_alone(qtbot, viewer_widget, monkeypatch):
    from kitseg.pipeline import Progress, Segmenter

    viewer, widget = viewer_widget
    _run(qtbot, widget, widget.run_stage1, "stage 1")
    _wait_mask(qtbot, widget)
    slow = Segmenter._forward_probs
    monkeypatch.setattr(Segmenter, "_forward_probs", lambda s, n, b, *a: (time.sleep(0.05), slow(s, n, b, *a))[1])
    widget.batch_spin.setValue(1)
    with qtbot.waitSignal(widget.run_finished, timeout=RUN_TIMEOUT_MS) as blocker:
        worker = widget.run_stage2()
        worker.yielded.connect(lambda e: widget.cancel() if isinstance(e, Progress) else None)
    assert blocker.args == ["stage 2", "cancelled"]
    assert widget._session.labels_layer is None and "labels" not in [l.name for l in viewer.layers]
    # Run all cancelled in either stage says where it stopped and what is kept.
    for stage, said in (("stage 1", "Run all cancelled in stage 1: y1 holds the slices finished so far"),
                        ("stage 2", "Run all cancelled in stage 2: y1 and the mask are complete, the labels were "
                                    "not changed")):
        with qtbot.waitSignal(widget.run_finished, timeout=RUN_TIMEOUT_MS) as blocker:
            worker = widget.run_all()
            worker.yielded.connect(lambda e, stage=stage: widget.cancel()
                                   if isinstance(e, Progress) and e.step == stage else None)
        assert blocker.args == ["run all", "cancelled"] and widget.status.text().startswith(said)
    assert widget._session.labels_layer is None


def test_run_all_cancelled_between_stage_1_and_its_mask_makes_the_mask_of_the_new_y1(qtbot, viewer_widget,
                                                                                      monkeypatch):
    """A second Run all stopped after its last stage-1 batch: the mask still shown is the first run's,
    made from the first y1; it is made again from the new one, and the status says so."""
    from kitseg.pipeline import Progress, Segmenter

    from napari_kits._tasks import make_mask, mask_spacing

    viewer, widget = viewer_widget
    _run(qtbot, widget, widget.run_all, "run all")
    slow = Segmenter._forward_probs
    monkeypatch.setattr(Segmenter, "_forward_probs", lambda s, n, b, *a: (time.sleep(0.3), slow(s, n, b, *a))[1])
    widget.batch_spin.setValue(1)
    widget.threshold_spin.setValue(0.3)  # the new mask differs from the first run's
    with qtbot.waitSignal(widget.run_finished, timeout=RUN_TIMEOUT_MS) as blocker:
        worker = widget.run_all()
        # Cancelled while the last stage-1 batch runs: the run stops after it, before its mask.
        worker.yielded.connect(lambda e: widget.cancel() if isinstance(e, Progress) and e.step == "stage 1"
                               and e.done == e.total - 1 else None)
    assert blocker.args == ["run all", "cancelled"]
    session = widget._session
    assert session.y1_complete
    assert widget.status.text().startswith("Run all cancelled after stage 1: y1 is complete and its mask is being made")
    _wait_mask(qtbot, widget)
    expected = make_mask(session.y1, 0.3, widget.radius_spin.value(), mask_spacing(widget._segmenter, session.prepared))
    np.testing.assert_array_equal(session.mask_layer.data, expected.mask)


def test_model_section_without_default_weights(
    make_napari_viewer, tiny_kseg, tmp_path, isolated_settings, monkeypatch
):
    import kitseg.weights
    from napari_kits._widget import KitsWidget

    monkeypatch.setattr(kitseg.weights, "DEFAULT_WEIGHTS", tmp_path / "not-installed.kseg")
    viewer = make_napari_viewer()
    widget = KitsWidget(viewer)
    assert "No default weights" in widget.model_info.text()
    assert widget.weights_path is None
    assert widget.run_stage1() is None and "open a CT first" in widget.last_error
    assert not widget.set_weights(tmp_path / "missing.kseg")
    assert widget.set_weights(tiny_kseg)
    text = widget.model_info.text()
    assert "unet2d" in text and "5 mm slices" in text and "tiny random weights" in text
    assert widget.device_combo.itemData(0) == "auto" and widget.device_combo.findData("cpu") > 0
    widget.device_combo.setCurrentIndex(widget.device_combo.findData("cpu"))

    # Persisted, in the isolated file only: a new widget starts from the user's last choices.
    second = KitsWidget(viewer)
    assert second.weights_path == tiny_kseg and second.device == "cpu"
    assert isolated_settings.exists()


def test_mask_radius_is_kept_with_its_unit(make_napari_viewer, tiny_kseg, tmp_path, isolated_settings):
    """A radius chosen for a model in voxels is not applied as mm to a model whose mask is in mm."""
    import dataclasses

    from kitseg.checkpoint import load_bundle, save_bundle
    from kitseg.config import MaskConfig
    from napari_kits._widget import KitsWidget

    mm_model = save_bundle(dataclasses.replace(load_bundle(tiny_kseg), mask=MaskConfig(0.5, 20.0, "mm")),
                           tmp_path / "mm.kseg")
    widget = KitsWidget(make_napari_viewer())
    assert widget.set_weights(tiny_kseg)
    assert widget.radius_spin.value() == 10.0 and widget.radius_spin.suffix() == " vox"
    assert widget.settings.value("mask/radius") is None  # the model's rule is not the user's choice
    widget.radius_spin.setValue(3.0)  # the user's choice, for models in voxels
    assert widget.set_weights(mm_model)
    assert widget.radius_spin.value() == 20.0 and widget.radius_spin.suffix() == " mm"
    assert float(widget.settings.value("mask/radius")) == 3.0  # loading a model did not overwrite it
    assert widget.set_weights(tiny_kseg)
    assert widget.radius_spin.value() == 3.0 and widget.radius_spin.suffix() == " vox"
    assert KitsWidget(widget.viewer).radius_spin.value() == 3.0  # a new widget: the same choice
    widget.set_weights(mm_model)
    widget.radius_spin.setValue(15.0)
    assert KitsWidget(widget.viewer).radius_spin.value() == 15.0  # now the choice is in mm, for this model
    assert widget.set_weights(tiny_kseg) and widget.radius_spin.value() == 10.0  # back to its own


def test_launch_runs_all_and_quits(tmp_path, tiny_kseg, isolated_settings):
    """The console script end to end (the npe2 path: widget behind napari's viewer proxy)."""
    import os
    import subprocess
    import sys

    from .conftest import REPO

    shot = tmp_path / "smoke.png"
    env = dict(os.environ, PYTHONPATH=f"{REPO / 'src'}:{REPO}")
    result = subprocess.run(
        [sys.executable, "-m", "napari_kits.launch", "--weights", str(tiny_kseg), "--device", "cpu",
         "--run-all", "--screenshot", str(shot), "--quit"],
        capture_output=True, text=True, timeout=600, env=env, cwd=REPO,  # generous: CI machines are busy
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert shot.stat().st_size > 10_000
    # The sample opens with its ground truth: the picture is taken once the run is scored.
    assert re.search(r"scored against .*ground truth: kidney Dice \d\.\d{4}, tumor Dice", result.stderr)
    assert result.stderr.index("scored against") < result.stderr.index("screenshot saved to")
    from qtpy.QtGui import QImage

    picture = QImage(str(shot))  # the window as large as the screen allows, up to 1600 x 1050
    assert picture.width() >= 1200 and picture.height() >= 800, (picture.width(), picture.height())


def test_output_layers_exist_before_the_run_and_go_when_it_fails(qtbot, viewer_widget, monkeypatch):
    from kitseg.pipeline import Segmenter

    viewer, widget = viewer_widget
    shown_at_start = []

    def failing_stage1(self, prepared, y1):
        shown_at_start.append({layer.name: layer for layer in viewer.layers})
        raise RuntimeError("boom")
        yield  # a generator, like the real one

    monkeypatch.setattr(Segmenter, "iter_stage1", failing_stage1)
    _run(qtbot, widget, widget.run_all, "run all", outcome="error")
    # The output layers were in the viewer before the worker ran (no layer is added mid-run)...
    assert {"y1", "mask", "labels"} <= set(shown_at_start[0])
    assert shown_at_start[0]["labels"].data.shape == viewer.layers["case_00007"].data.shape
    # ... and the empty ones left with the failed run; y1 stays (what finished of it).
    names = [layer.name for layer in viewer.layers]
    assert "mask" not in names and "labels" not in names and "y1" in names
    assert "boom" in widget.last_error and widget._session.spare == {}


def test_cancel_at_the_click_puts_the_layers_back(qtbot, viewer_widget):
    viewer, widget = viewer_widget
    with qtbot.waitSignal(widget.run_finished, timeout=RUN_TIMEOUT_MS) as blocker:
        assert widget.run_stage1() is not None
        widget.cancel()  # before the worker started: its output layers go again
    assert blocker.args == ["stage 1", "cancelled"]
    names = [layer.name for layer in viewer.layers]
    assert "y1" not in names and "mask" not in names and widget._session.y1_layer is None

    _run(qtbot, widget, widget.run_stage1, "stage 1")
    _wait_mask(qtbot, widget)
    session = widget._session
    y1_before = session.y1_layer.data.copy()
    with qtbot.waitSignal(widget.run_finished, timeout=RUN_TIMEOUT_MS) as blocker:
        widget.run_stage1()
        widget.cancel()
    assert blocker.args == ["stage 1", "cancelled"]
    np.testing.assert_array_equal(session.y1_layer.data, y1_before)  # the finished y1, not zeros
    assert session.y1_complete and widget.stage2_button.isEnabled()


def test_closing_the_ct_before_the_run_starts(qtbot, viewer_widget):
    viewer, widget = viewer_widget
    with qtbot.waitSignal(widget.run_finished, timeout=RUN_TIMEOUT_MS) as blocker:
        assert widget.run_all() is not None
        viewer.layers.remove("case_00007")
    assert blocker.args == ["run all", "error"]
    assert "CT layer was closed" in widget.last_error and not widget.busy
    assert not {"y1", "mask", "labels"} & {layer.name for layer in viewer.layers}


def test_dice_plot_draws_when_on_screen_and_not_before(qtbot):
    """A hidden plot does not draw (a widget never docked, garbage in a reference cycle, must not
    start a draw that the collector deletes its canvas under); shown, it draws what it was given."""
    import numpy as np

    from napari_kits._plot import DicePlot

    plot = DicePlot()
    qtbot.addWidget(plot)
    draws = []
    plot.canvas.mpl_connect("draw_event", lambda event: draws.append(event))
    plot.set_curves({"kidney": np.array([np.nan, 0.5, 0.9]), "tumor": np.array([np.nan, np.nan, 0.2])})
    plot.mark_slice(1)
    qtbot.wait(50)
    assert draws == []
    plot.show()
    qtbot.waitUntil(lambda: len(draws) > 0, timeout=5000)
    assert [line.get_label() for line in plot.axes.get_lines()[:2]] == ["kidney", "tumor"]
    drawn = len(draws)
    plot.mark_slice(2)
    qtbot.waitUntil(lambda: len(draws) > drawn, timeout=5000)


def test_a_new_result_never_overwrites_hand_corrections(qtbot, viewer_widget):
    viewer, widget = viewer_widget
    _run(qtbot, widget, widget.run_all, "run all")
    session = widget._session
    corrected = session.labels_layer
    corrected.data[0, :4, :4] = 2  # the user's brush
    corrected.refresh()
    painted = corrected.data.copy()
    _run(qtbot, widget, widget.run_stage2, "stage 2")
    assert corrected in viewer.layers and corrected.name == "labels (edited)"
    np.testing.assert_array_equal(corrected.data, painted)
    fresh = session.labels_layer
    assert fresh is not corrected and fresh.name == "labels"
    np.testing.assert_array_equal(fresh.data, _engine_labels(widget, session.mask_layer.data))
    assert "kept (hidden) as 'labels (edited)'" in widget.status.text() and not corrected.visible
    # Scored and saved next: the new result, not the kept copy or the y1 the box showed first.
    assert widget.pred_combo.currentData() is fresh and widget.save_combo.currentData() is fresh
    reference = widget.gt_combo.currentData()
    assert reference.contour == 2  # the reference outlined over the filled result
    reference.contour = 0  # the user fills it again: the next run leaves it so
    # Left as written, the result is updated in place again.
    _run(qtbot, widget, widget.run_stage2, "stage 2")
    assert widget._session.labels_layer is fresh and reference.contour == 0
    # Corrected again and run again: a second kept copy, named as such (not napari's "[1]").
    fresh.data[0, :4, :4] = 1
    fresh.refresh()
    _run(qtbot, widget, widget.run_stage2, "stage 2")
    assert fresh.name == "labels (edited 2)" and corrected.name == "labels (edited)"


def test_labels_other_than_0_1_2_are_neither_scored_nor_saved(qtbot, viewer_widget, tmp_path):
    viewer, widget = viewer_widget
    _run(qtbot, widget, widget.run_all, "run all")
    labels = widget._session.labels_layer
    labels.data[0, 0, :3] = 3  # napari's label picker moved on to 3
    np.testing.assert_allclose(labels.colormap.map(np.array([3]))[0], (1.0, 0.0, 1.0, 1.0))  # shown, in magenta
    widget.gt_combo.setCurrentIndex(widget.gt_combo.findText("case_00007 ground truth"))
    widget.pred_combo.setCurrentIndex(widget.pred_combo.findData(labels))
    worker = widget.compute_scores()
    qtbot.waitUntil(lambda: widget._score_worker is None, timeout=RUN_TIMEOUT_MS)
    assert worker is not None and "labels holds label 3" in widget.last_error
    out = tmp_path / "corrected.nii.gz"
    worker = widget.save_layer(labels, out)
    qtbot.waitUntil(lambda: widget._save_worker is None, timeout=RUN_TIMEOUT_MS)
    assert "labels not saved" in widget.last_error and "label 3" in widget.last_error and not out.exists()
    # A reference's 3s are KiTS21/23's cysts: scored within the kidney region, and said so.
    from kitseg.metrics import kits_scores

    labels.data[0, 0, :3] = 0
    reference = widget.gt_combo.currentData()
    kidney = np.argwhere(reference.data == 1)[:200]
    cysts = reference.data.copy()
    cysts[tuple(kidney.T)] = 3
    widget.last_scores = None
    reference.data = cysts  # the user corrects the reference: scored again, as for the prediction
    qtbot.waitUntil(lambda: widget.last_scores is not None and widget._score_worker is None, timeout=RUN_TIMEOUT_MS)
    # The painted 3's refusals are gone; what the run found, which they replaced, is said again.
    assert widget.last_error == "" and "label 3" not in widget.status.text()
    assert widget.status.text().startswith("Segmented on cpu: ") and widget.status.text().endswith("<br>Scored.")
    assert "cysts (label 3) of case_00007 ground truth are scored within the kidney region" in (
        widget.detection_label.text())
    expected = kits_scores(labels.data, np.where(cysts == 3, 1, cysts), (1.0, 1.0, 1.0))
    assert widget.last_scores.kidney_dice == pytest.approx(expected.kidney_dice)
    assert widget.last_scores.tumor_dice == pytest.approx(expected.tumor_dice)
    # A KiTS23 label file opened as the prediction: its own 3s are read as the reference's are.
    from kitseg.io import write_labels
    from napari_kits._layers import geometry_of
    from napari_kits._reader import read_kits

    saved = write_labels(cysts, geometry_of(reference).source, tmp_path / "kits23_labels.nii.gz")
    [(data, kwargs, _)] = read_kits(str(saved))
    opened = viewer.add_labels(data, **kwargs)
    widget.gt_combo.setCurrentIndex(widget.gt_combo.findData(reference))
    widget.pred_combo.setCurrentIndex(widget.pred_combo.findData(opened))
    widget.compute_scores()
    qtbot.waitUntil(lambda: widget._score_worker is None, timeout=RUN_TIMEOUT_MS)
    assert widget.last_error == "" and widget.last_scores.kidney_dice == pytest.approx(1.0)
    assert f"of {opened.name} and case_00007 ground truth" in widget.detection_label.text()


def test_another_tools_reference_is_scored_as_its_labels_are_said_to_be(qtbot, viewer_widget, tmp_path):
    """A TotalSegmentator-style map opened beside the CT (1 spleen, 2 and 3 the kidneys, 5 liver; no
    tumor class): refused with what to type; read through the typed mapping, its kidneys are scored
    and tumor is not (not 0 for every tumor call); its 3s are no KiTS cysts."""
    from kitseg.io import write_labels
    from kitseg.metrics import kits_scores
    from napari_kits._layers import geometry_of
    from napari_kits._reader import read_kits

    viewer, widget = viewer_widget
    _run(qtbot, widget, widget.run_all, "run all")
    labels = widget._session.labels_layer
    truth = viewer.layers["case_00007 ground truth"].data
    totalseg = np.where(truth > 0, 2, 0).astype(np.uint8)
    half = truth.shape[2] // 2
    totalseg[:, :, half:][totalseg[:, :, half:] == 2] = 3
    totalseg[0][truth[0] == 0] = 5
    totalseg[-1][truth[-1] == 0] = 1
    saved = write_labels(totalseg, geometry_of(labels).source, tmp_path / "scan_totalseg.nii.gz")
    [(data, kwargs, _)] = read_kits(str(saved))
    other = viewer.add_labels(data, **kwargs)
    assert not geometry_of(other).offered_as_reference  # never chosen unasked
    widget.pred_combo.setCurrentIndex(widget.pred_combo.findData(labels))
    widget.gt_combo.setCurrentIndex(widget.gt_combo.findData(other))
    assert other.contour == 2  # chosen by hand: outlined too
    qtbot.waitUntil(lambda: widget._score_worker is None and not widget._score_timer.isActive(), timeout=RUN_TIMEOUT_MS)
    assert "scan_totalseg holds label 3, 5" in widget.last_error
    assert "type what its labels are under 'Its labels' (TotalSegmentator's kidneys: 2=1 3=1 *=0" in widget.last_error
    widget.ref_mapping_edit.setText("2=1, 3:1")
    widget.ref_mapping_edit.setModified(True)
    widget.ref_mapping_edit.editingFinished.emit()
    qtbot.waitUntil(lambda: widget._score_worker is None and not widget._score_timer.isActive(), timeout=RUN_TIMEOUT_MS)
    assert "reference labels 3:1: expected FROM=TO" in widget.last_error
    widget.last_scores = None
    widget.ref_mapping_edit.setText("2=1 3=1 *=0")
    widget.ref_mapping_edit.setModified(True)
    widget.ref_mapping_edit.editingFinished.emit()
    qtbot.waitUntil(lambda: widget.last_scores is not None and widget._score_worker is None, timeout=RUN_TIMEOUT_MS)
    expected = kits_scores(labels.data, (truth > 0).astype(np.uint8), (1.0, 1.0, 1.0))
    assert widget.last_error == "" and widget.last_scores.kidney_dice == pytest.approx(expected.kidney_dice)
    assert np.isnan(widget.last_scores.tumor_dice) and np.isnan(widget.last_scores.composite_dice)
    assert [widget.table.item(r, 0).text() for r in (1, 2)] == ["n/a", "n/a"]
    assert widget.detection_label.text().startswith("Tumors: not scored.")
    assert "scan_totalseg read as 2=1 3=1 *=0" in widget.detection_label.text()
    np.testing.assert_array_equal(other.data, totalseg)  # the layer itself is not changed
    # The typed labels belong to that reference: the case's own ground truth is read as KiTS19's.
    truth_layer = viewer.layers["case_00007 ground truth"]
    widget.last_scores = None
    widget.gt_combo.setCurrentIndex(widget.gt_combo.findData(truth_layer))
    qtbot.waitUntil(lambda: widget.last_scores is not None and widget._score_worker is None, timeout=RUN_TIMEOUT_MS)
    assert widget.ref_mapping_edit.text() == "" and np.isfinite(widget.last_scores.tumor_dice)
    widget.gt_combo.setCurrentIndex(widget.gt_combo.findData(other))
    assert widget.ref_mapping_edit.text() == "2=1 3=1 *=0"
    widget.ref_mapping_edit.setText("2=1 3=1 4=0 *=0")  # typed, not entered, when the reference changes
    widget.ref_mapping_edit.setModified(True)
    widget.gt_combo.setCurrentIndex(widget.gt_combo.findData(truth_layer))
    widget.gt_combo.setCurrentIndex(widget.gt_combo.findData(other))
    assert widget.ref_mapping_edit.text() == "2=1 3=1 4=0 *=0"  # not lost
    # Choosing the prediction itself by mistake is refused, and leaves its look alone.
    widget.gt_combo.setCurrentIndex(widget.gt_combo.findData(labels))
    assert labels.contour == 0
    # A plain status line ("Saved a&b...") stays plain when more is said under it.
    widget._say("Saved a&b.nii.gz")
    widget._add_status("More & more.")
    widget._add_status("Again.")  # what is said is escaped once, however many lines follow
    assert widget.status.text() == "Saved a&amp;b.nii.gz<br>More &amp; more.<br>Again."


def test_scoring_refuses_a_reference_from_another_ct(qtbot, viewer_widget):
    from dataclasses import replace

    from napari_kits._layers import META_KEY, geometry_of

    viewer, widget = viewer_widget
    _run(qtbot, widget, widget.run_all, "run all")
    reference = viewer.layers["case_00007 ground truth"]
    geometry = geometry_of(reference)
    moved = geometry.source.affine.copy()
    moved[:3, 3] += 40.0  # same shape, another place in the world: another CT
    other = replace(geometry, source=replace(geometry.source, affine=moved))
    viewer.add_labels(reference.data.copy(), name="other CT ground truth", metadata={META_KEY: other})
    widget.gt_combo.setCurrentIndex(widget.gt_combo.findText("other CT ground truth"))
    widget.pred_combo.setCurrentIndex(widget.pred_combo.findData(widget._session.labels_layer))
    assert widget.compute_scores() is None and "not on one grid" in widget.last_error


def test_a_ct_without_a_reference_is_segmented_without_scores_or_errors(qtbot, make_napari_viewer, tiny_kseg,
                                                                        case_folder, tmp_path):
    from napari_kits._reader import read_kits
    from napari_kits._widget import KitsWidget

    viewer = make_napari_viewer()
    [(data, kwargs, kind)] = read_kits(str(case_folder / "imaging.nii.gz"))  # the CT, and no KiTS19 reference:
    viewer.add_image(data, **kwargs)
    affine = nib.load(str(case_folder / "imaging.nii.gz")).affine
    organs = np.repeat(np.arange(20, dtype=np.uint8), data.size // 20 + 1)[:data.size].reshape(data.shape)
    nib.save(nib.Nifti1Image(organs, affine), str(tmp_path / "organs.nii.gz"))
    [(data, kwargs, kind)] = read_kits(str(tmp_path / "organs.nii.gz"))  # another tool's organ map
    assert kind == "labels"
    viewer.add_labels(data, **kwargs)
    widget = KitsWidget(viewer)
    assert widget.set_weights(tiny_kseg)
    assert not widget.stage2_button.isEnabled()  # nothing to read yet: stage 1 first
    _run(qtbot, widget, widget.run_all, "run all")
    qtbot.wait(300)  # past the scoring debounce
    # The result is listed as a reference too, but not chosen: it would be scored against itself.
    assert widget.gt_combo.findData(widget._session.labels_layer) >= 0 and widget.gt_combo.currentData() is None
    assert widget.last_error == "" and widget.last_scores is None and widget.table.item(0, 0) is None


def test_each_ct_is_scored_against_its_own_reference_and_no_stale_scores_stay(qtbot, viewer_widget, case_folder,
                                                                              tmp_path):
    from kitseg.metrics import kits_scores
    from kitseg.phantom import make_synthetic_case
    from napari_kits._reader import read_kits

    viewer, widget = viewer_widget
    with qtbot.waitSignal(widget.scores_updated, timeout=RUN_TIMEOUT_MS):  # scored after the run, unasked
        _run(qtbot, widget, widget.run_all, "run all")
    assert widget.gt_combo.currentText() == "case_00007 ground truth"
    second = make_synthetic_case(shape=(16, 48, 52), spacing=(2.0, 1.2, 1.2), seed=3)
    second.save_case_folder(tmp_path / "case_00008")
    for data, kwargs, kind in read_kits(str(tmp_path / "case_00008")):
        getattr(viewer, f"add_{kind}")(data, **kwargs)
    widget.ct_combo.setCurrentIndex(widget.ct_combo.findText("case_00008"))
    assert not widget.stage2_button.isEnabled()  # this CT has no stage 1 yet
    [(data, kwargs, kind)] = read_kits(str(case_folder / "imaging.nii.gz"))
    kwargs.update(name="far", translate=np.add(kwargs["translate"], (900.0, 0.0, 0.0)))  # another patient's table
    far = viewer.add_image(data, **kwargs)
    widget.ct_combo.setCurrentIndex(widget.ct_combo.findData(far))  # chosen: brought into view
    low, high = far.extent.world
    assert low[0] <= viewer.dims.point[0] <= high[0]
    viewer.layers.remove(far)
    widget.ct_combo.setCurrentIndex(widget.ct_combo.findText("case_00008"))
    low, high = widget.ct_combo.currentData().extent.world
    assert low[0] <= viewer.dims.point[0] <= high[0]
    with qtbot.waitSignal(widget.scores_updated, timeout=RUN_TIMEOUT_MS):
        _run(qtbot, widget, widget.run_all, "run all")
    labels = widget._session.labels_layer
    assert widget.gt_combo.currentText() == "case_00008 ground truth" and widget.last_error == ""
    # Named after their CT, as another CT is open (napari would have made them "labels [1]"...).
    assert {labels.name, widget._session.y1_layer.name, widget._session.mask_layer.name} == {
        "labels (case_00008)", "y1 (case_00008)", "mask (case_00008)"}
    expected = kits_scores(labels.data, second.labels, second.spacing)
    assert widget.table.item(0, 0).text() == f"{expected.kidney_dice:.4f}"
    # Its reference closed: the other CT's is not on this grid, so nothing is scored, and the
    # table no longer shows figures of a reference that is gone.
    viewer.layers.remove("case_00008 ground truth")
    qtbot.wait(300)
    assert widget.table.item(0, 0) is None and widget.last_scores is None and widget.last_error == ""
    assert not widget.stage2_button.isEnabled() or widget._live(widget._session.mask_layer)
    # The first CT's result scored again, then closed: its figures go with it.
    widget.pred_combo.setCurrentIndex(widget.pred_combo.findText("labels"))
    widget.gt_combo.setCurrentIndex(widget.gt_combo.findText("case_00007 ground truth"))
    qtbot.waitUntil(lambda: widget.last_scores is not None, timeout=RUN_TIMEOUT_MS)
    viewer.layers.remove("labels")
    assert widget.table.item(0, 0) is None and widget.last_scores is None


def test_a_score_still_computing_when_its_reference_goes_is_not_shown(qtbot, viewer_widget):
    viewer, widget = viewer_widget
    with qtbot.waitSignal(widget.scores_updated, timeout=RUN_TIMEOUT_MS):
        _run(qtbot, widget, widget.run_all, "run all")
    qtbot.waitUntil(lambda: widget._score_worker is None, timeout=RUN_TIMEOUT_MS)
    worker = widget.compute_scores()
    assert worker is not None
    viewer.layers.remove("case_00007 ground truth")  # while the worker scores against it
    qtbot.waitUntil(lambda: widget._score_worker is None, timeout=RUN_TIMEOUT_MS)
    qtbot.wait(100)
    assert widget.last_scores is None and widget.table.item(0, 0) is None and widget.last_error == ""


def test_a_reference_opened_from_a_file_is_chosen_and_outlined(qtbot, make_napari_viewer, tiny_kseg, case_folder):
    from napari_kits._reader import read_kits
    from napari_kits._widget import KitsWidget

    viewer = make_napari_viewer()
    for path in (case_folder / "imaging.nii.gz", case_folder / "segmentation.nii.gz"):  # two files, not a folder
        [(data, kwargs, kind)] = read_kits(str(path))
        getattr(viewer, f"add_{kind}")(data, **kwargs)
    reference = viewer.layers[-1]
    widget = KitsWidget(viewer)
    assert widget.set_weights(tiny_kseg)
    # Opened from a file, a reference (or another tool's map) is not offered as the prediction too.
    assert widget.gt_combo.currentData() is reference and widget.pred_combo.currentData() is None
    with qtbot.waitSignal(widget.scores_updated, timeout=RUN_TIMEOUT_MS):
        _run(qtbot, widget, widget.run_all, "run all")
    assert widget.gt_combo.currentData() is reference and reference.contour == 2
    assert widget.pred_combo.currentData() is widget._session.labels_layer


def test_closing_the_ct_during_a_run_stops_it(qtbot, viewer_widget, monkeypatch):
    from kitseg.pipeline import Progress, Segmenter

    viewer, widget = viewer_widget
    slow = Segmenter._forward_probs
    monkeypatch.setattr(Segmenter, "_forward_probs", lambda s, n, b, *a: (time.sleep(0.05), slow(s, n, b, *a))[1])
    widget.batch_spin.setValue(1)
    closed = []

    def close_on_first_batch(event):
        if isinstance(event, Progress) and event.step == "stage 1" and not closed:
            closed.append(True)
            viewer.layers.remove("case_00007")

    with qtbot.waitSignal(widget.run_finished, timeout=RUN_TIMEOUT_MS) as blocker:
        worker = widget.run_all()
        worker.yielded.connect(close_on_first_batch)
    assert blocker.args == ["run all", "cancelled"]
    assert "stopped: its CT layer was closed" in widget.status.text() and not widget.busy
    assert widget._session is None


def test_a_ct_not_in_hu_is_flagged_and_the_ground_truth_is_never_saved_over(qtbot, viewer_widget, case_folder):
    viewer, widget = viewer_widget
    gt = viewer.layers["case_00007 ground truth"]
    before = (case_folder / "segmentation.nii.gz").read_bytes()
    assert widget.save_layer(gt, case_folder / "segmentation.nii.gz") is None
    assert "refusing to overwrite the ground-truth file it was opened from" in widget.last_error
    assert (case_folder / "segmentation.nii.gz").read_bytes() == before

    ct = viewer.layers["case_00007"]
    ct.data = (np.asarray(ct.data, np.int32) + 1024).astype(np.int16)  # raw scanner values, the intercept lost
    _run(qtbot, widget, widget.run_stage1, "stage 1")
    assert "rescale intercept" in widget.last_warning and "rescale intercept" in widget.status.text()
    assert "Stage 1 done on cpu" in widget.status.text()  # said under the warning, which stays in view


def test_a_label_map_opened_beside_its_ct_is_never_saved_over_it(qtbot, make_napari_viewer, case_folder, tmp_path):
    import shutil

    from napari_kits._reader import read_kits
    from napari_kits._save import SaveError
    from napari_kits._widget import KitsWidget
    from napari_kits._writer import write_labels

    ct = Path(shutil.copy(case_folder / "imaging.nii.gz", tmp_path / "ct.nii.gz"))
    seg = Path(shutil.copy(case_folder / "segmentation.nii.gz", tmp_path / "ct_seg.nii.gz"))
    viewer = make_napari_viewer()
    for path in (ct, seg):  # two files, as File > Open gives them: the label map knows only its own
        for data, kwargs, kind in read_kits(str(path)):
            getattr(viewer, f"add_{kind}")(data, **kwargs)
    widget = KitsWidget(viewer)
    labels = viewer.layers[-1]
    before = ct.read_bytes()
    (tmp_path / "a_folder.nii.gz").mkdir()  # refused before the "Replace file?" question
    assert widget.save_layer(labels, tmp_path / "a_folder.nii.gz") is None
    assert "a_folder.nii.gz: is a folder; choose a file name" in widget.last_error
    assert widget.save_layer(labels, ct) is None
    assert f"{ct}: refusing to overwrite the file of the open layer" in widget.last_error
    with pytest.raises(SaveError, match="refusing to overwrite the file of the open layer"):
        write_labels(str(ct), labels.data, {"metadata": labels.metadata})
    # napari's own File > Save Selected Layers: the reason reaches the user (napari drops a
    # writer's ValueError and says only "not a valid writer").
    with pytest.raises(SaveError, match=f"{ct}: refusing to overwrite the file of the open layer"):
        labels.save(str(ct), plugin="napari-kits")
    assert ct.read_bytes() == before
    widget.close()


def test_an_image_napari_kits_did_not_open_is_named_with_what_to_do(make_napari_viewer, tiny_kseg, isolated_settings):
    from napari_kits._widget import KitsWidget

    viewer = make_napari_viewer()
    widget = KitsWidget(viewer)
    assert widget.set_weights(tiny_kseg)
    assert widget.run_all() is None and widget.last_error.startswith("open a CT first")
    viewer.add_image(np.zeros((4, 32, 32), np.int16), name="pasted scan")  # napari's own reader, say: no geometry
    assert widget.run_all() is None
    assert widget.last_error.startswith("pasted scan was not opened by napari-kits, so its place in the scanner")
    assert "File > Open and choose napari-kits" in widget.last_error


def test_a_label_map_opened_alone_is_said_to_be_no_ct(make_napari_viewer, tiny_kseg, case_folder, isolated_settings):
    from napari_kits._reader import read_kits
    from napari_kits._widget import KitsWidget

    viewer = make_napari_viewer()
    for data, kwargs, kind in read_kits(str(case_folder / "segmentation.nii.gz")):
        getattr(viewer, f"add_{kind}")(data, **kwargs)
    widget = KitsWidget(viewer)
    assert widget.set_weights(tiny_kseg)
    assert widget.run_all() is None
    assert "was read as a label map (whole numbers, few of them), not a CT: open the CT image" in widget.last_error


def test_labels_of_a_dicom_series_are_offered_and_saved_as_a_dicom_seg(qtbot, make_napari_viewer, tiny_kseg,
                                                                       tmp_path, monkeypatch):
    """A radiology user's round: open a series, segment, save the labels as a SEG for the PACS."""
    pytest.importorskip("highdicom")
    from napari_kits import _widget
    from napari_kits._reader import read_kits

    from .test_dicom import _ct, write_series
    from .test_dicom_seg import read_seg_labels

    files = write_series(tmp_path / "SE2", _ct((8, 24, 20), seed=2))
    viewer = make_napari_viewer()
    for data, kwargs, kind in read_kits(str(tmp_path / "SE2")):
        getattr(viewer, f"add_{kind}")(data, **kwargs)
    widget = _widget.KitsWidget(viewer)
    assert widget.set_weights(tiny_kseg)
    _run(qtbot, widget, widget.run_all, "run all")
    labels_layer = widget._session.labels_layer
    labels_layer.data[2:5, 5:9, 4:8] = 2  # a correction
    asked = {}

    def choose_seg(parent, title, suggestion, filters, options=None):
        asked.update(suggestion=suggestion, filters=filters)
        # The user picks the last filter (DICOM SEG) and keeps the name, which Qt's dialog gives a .dcm suffix for
        # the last one it had: SE2_labels.nii.gz becomes SE2_labels.nii.dcm.
        chosen = filters.split(";;")[-1]
        return (suggestion.replace(".nii.gz", ".nii.dcm") if chosen.endswith("(*.dcm)") else suggestion), chosen

    monkeypatch.setattr(_widget.QFileDialog, "getSaveFileName", choose_seg)
    widget.save_combo.setCurrentIndex(widget.save_combo.findData(labels_layer))
    with qtbot.waitSignal(widget.saved, timeout=RUN_TIMEOUT_MS) as blocker:
        widget._save_clicked()
    assert asked["filters"] == "NIfTI (*.nii.gz *.nii);;DICOM SEG over the CT series (*.dcm)"
    assert Path(asked["suggestion"]) == tmp_path / "SE2_labels.nii.gz"
    assert blocker.args == [str(tmp_path / "SE2_labels.dcm")]
    source = widget._session.prepared.volume.source
    np.testing.assert_array_equal(read_seg_labels(tmp_path / "SE2_labels.dcm", files),
                                  source.to_source(labels_layer.data).transpose(2, 1, 0))
    # The mask is no label map of kidney and tumor: NIfTI only.
    widget.save_combo.setCurrentIndex(widget.save_combo.findData(widget._session.mask_layer))
    with qtbot.waitSignal(widget.saved, timeout=RUN_TIMEOUT_MS):
        widget._save_clicked()
    assert asked["filters"] == "NIfTI (*.nii.gz *.nii)" and (tmp_path / "SE2_mask.nii.gz").is_file()
