"""The "KiTS segmentation" dock widget: Model / Stage 1 / Mask / Stage 2 / Score / Save.

A thin adapter: every computation is an engine call run by :mod:`napari_kits._tasks` in a
napari thread worker. Workers never touch Qt objects or layers; what they produce reaches the
viewer through the worker's ``yielded``/``returned`` signals, handled here on the GUI thread.

Layers (all placed in world mm, see :mod:`napari_kits._layers`):

- ``y1``: stage-1 foreground probability on the stage grid, filled in as batches finish;
- ``mask``: the stage-2 region of interest (y1 >= threshold, dilated), a labels layer the user
  may paint; stage 2 reads its *current* data. Moving the threshold or radius makes a new one
  and keeps a painted one as ``mask (edited)``, as a new stage 2 keeps corrected labels;
- ``labels``: the result on the CT's own grid (1 kidney, 2 tumor), editable with napari's tools;
- optional ``P(kidney)``/``P(tumor)`` probability layers on the stage grid.
"""

from __future__ import annotations

import logging
import re
import time
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
from qtpy.QtCore import Qt, QTimer, Signal
from qtpy.QtWidgets import (
    QAbstractItemView,
    QCheckBox,
    QComboBox,
    QDoubleSpinBox,
    QFileDialog,
    QFormLayout,
    QGroupBox,
    QHBoxLayout,
    QHeaderView,
    QLabel,
    QLineEdit,
    QMessageBox,
    QProgressBar,
    QPushButton,
    QScrollArea,
    QSizePolicy,
    QSpinBox,
    QTableWidget,
    QTableWidgetItem,
    QVBoxLayout,
    QWidget,
)

from . import _settings as keys
from ._layers import (
    KITS21_CYST,
    RUN_KEY,
    LayerGeometry,
    checksum,
    geometry_of,
    labels_layer_kwargs,
    probability_layer_kwargs,
)
from ._settings import kits_settings, read_bool, read_float

log = logging.getLogger(__name__)

#: Minimum time between two refreshes of the y1 layer while stage 1 runs (keeps the GUI fluid).
REFRESH_INTERVAL_S = 0.15
MASK_DEBOUNCE_MS = 250
SCORE_DEBOUNCE_MS = 600
RESULT_KINDS = ("labels", "y1", "mask", "probability")
PROGRESS_STEPS = 1000
#: Pause between adding two output layers before a run (lets the event loop breathe).
MAKER_GAP_MS = 20


_NOTHING = object()  # no y1 to put back
MASK_CONTOUR = 2  # the mask's outline width (napari's Labels.contour; 0 fills it, as a user may choose)


@dataclass
class _Session:
    """What the widget knows about the CT being segmented (arrays are shared with the layers)."""

    ct_layer: Any
    volume: Any  # kitseg.geometry.Volume over the CT layer's data
    prepared: Any = None  # kitseg.preprocess.PreparedVolume
    y1: np.ndarray | None = None
    y1_complete: bool = False
    y1_layer: Any = None
    mask_layer: Any = None
    labels_layer: Any = None
    # The labels as stage 2 wrote them (a checksum): anything else in the layer is the user's
    # correction, which a new run must not overwrite.
    labels_written: tuple | None = None
    mask_written: tuple | None = None  # the same for the mask: a painted one is kept when it is rebuilt
    probability_layers: dict = field(default_factory=dict)  # class name -> its P(...) layer
    # Output layers added empty before a run starts and not filled yet, by kind ("mask", "labels").
    # Adding a layer blocks the GUI thread for 0.1-0.3 s (napari builds its visual), so it
    # happens when the user clicks, never in the middle of a run; a run that ends without
    # results removes them again.
    spare: dict = field(default_factory=dict)
    # While a stage-1 run has shown zeros in the y1 layer but not started: what to put back if
    # it ends first (the previous y1 array, or None when the run added the layer).
    y1_before: Any = _NOTHING


def _volume_of(layer: Any):
    """A :class:`kitseg.geometry.Volume` view of a CT layer opened by this plugin."""
    from kitseg.geometry import Volume

    geometry = geometry_of(layer)
    return Volume.from_internal(np.asarray(layer.data), geometry.source)


def _section(title: str) -> tuple[QGroupBox, QFormLayout]:
    box = QGroupBox(title)
    form = QFormLayout(box)
    form.setFieldGrowthPolicy(QFormLayout.AllNonFixedFieldsGrow)
    form.setContentsMargins(6, 6, 6, 6)
    return box, form


def _row(*widgets: QWidget) -> QWidget:
    holder = QWidget()
    layout = QHBoxLayout(holder)
    layout.setContentsMargins(0, 0, 0, 0)
    for w in widgets:
        if isinstance(w, QLabel):  # a caption keeps its text's width; the fields beside it take the rest
            w.setSizePolicy(QSizePolicy.Fixed, QSizePolicy.Preferred)
        layout.addWidget(w)
    return holder


class KitsWidget(QWidget):
    """Kidney + tumor segmentation of the selected CT with the two-stage KiTS19 method."""

    #: (task, outcome): task in {"stage 1", "stage 2", "run all"}, outcome in {"done", "cancelled", "error"}.
    run_finished = Signal(str, str)
    mask_updated = Signal()
    scores_updated = Signal()
    saved = Signal(str)

    def __init__(self, napari_viewer: Any, parent: QWidget | None = None):
        super().__init__(parent)
        # napari hands plugin widgets a PublicOnlyProxy; the widget compares layers by identity
        # (combo boxes, the session's layers), which needs the real objects.
        self.viewer = getattr(napari_viewer, "__wrapped__", napari_viewer)
        self.settings = kits_settings()
        self._segmenter = None
        self._segmenter_key: tuple | None = None
        self._session: _Session | None = None
        self._worker = None
        self._task = ""
        self._last_refresh = 0.0
        self._run_mask_made = False
        self._ref_mappings: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # reference -> its labels, as typed
        self._mask_worker = None
        self._mask_dirty = False
        self._after_mask: Callable[[], None] | None = None
        self._score_worker = None
        self._score_dirty = False
        self._score_round = 0  # a score computed before the table was last emptied is not shown
        self._scored_layer = None
        self._scored_reference = None  # the reference whose edits score again, as the prediction's do
        self._history_lengths: dict[int, tuple[int, int]] = {}  # by id(layer): undo and redo told from redraws
        self._per_slice: dict[str, np.ndarray] = {}
        self._save_worker = None
        self._outlined: weakref.WeakSet = weakref.WeakSet()  # reference layers this widget has outlined
        self.last_scores = None  # kitseg.metrics.CaseScores of the last scoring
        self.last_error = ""
        self._status_before_error = ""
        self._error_html = ""
        self.last_warning = ""  # the last warning about the input (not HU?), as shown
        self._weights_meta: dict | None = None
        self._applying_model_mask = False  # spin boxes set from a model, not by the user
        self._run_session: _Session | None = None  # the session the current run writes to
        self._ct_closed_during_run = False
        self._pending_makers: list[Callable[[], None]] = []
        # napari's Labels layer imports pandas on first use (~0.4 s): pay that now, while the
        # widget opens, rather than when the first mask appears in the middle of a run.
        import pandas  # noqa: F401

        self._build()
        self._connect_viewer()
        self._refresh_layer_combos()
        self._load_settings()
        self._update_buttons()

    # ------------------------------------------------------------------ layout
    def _build(self) -> None:
        content = QWidget()
        column = QVBoxLayout(content)
        column.setContentsMargins(4, 4, 4, 4)

        # CT chooser and shared run status
        self.ct_combo = QComboBox()
        self.ct_combo.setToolTip("The CT to segment (an image layer opened with napari-kits)")
        column.addWidget(_row(QLabel("CT"), self.ct_combo))

        # Model
        box, form = _section("Model")
        self.weights_edit = QLineEdit()
        self.weights_edit.setReadOnly(True)
        self.weights_edit.setPlaceholderText("no model chosen")
        self.browse_button = QPushButton("Browse…")
        self.browse_button.setToolTip("Choose a .kseg checkpoint")
        form.addRow("Weights", _row(self.weights_edit, self.browse_button))
        self.model_info = QLabel()
        self.model_info.setWordWrap(True)
        self.model_info.setTextFormat(Qt.RichText)
        self.model_info.setTextInteractionFlags(Qt.TextSelectableByMouse)
        form.addRow(self.model_info)
        self.device_combo = QComboBox()
        self.batch_spin = QSpinBox()
        self.batch_spin.setRange(1, 64)
        self.batch_spin.setValue(8)
        self.batch_spin.setToolTip("Stage slices per network batch (lower it if memory runs short)")
        form.addRow("Device", _row(self.device_combo, QLabel("Batch"), self.batch_spin))
        column.addWidget(box)

        # Stage 1
        box, form = _section("Stage 1 — kidney + tumor probability (y1)")
        self.stage1_button = QPushButton("Run stage 1")
        self.run_all_button = QPushButton("Run all")
        self.run_all_button.setToolTip("Stage 1, the mask and stage 2 in one go")
        form.addRow(_row(self.stage1_button, self.run_all_button))
        column.addWidget(box)

        # Mask
        box, form = _section("Mask — stage-2 region of interest")
        self.threshold_spin = QDoubleSpinBox()
        self.threshold_spin.setRange(0.0, 1.0)
        self.threshold_spin.setSingleStep(0.05)
        self.threshold_spin.setDecimals(2)
        self.threshold_spin.setValue(0.5)
        self.threshold_spin.setToolTip("Foreground where y1 >= threshold")
        self.radius_spin = QDoubleSpinBox()
        self.radius_spin.setRange(0.0, 50.0)
        self.radius_spin.setSingleStep(1.0)
        self.radius_spin.setDecimals(1)
        self.radius_spin.setValue(10.0)
        self.radius_spin.setSuffix(" vox")
        self.radius_spin.setToolTip("Dilation radius (ball), in stage-grid voxels unless the model says mm")
        form.addRow("Threshold", self.threshold_spin)
        form.addRow("Radius", self.radius_spin)
        hint = QLabel("Paint or erase the mask layer to steer stage 2.")
        hint.setWordWrap(True)
        form.addRow(hint)
        column.addWidget(box)

        # Stage 2
        box, form = _section("Stage 2 — kidney / tumor labels")
        self.stage2_button = QPushButton("Run stage 2")
        self.probs_check = QCheckBox("Class probabilities")
        self.cleanup_check = QCheckBox("Remove stray pieces")
        self.cleanup_check.setChecked(True)
        self.cleanup_check.setToolTip(
            "Drop labelled pieces with no kidney voxel, under 10% of the largest piece's size, "
            "entirely above or below the kidneys' slices, or holding under 10% as much kidney as "
            "the piece with most (false positives in muscle, liver, bowel or pelvis), and relabel "
            "kidney the tumor pieces under 20% of their kidney's largest; uncheck to keep every "
            "piece and tumor call"
        )
        form.addRow(_row(self.stage2_button, self.probs_check))
        form.addRow(self.cleanup_check)
        column.addWidget(box)

        # Progress (shared by the runs)
        self.progress = QProgressBar()
        # A fixed range: changing it (or the busy mode) makes Qt relayout the whole window (~0.1 s).
        self.progress.setRange(0, PROGRESS_STEPS)
        self.progress.setValue(0)
        self.progress.setTextVisible(True)
        self.progress.setFormat("idle")
        self.cancel_button = QPushButton("Cancel")
        self.cancel_button.setEnabled(False)
        column.addWidget(_row(self.progress, self.cancel_button))
        self.status = QLabel()
        self.status.setWordWrap(True)
        self.status.setTextFormat(Qt.RichText)  # always: plain messages are escaped (_say), lines joined with <br>
        column.addWidget(self.status)

        # Score
        box, form = _section("Score against a reference")
        self.gt_combo = QComboBox()
        self.pred_combo = QComboBox()
        form.addRow("Reference", self.gt_combo)
        self.ref_mapping_edit = QLineEdit()
        self.ref_mapping_edit.setPlaceholderText("as KiTS19's (e.g. 2=1 3=1 *=0)")
        self.ref_mapping_edit.setToolTip(
            "The reference's label values mapped onto KiTS19's 0 (background), 1 (kidney), 2 (tumor) before "
            "scoring, as kits-seg evaluate --map-gt-labels does; the layer is not changed. Another tool's map: "
            "TotalSegmentator's kidneys are 2=1 3=1 *=0 (* is every other value but 0); KiTS21/23's cysts 3=1 "
            "(within the kidney region, as they are read when this is empty). Where nothing maps to 2, the "
            "reference has no tumor class and tumor is not scored.")
        form.addRow("Its labels", self.ref_mapping_edit)
        form.addRow("Prediction", self.pred_combo)
        self.recompute_button = QPushButton("Recompute")
        self.auto_score_check = QCheckBox("after edits")
        self.auto_score_check.setChecked(True)
        self.auto_score_check.setToolTip("Recompute when the prediction layer is painted or replaced")
        self.worst_button = QPushButton("Worst slice")
        self.worst_button.setEnabled(False)
        form.addRow(_row(self.recompute_button, self.auto_score_check, self.worst_button))
        self.table = QTableWidget(3, 3)
        self.table.setHorizontalHeaderLabels(["Dice", "Pred. mL", "Ref. mL"])
        self.table.setVerticalHeaderLabels(["Kidney", "Tumor", "Composite"])
        self.table.setEditTriggers(QAbstractItemView.NoEditTriggers)
        self.table.horizontalHeader().setSectionResizeMode(QHeaderView.Stretch)
        self.table.verticalHeader().setSectionResizeMode(QHeaderView.ResizeToContents)
        self.table.setSizePolicy(QSizePolicy.Expanding, QSizePolicy.Fixed)
        self.table.setFixedHeight(self.table.horizontalHeader().sizeHint().height() + 3 * 26 + 4)
        form.addRow(self.table)
        self.detection_label = QLabel()
        self.detection_label.setWordWrap(True)
        self.detection_label.setToolTip("Tumors as 3D connected pieces. Found: at least half of a reference tumor "
                                        "labelled tumor; the percentages: how much of each of the three largest "
                                        "reference tumors is labelled tumor. False: a predicted tumor piece sharing "
                                        "no voxel with a reference tumor. Pieces under 0.1 mL are not counted.")
        form.addRow(self.detection_label)
        from ._plot import DicePlot

        self.plot = DicePlot()
        form.addRow(self.plot)
        column.addWidget(box)

        # Save
        box, form = _section("Save on the CT's grid (NIfTI, DICOM SEG)")
        box.setToolTip("Any result as NIfTI on its CT's grid; the labels of a CT read from a DICOM series also as "
                       "a DICOM SEG over that series (choose the .dcm filter when saving)")
        self.save_combo = QComboBox()
        self.save_button = QPushButton("Save as…")
        form.addRow("Layer", _row(self.save_combo, self.save_button))
        column.addWidget(box)
        column.addStretch(1)

        scroll = QScrollArea()
        scroll.setWidgetResizable(True)
        scroll.setWidget(content)
        scroll.setHorizontalScrollBarPolicy(Qt.ScrollBarAlwaysOff)
        outer = QVBoxLayout(self)
        outer.setContentsMargins(0, 0, 0, 0)
        outer.addWidget(scroll)
        # Wide enough that no row is clipped (the scroll area only scrolls vertically).
        self.setMinimumWidth(max(430, content.minimumSizeHint().width() + scroll.verticalScrollBar().sizeHint().width() + 4))

        self._mask_timer = QTimer(self)
        self._mask_timer.setSingleShot(True)
        self._mask_timer.setInterval(MASK_DEBOUNCE_MS)
        self._mask_timer.timeout.connect(self.update_mask)
        self._maker_timer = QTimer(self)  # adds a run's output layers one by one before it starts
        self._maker_timer.setSingleShot(True)
        self._maker_timer.setInterval(MAKER_GAP_MS)
        self._maker_timer.timeout.connect(self._next_maker)
        self._score_timer = QTimer(self)
        self._score_timer.setSingleShot(True)
        self._score_timer.setInterval(SCORE_DEBOUNCE_MS)
        self._score_timer.timeout.connect(self.compute_scores)

        self.browse_button.clicked.connect(self._browse_weights)
        self.device_combo.currentIndexChanged.connect(self._on_device_changed)
        self.batch_spin.valueChanged.connect(lambda v: self.settings.setValue(keys.BATCH_SIZE, int(v)))
        self.cleanup_check.toggled.connect(lambda on: self.settings.setValue(keys.CLEANUP, bool(on)))
        self.ct_combo.currentIndexChanged.connect(self._on_ct_changed)
        self.stage1_button.clicked.connect(self.run_stage1)
        self.run_all_button.clicked.connect(self.run_all)
        self.stage2_button.clicked.connect(self.run_stage2)
        self.cancel_button.clicked.connect(self.cancel)
        self.threshold_spin.valueChanged.connect(self._on_mask_params_changed)
        self.radius_spin.valueChanged.connect(self._on_mask_params_changed)
        self.recompute_button.clicked.connect(self.compute_scores)
        self.worst_button.clicked.connect(self.go_to_worst_slice)
        self.plot.slice_clicked.connect(self.go_to_slice)
        self.pred_combo.currentIndexChanged.connect(self._on_pred_changed)
        self.gt_combo.currentIndexChanged.connect(self._on_reference_changed)
        self.ref_mapping_edit.editingFinished.connect(self._on_ref_mapping_changed)
        self.save_button.clicked.connect(self._save_clicked)

    # ------------------------------------------------------------------ settings and model
    def _load_settings(self) -> None:
        from kitseg.device import available_devices

        self.device_combo.blockSignals(True)
        self.device_combo.addItem(f"auto ({available_devices()[0]})", "auto")
        for name in available_devices():
            self.device_combo.addItem(name.upper() if name in ("cpu", "mps") else name, name)
        saved_device = self.settings.value(keys.DEVICE, "auto")
        index = self.device_combo.findData(saved_device)
        self.device_combo.setCurrentIndex(max(index, 0))
        self.device_combo.blockSignals(False)
        batch = self.settings.value(keys.BATCH_SIZE, None)
        if batch is not None:
            self.batch_spin.setValue(int(batch))

        saved = self.settings.value(keys.WEIGHTS, "")
        if saved and Path(saved).is_file():
            self.set_weights(saved, persist=False)
        else:
            from kitseg.weights import default_weights_path

            try:
                self.set_weights(default_weights_path(), persist=False)
            except FileNotFoundError:
                self.model_info.setText(
                    "<b>No default weights are installed yet.</b> Choose a trained <tt>.kseg</tt> "
                    "file with <i>Browse…</i> (train one with <tt>kits-seg train</tt>)."
                )
        self.cleanup_check.setChecked(read_bool(self.settings, keys.CLEANUP, True))
        threshold = read_float(self.settings, keys.THRESHOLD, None)  # the radius: set_weights, by unit
        if threshold is not None:
            self.threshold_spin.blockSignals(True)
            self.threshold_spin.setValue(threshold)
            self.threshold_spin.blockSignals(False)

    @property
    def weights_path(self) -> Path | None:
        text = self.weights_edit.text().strip()
        return Path(text) if text else None

    @property
    def device(self) -> str:
        return self.device_combo.currentData() or "auto"

    def set_weights(self, path: str | Path, persist: bool = True) -> bool:
        """Choose a ``.kseg`` file and show its metadata; False (and a message) if unusable."""
        from kitseg.checkpoint import read_metadata

        path = Path(path)
        try:
            meta = read_metadata(path)
        except Exception as error:  # FileNotFoundError, CheckpointError: show, don't crash
            self.model_info.setText(f"<span style='color:#ff6060'>{_escape(str(error))}</span>")
            return False
        self._weights_meta = meta
        self.weights_edit.setText(str(path))
        self.weights_edit.setToolTip(str(path))
        self.model_info.setText(_describe_metadata(meta))
        if persist:
            self.settings.setValue(keys.WEIGHTS, str(path))
        self._apply_model_mask(meta.get("mask", {}))
        return True

    def _radius_unit(self) -> str:
        """The unit of the radius spin box: the loaded model's (``"voxels"`` or ``"mm"``)."""
        return ((self._weights_meta or {}).get("mask") or {}).get("radius_unit", "voxels")

    def _apply_model_mask(self, mask: dict) -> None:
        """The model's mask rule in the spin boxes, unless the user chose otherwise for this unit.

        A radius the user chose is kept with its unit: 10 stage-grid voxels are not 10 mm, so a
        model whose radius is in the other unit starts from its own. What is set here is the
        model's, not the user's choice, so it is not persisted.
        """
        unit = mask.get("radius_unit", "voxels")
        self.radius_spin.setSuffix(" mm" if unit == "mm" else " vox")
        threshold = read_float(self.settings, keys.THRESHOLD, None)
        radius = read_float(self.settings, keys.RADIUS, None)
        if radius is not None and self.settings.value(keys.RADIUS_UNIT, "voxels") != unit:
            radius = None
        self._applying_model_mask = True
        try:
            if threshold is None and "threshold" in mask:
                self.threshold_spin.setValue(float(mask["threshold"]))
            if "radius" in mask or radius is not None:
                self.radius_spin.setValue(radius if radius is not None else float(mask["radius"]))
        finally:
            self._applying_model_mask = False

    def _browse_weights(self) -> None:
        start = str(self.weights_path.parent) if self.weights_path else str(Path.home())
        path, _ = QFileDialog.getOpenFileName(self, "Choose a model", start, "kitseg checkpoints (*.kseg)")
        if path:
            self.set_weights(path)

    def _on_device_changed(self, _index: int) -> None:
        self.settings.setValue(keys.DEVICE, self.device)

    def _model_arg(self):
        """The cached Segmenter if it matches the chosen file and device, else a spec to load."""
        from ._tasks import ModelSpec

        if self.weights_path is None:
            raise ValueError("choose a model (.kseg) first")
        spec = ModelSpec(self.weights_path, self.device)
        if self._segmenter is not None and self._segmenter_key == spec.key:
            return self._segmenter
        return spec

    # ------------------------------------------------------------------ layers
    def _connect_viewer(self) -> None:
        events = self.viewer.layers.events
        events.inserted.connect(self._on_layers_changed)
        events.removed.connect(self._on_layers_changed)
        events.moved.connect(self._on_layers_changed)

    def _on_layers_changed(self, event=None) -> None:
        layer = getattr(event, "value", None)
        if event is not None and event.type == "inserted" and layer is not None:
            layer.events.name.connect(self._refresh_layer_combos)
        self._refresh_layer_combos()

    def _refresh_layer_combos(self, event=None) -> None:
        layers = list(self.viewer.layers)
        cts = [l for l in layers if l.__class__.__name__ == "Image" and getattr(geometry_of(l), "kind", None) == "ct"]
        labels = [l for l in layers if l.__class__.__name__ == "Labels" and getattr(geometry_of(l), "kind", "") != "mask"]
        saveable = [l for l in layers if getattr(geometry_of(l), "kind", None) in RESULT_KINDS]
        gts = sorted(labels, key=lambda l: getattr(geometry_of(l), "kind", "") != "ground_truth")
        preds = sorted(labels, key=lambda l: getattr(geometry_of(l), "kind", "") != "labels")
        self._fill(self.ct_combo, cts)
        self._fill(self.gt_combo, gts, pick=_is_reference)
        self._fill(self.pred_combo, preds, pick=_is_result)
        self._fill(self.save_combo, saveable[::-1])
        if self._session is not None and self._session.ct_layer not in layers:
            self._drop_session()
        self._update_buttons()  # the mask layer may be gone

    @staticmethod
    def _fill(combo: QComboBox, layers: list, pick: Callable[[Any], bool] = lambda layer: True) -> None:
        """List ``layers``; keep the chosen one, else choose the first that ``pick`` accepts (or none)."""
        current = combo.currentData()
        combo.blockSignals(True)
        combo.clear()
        for layer in layers:
            combo.addItem(layer.name, layer)
        index = next((i for i, l in enumerate(layers) if l is current),
                     next((i for i, l in enumerate(layers) if pick(l)), -1))
        combo.setCurrentIndex(index)
        combo.blockSignals(False)
        if current is not combo.currentData():
            combo.currentIndexChanged.emit(combo.currentIndex())

    def _on_ct_changed(self, _index: int) -> None:
        layer = self.ct_combo.currentData()
        if self._session is not None and self._session.ct_layer is not layer:
            self._drop_session()
        if layer is not None:
            self._bring_into_view(layer)
        self._update_buttons()

    def _bring_into_view(self, layer: Any) -> None:
        """Show ``layer``'s middle when the slice shown lies outside it (another CT, elsewhere in the
        world: napari keeps the view where it was, and the chosen CT and its results stay unseen)."""
        dims = self.viewer.dims
        axes = list(range(dims.ndim - layer.ndim, dims.ndim))
        low, high = np.asarray(layer.extent.world)
        point = np.asarray(dims.point)[axes]
        hidden = [i for i, axis in enumerate(axes) if axis in dims.not_displayed]
        if all(low[i] <= point[i] <= high[i] for i in hidden):
            return
        middle = (low + high) / 2
        dims.set_point(axes, tuple(middle))
        # The camera centres in the displayed axes' order (napari's), whatever the dims' order.
        self.viewer.camera.center = tuple(middle[axes.index(axis)] for axis in dims.displayed if axis in axes)

    def _drop_session(self) -> None:
        """Forget the current CT's session; a run still writing to it is stopped (its CT was closed)."""
        starting = bool(self._pending_makers) or self._maker_timer.isActive()  # _next_maker reports that case
        if self._worker is not None and not starting and self._run_session is self._session is not None:
            self._outcome = "cancelled"
            self._ct_closed_during_run = self._session.ct_layer not in self.viewer.layers
            self._worker.quit()
        self._session = None

    def _session_for_ct(self) -> _Session:
        layer = self.ct_combo.currentData()
        if layer is None:
            others = [other.name for other in self.viewer.layers
                      if other.__class__.__name__ == "Image" and geometry_of(other) is None]
            if others:  # the user sees an image: say why it is not offered
                from kitseg.io import name_a_few

                one = len(others) == 1
                raise ValueError(f"{name_a_few(others, 3)} {'was' if one else 'were'} not opened by napari-kits, so "
                                 f"{'its' if one else 'their'} place in the scanner (voxel size, orientation) is "
                                 "unknown: open the CT file with File > Open and choose napari-kits")
            label_maps = [other.name for other in self.viewer.layers
                          if other.__class__.__name__ == "Labels" and geometry_of(other) is not None]
            if label_maps and not any(other.__class__.__name__ == "Image" for other in self.viewer.layers):
                from kitseg.io import name_a_few

                raise ValueError(f"{name_a_few(label_maps, 3)} {'was' if len(label_maps) == 1 else 'were'} read as "
                                 "a label map (whole numbers, few of them), not a CT: open the CT image it was "
                                 "made on (File > Open, or File > Open Sample > napari-kits)")
            raise ValueError("open a CT first (File > Open, or File > Open Sample > napari-kits)")
        if self._session is None or self._session.ct_layer is not layer:
            self._session = _Session(ct_layer=layer, volume=_volume_of(layer))
        return self._session

    def _live(self, layer: Any) -> bool:
        return layer is not None and layer in self.viewer.layers

    def _put_layer(self, current: Any, data: np.ndarray, kind: str, kwargs: dict, spare: str | None = None) -> Any:
        """Show ``data`` in ``current`` (else the session's spare layer ``spare``) if it fits, else in a new layer."""
        session = self._session
        if not self._live(current) and spare is not None and session is not None:
            current = session.spare.pop(spare, None)
        if self._live(current) and current.data.shape == data.shape and current.data.dtype == data.dtype:
            if current.data is not data:
                current.data = data
            current.scale, current.translate = kwargs["scale"], kwargs["translate"]
            current.metadata.update(kwargs["metadata"])
            return current
        if self._live(current):
            self.viewer.layers.remove(current)
        add = self.viewer.add_labels if kind == "labels" else self.viewer.add_image
        return add(data, **kwargs)

    def _stage_geometry(self, kind: str, grid: Any = None, session: _Session | None = None) -> LayerGeometry:
        session = session or self._session
        return geometry_of(session.ct_layer).with_kind(kind, grid if grid is not None else session.prepared.grid)

    def _stage_grid(self, session: _Session) -> Any:
        """The chosen model's stage grid for the session's CT (from its metadata; no weights read)."""
        from kitseg.config import PreprocessingConfig
        from kitseg.preprocess import StageGrid

        if self._weights_meta is None:
            raise ValueError("choose a model (.kseg) first")
        config = PreprocessingConfig.from_dict(self._weights_meta["preprocessing"])
        if session.prepared is not None and session.prepared.config == config:
            return session.prepared.grid
        return StageGrid.for_volume(session.volume, config)

    def _layer_makers(self, session: _Session, grid: Any, kinds: tuple[str, ...],
                      y1: np.ndarray | None = None) -> list[Callable[[], None]]:
        """Steps that show the run's output layers before it starts, one layer per step.

        ``y1`` (zeros on ``grid``) becomes the y1 layer's data, which stage 1 fills in place;
        "mask" and "labels" layers are added empty, as spares, unless the session has them.
        """
        makers: list[Callable[[], None]] = []
        if "y1" in kinds:
            def make_y1():
                geometry = self._stage_geometry("y1", grid, session)
                kwargs = probability_layer_kwargs(self._result_name(session, "y1"), geometry, grid.affine)
                session.y1_before = session.y1_layer.data if self._live(session.y1_layer) else None
                session.y1_layer = self._put_layer(session.y1_layer, y1, "image", kwargs)
                session.y1_layer.visible = True
            makers.append(make_y1)
        if "mask" in kinds and not self._live(session.mask_layer) and not self._live(session.spare.get("mask")):
            def make_mask():
                geometry = self._stage_geometry("mask", grid, session)
                kwargs = labels_layer_kwargs(self._result_name(session, "mask"), geometry, grid.affine, opacity=0.3)
                self._add_spare(session, "mask", np.zeros(grid.shape, np.uint8), kwargs)
            makers.append(make_mask)
        if "labels" in kinds and not self._live(session.labels_layer) and not self._live(session.spare.get("labels")):
            def make_labels():
                geometry = geometry_of(session.ct_layer).with_kind("labels")
                kwargs = labels_layer_kwargs(self._result_name(session, "labels"), geometry, session.volume.affine,
                                             opacity=0.6)
                self._add_spare(session, "labels", np.zeros(session.volume.shape, np.uint8), kwargs)
            makers.append(make_labels)
        return makers

    def _add_spare(self, session: _Session, kind: str, data: np.ndarray, kwargs: dict) -> None:
        """Add an empty labels layer for a run's output, known as unfilled before the viewer shows it
        (adding it makes the boxes choose it, and scoring would start on an empty layer)."""
        from napari.layers import Labels

        session.spare[kind] = layer = Labels(data, **kwargs)
        self.viewer.add_layer(layer)

    def _result_name(self, session: _Session, kind: str) -> str:
        """A new output layer's name: ``kind``, with its CT's name where another CT is open (napari
        would number it, ``labels [1]``, which says nothing of the CT it belongs to)."""
        others = [layer for layer in self.viewer.layers
                  if layer is not session.ct_layer and getattr(geometry_of(layer), "kind", None) == "ct"]
        return f"{kind} ({session.ct_layer.name})" if others else kind

    def _undo_unfilled_outputs(self, session: _Session | None) -> None:
        """After a cancelled or failed run: remove the layers it added but never filled, and
        give the y1 layer back what it showed if stage 1 never started."""
        if session is None:
            return
        for kind in list(session.spare):
            layer = session.spare.pop(kind)
            if self._live(layer):
                self.viewer.layers.remove(layer)
        before, session.y1_before = session.y1_before, _NOTHING
        if before is _NOTHING or not self._live(session.y1_layer):
            return
        if before is None:
            self.viewer.layers.remove(session.y1_layer)
            session.y1_layer = None
        else:
            session.y1_layer.data = before

    # ------------------------------------------------------------------ runs
    @property
    def busy(self) -> bool:
        return self._worker is not None

    def _start(self, task: str, generator: Callable, *args: Any, on_returned: Callable | None = None,
               makers: list[Callable[[], None]] | None = None, **kwargs: Any) -> Any:
        from napari.qt.threading import create_worker

        if self.busy:
            raise RuntimeError(f"{self._task} is still running")
        self._task = task
        self._outcome = "done"
        from ._tasks import reporting_failures

        # The widget reports errors (status line, log); napari need not re-raise them.
        worker = create_worker(reporting_failures, generator, *args, **kwargs,
                               _start_thread=False, _ignore_errors=True)
        worker.yielded.connect(self._on_yielded)
        if on_returned is not None:
            worker.returned.connect(on_returned)
        worker.errored.connect(self._on_errored)
        worker.aborted.connect(self._on_aborted)
        worker.finished.connect(self._on_finished)
        self._worker = worker
        self._set_running(True)
        self.progress.setValue(0)
        self.progress.setFormat(f"{task}: starting…")
        self.status.setText("")
        self.last_error = ""
        self._run_mask_made = False  # this run's mask (Run all): a cancel says what it left
        self._run_session = self._session
        self._pending_makers = list(makers or [])
        self._next_maker()
        return worker

    def _next_maker(self) -> None:
        """Add the next output layer (a few ms apart: repaints and input get in between), then start."""
        worker = self._worker
        if worker is None:
            return
        if worker.abort_requested or self._session is not self._run_session:
            self._pending_makers.clear()
            if not worker.abort_requested:
                self._outcome = "error"
                self._show_error(f"{self._task} not started: the CT layer was closed")
            self._on_finished()  # the worker never started: it will not signal
            return
        try:
            if self._pending_makers:
                self._pending_makers.pop(0)()
                self._maker_timer.start()
            else:
                worker.start()
        except Exception as error:  # the run could not show its results or start: report, stop
            self._pending_makers.clear()
            self._outcome = "error"
            log.error("%s not started", self._task, exc_info=error)
            self._show_error(f"{self._task} not started: {error}")
            self._on_finished()

    def _set_running(self, running: bool) -> None:
        for w in (self.stage1_button, self.run_all_button, self.stage2_button, self.browse_button,
                  self.device_combo, self.batch_spin, self.ct_combo, self.threshold_spin, self.radius_spin,
                  self.cleanup_check):
            w.setEnabled(not running)
        self.cancel_button.setEnabled(running)
        if not running:
            self._update_buttons()

    def _update_buttons(self) -> None:
        session = self._session
        ready = session is not None and session.y1_complete and self._live(session.mask_layer)
        self.stage2_button.setEnabled(not self.busy and ready)
        if ready:
            self.stage2_button.setToolTip("")
        elif session is not None and session.y1_complete:
            self.stage2_button.setToolTip("The mask layer is gone: move the threshold or radius to rebuild it")
        else:
            self.stage2_button.setToolTip("Run stage 1 first: stage 2 reads its y1 and the mask layer")

    def _guard(self, action: Callable[[], Any]) -> Any:
        try:
            return action()
        except (ValueError, RuntimeError, FileNotFoundError) as error:
            self._show_error(str(error))
            return None

    def _stage1_note(self, y1: np.ndarray) -> str:
        """What to do after stage 1; said plainly when its y1 leaves stage 2 nothing to read."""
        threshold = self.threshold_spin.value()
        if float(y1.max(initial=0.0)) < threshold:
            return (f"Stage 1 done on {self._device_name()}: y1 stays under the threshold ({threshold:g}) everywhere, "
                    "so the mask is empty and stage 2 would label nothing (no kidney in this scan?).")
        return f"Stage 1 done on {self._device_name()}: look at y1 and the mask, then run stage 2."

    def _loaded_note(self) -> str:
        return f"Model loaded on {self._device_name()}."

    def _device_name(self) -> str:
        return str(self._segmenter.device) if self._segmenter is not None else "?"

    def _add_status(self, text: str, color: str | None = None) -> None:
        """Say ``text`` under what this run has said so far (a warning about the input stays in view
        when the result is reported); the note that the model was loaded gives way."""
        html = _escape(text) if color is None else f"<span style='color:{color}'>{_escape(text)}</span>"
        current = self.status.text()
        if html in current:
            return
        self.status.setText(html if current in ("", _escape(self._loaded_note())) else f"{current}<br>{html}")

    def _say(self, text: str) -> None:
        """Replace the status line with plain ``text`` (escaped: the line is rich text)."""
        self.status.setText(_escape(text))

    def _show_error(self, text: str) -> None:
        if not self.last_error:  # what was said before the first of a row of errors comes back once it is cleared
            self._status_before_error = self.status.text()
        self.last_error = text
        self._error_html = f"<span style='color:#ff6060'>{_escape(text)}</span>"
        self.status.setText(self._error_html)
        log.warning(text)

    def run_stage1(self) -> Any:
        """Stage 1 on the chosen CT; the y1 layer fills in as batches finish."""
        from ._tasks import iter_stage1

        def start():
            session = self._session_for_ct()
            model = self._model_arg()
            grid = self._stage_grid(session)
            y1 = np.zeros(grid.shape, np.float32)
            makers = self._layer_makers(session, grid, ("y1", "mask"), y1)
            return self._start("stage 1", iter_stage1, model, session.volume, session.prepared,
                               self.batch_spin.value(), on_returned=lambda _y1: self.update_mask(now=True),
                               makers=makers, y1=y1)

        return self._guard(start)

    def run_all(self) -> Any:
        """Stage 1, the mask (current threshold/radius) and stage 2 in one worker."""
        from ._tasks import iter_run_all

        def start():
            session = self._session_for_ct()
            model = self._model_arg()
            grid = self._stage_grid(session)
            y1 = np.zeros(grid.shape, np.float32)
            makers = self._layer_makers(session, grid, ("y1", "mask", "labels"), y1)
            return self._start("run all", iter_run_all, model, session.volume,
                               self.threshold_spin.value(), self.radius_spin.value(), session.prepared,
                               self.probs_check.isChecked(), self.batch_spin.value(),
                               makers=makers, y1=y1, cleanup=self.cleanup_check.isChecked())

        return self._guard(start)

    def run_stage2(self) -> Any:
        """Stage 2 inside the mask layer's current data (as painted), then labels on the CT grid."""
        from ._tasks import iter_stage2

        if self._mask_timer.isActive() or self._mask_worker is not None:
            # A mask update is pending: run once the mask matches the controls.
            self._after_mask = self.run_stage2
            if self._mask_timer.isActive():
                self._mask_timer.stop()
                self.update_mask(now=True)
            return None

        def start():
            session = self._session
            if session is None or not session.y1_complete:
                raise ValueError("run stage 1 first (stage 2 needs a complete y1)")
            if not self._live(session.mask_layer):
                raise ValueError("the mask layer is gone: move the threshold or radius to rebuild it")
            mask = np.array(session.mask_layer.data, dtype=bool)  # a snapshot: painting may go on
            model = self._model_arg()
            makers = self._layer_makers(session, session.prepared.grid, ("labels",))
            return self._start("stage 2", iter_stage2, model, session.prepared, session.y1, mask,
                               self.probs_check.isChecked(), self.batch_spin.value(), makers=makers,
                               cleanup=self.cleanup_check.isChecked())

        return self._guard(start)

    def cancel(self) -> None:
        """Stop the running step at its next batch; finished batches stay in place."""
        if self._worker is not None:
            self._outcome = "cancelled"
            self.progress.setFormat(f"{self._task}: cancelling…")
            self._worker.quit()

    def _on_yielded(self, event: Any) -> None:
        from kitseg.pipeline import Progress

        from ._tasks import MaskReady, ModelReady, Stage1Started, Stage2Done

        if isinstance(event, Progress):
            self._show_progress(event)
        elif isinstance(event, ModelReady):
            self._segmenter, self._segmenter_key = event.segmenter, event.key
            self._say(self._loaded_note())
        elif isinstance(event, Stage1Started):
            self._on_stage1_started(event)
        elif isinstance(event, MaskReady):
            self._run_mask_made = True
            self._set_mask(event.mask)
            self.mask_updated.emit()
        elif isinstance(event, Stage2Done):
            self._on_stage2_done(event)

    def _show_progress(self, p: Any) -> None:
        session = self._session
        if p.total > 0:
            self.progress.setValue(round(PROGRESS_STEPS * p.done / p.total))
        self.progress.setFormat(f"{p.step}: {p.done}/{p.total}")
        if p.step == "stage 1" and session is not None:
            if p.done == p.total:
                session.y1_complete = True
            now = time.perf_counter()
            if self._live(session.y1_layer) and (p.done == p.total or now - self._last_refresh >= REFRESH_INTERVAL_S):
                session.y1_layer.refresh()
                self._last_refresh = time.perf_counter()

    def _on_stage1_started(self, event: Any) -> None:
        session = self._session
        if session is None:  # its CT was closed: the run is being stopped
            return
        session.y1_before = _NOTHING
        session.y1_complete = False
        session.prepared, session.y1 = event.prepared, event.y1
        geometry = self._stage_geometry("y1")
        kwargs = probability_layer_kwargs(self._result_name(session, "y1"), geometry, geometry.stage_grid.affine)
        session.y1_layer = self._put_layer(session.y1_layer, event.y1, "image", kwargs)
        session.y1_layer.visible = True
        self._last_refresh = time.perf_counter()
        warning = event.prepared.warning
        if warning:  # the CT may not be in HU: said where the user looks, the run goes on
            from napari.utils.notifications import show_warning

            self.last_warning = warning
            self._add_status(warning, color="#ffb040")
            show_warning(warning)

    def _set_mask(self, mask: np.ndarray) -> None:
        session = self._session
        if session is None or session.prepared is None or mask.shape != session.y1.shape:
            return
        painted = self._set_aside_if_edited(session, "mask_layer", "mask_written")
        if painted is not None:
            painted.visible = False
        geometry = self._stage_geometry("mask")
        kwargs = labels_layer_kwargs(self._result_name(session, "mask"), geometry, geometry.stage_grid.affine,
                                     opacity=0.3)
        layer = self._put_layer(session.mask_layer, mask, "labels", kwargs, spare="mask")
        if layer is not session.mask_layer:  # new: drawn as its outline, so y1 and the CT show inside it
            layer.contour, layer.opacity = MASK_CONTOUR, 0.9
        layer.visible = True  # rebuilt: shown again, also where stage 2 had hidden it
        session.mask_layer = layer
        session.mask_written = checksum(mask)
        if painted is not None:  # the user asked for a mask from y1 again; the painting stays
            self._add_status(f"Your painted mask was kept as '{painted.name}' (hidden); "
                             f"'{layer.name}' follows the threshold and radius and is what stage 2 uses.")
        if self._worker is None and self._live(session.labels_layer):  # not within Run all, which goes on
            self._add_status(f"The mask changed; '{session.labels_layer.name}' was made with the one before: "
                             "run stage 2 to update it.")
        self._update_buttons()

    def _on_stage2_done(self, event: Any) -> None:
        from kitseg.metrics import describe_found

        session = self._session
        if session is None:  # its CT was closed: the run is being stopped
            return
        kept = self._set_aside_if_edited(session, "labels_layer", "labels_written")
        geometry = geometry_of(session.ct_layer).with_kind("labels")
        kwargs = labels_layer_kwargs(self._result_name(session, "labels"), geometry, session.volume.affine, opacity=0.6)
        session.labels_layer = self._put_layer(session.labels_layer, event.labels, "labels", kwargs, spare="labels")
        session.labels_written = checksum(event.labels)
        # What the run wrote, and with which model: saved unchanged as a DICOM SEG, it is "automatic".
        session.labels_layer.metadata[RUN_KEY] = {"checksum": session.labels_written, "algorithm_type": "automatic",
                                                  "model": self.weights_path.name if self.weights_path else None}
        if kept is not None:
            kept.visible = False  # under the new result in the same colours it would only confuse
            self._add_status(f"Your corrected labels were kept (hidden) as '{kept.name}'; the new result is "
                             f"'{session.labels_layer.name}'.")
        self._add_status(f"Segmented on {self._device_name()}: {describe_found(event.labels, session.volume.spacing)}; "
                         "paint to correct, then save.")
        for layer in (session.y1_layer, session.mask_layer):
            if self._live(layer):
                layer.visible = False
        stale = [layer for layer in session.probability_layers.values() if self._live(layer)]
        if stale and not event.probabilities:  # an earlier run's, beside these labels: they would mislead
            for layer in stale:
                self.viewer.layers.remove(layer)
            session.probability_layers.clear()
            self._add_status("The earlier run's class probabilities were removed: they were not this result's "
                             "(tick 'Class probabilities' to have them with each run).")
        if event.probabilities:
            colormaps = {"kidney": "red", "tumor": "yellow"}
            for name, probs in event.probabilities.items():
                pgeom = self._stage_geometry("probability")
                kwargs = probability_layer_kwargs(f"P({name})", pgeom, pgeom.stage_grid.affine,
                                                  colormap=colormaps.get(name, "magma"))
                # This CT's own layer only: another CT's P(kidney), or a user's layer of that name, stays.
                layer = self._put_layer(session.probability_layers.get(name), probs, "image", kwargs)
                session.probability_layers[name] = layer
                layer.visible = False
        labels = session.labels_layer
        labels.editable = True
        # On top, selected: napari's paint / fill / erase tools act on it at once.
        index = self.viewer.layers.index(labels)
        if index != len(self.viewer.layers) - 1:
            self.viewer.layers.move(index, len(self.viewer.layers))
        self.viewer.layers.selection.active = labels
        for combo in (self.pred_combo, self.save_combo):  # scored and saved next: the new result
            index = combo.findData(labels)
            if index >= 0:
                combo.setCurrentIndex(index)
        reference = self._choose_reference_for(labels)
        if reference is not None:
            self._outline_once(reference)
            self._score_timer.start()

    def _choose_reference_for(self, labels: Any) -> Any:
        """The reference to score ``labels`` against: the chosen one if it lies on their grid, else
        the first reference that does (when another CT was scored before: this CT's ground truth),
        else none."""
        current = self.gt_combo.currentData()
        if current is not None and current is not labels and _on_one_grid(current, labels):
            return current
        layers = [self.gt_combo.itemData(i) for i in range(self.gt_combo.count())]
        index = next((i for i, layer in enumerate(layers)
                      if layer is not labels and _is_reference(layer) and _on_one_grid(layer, labels)), -1)
        self.gt_combo.setCurrentIndex(index)
        return self.gt_combo.currentData()

    def _set_aside_if_edited(self, session: _Session, layer_attr: str, checksum_attr: str) -> Any:
        """If the user has edited a layer the session wrote (``labels``, ``mask``) since it was
        written, set it aside under a new name, so the next result gets a layer of its own; return it."""
        layer, written = getattr(session, layer_attr), getattr(session, checksum_attr)
        if not self._live(layer) or written is None or checksum(layer.data) == written:
            return None
        # Its geometry stays with it: it can still be saved. A second set-aside is "(edited 2)", not
        # napari's "(edited) [1]".
        taken = {other.name for other in self.viewer.layers}
        layer.name = next(name for n in range(1, len(taken) + 2)
                          if (name := f"{layer.name} (edited{'' if n == 1 else f' {n}'})") not in taken)
        setattr(session, layer_attr, None)
        setattr(session, checksum_attr, None)
        return layer

    def _on_errored(self, error: Exception) -> None:
        self._outcome = "error"
        log.error("%s failed", self._task, exc_info=error)
        self._show_error(f"{self._task} failed: {error}")

    def _on_aborted(self) -> None:
        self._outcome = "cancelled"

    def _on_finished(self) -> None:
        task, outcome = self._task, self._outcome
        self._worker = None
        self._set_running(False)
        if outcome == "done":
            self.progress.setValue(PROGRESS_STEPS)
            self.progress.setFormat(f"{task}: done")
        else:
            self.progress.setFormat(f"{task}: {outcome}")
        session = self._session
        run_session, self._run_session = self._run_session, None
        stage1_started = run_session is not None and run_session.y1_before is _NOTHING
        if outcome != "done":
            self._undo_unfilled_outputs(run_session)
        if (task == "stage 1" and outcome == "cancelled" and stage1_started and session is not None
                and self._live(session.y1_layer)):
            session.y1_layer.refresh()
            self._say("Stage 1 cancelled: y1 holds the slices finished so far; run it again to complete.")
        elif task == "stage 2" and outcome == "cancelled":
            self._say("Stage 2 cancelled: the labels were not changed.")
        elif task == "run all" and outcome == "cancelled" and session is not None:
            if not stage1_started:
                self._say("Run all cancelled before it began: nothing was changed.")
            elif not session.y1_complete:
                self._say("Run all cancelled in stage 1: y1 holds the slices finished so far; run again to complete.")
            elif not self._run_mask_made:  # a mask still shown is the previous run's, of the previous y1
                self._say("Run all cancelled after stage 1: y1 is complete and its mask is being made; "
                          "then run stage 2 to finish.")
                self.update_mask(now=True)
            else:
                self._say("Run all cancelled in stage 2: y1 and the mask are complete, the labels were not "
                          "changed; run stage 2 to finish.")
        elif task == "stage 1" and outcome == "done" and session is not None and session.y1 is not None:
            self._add_status(self._stage1_note(session.y1))
        if self._ct_closed_during_run:
            self._ct_closed_during_run = False
            self._say(f"{task} stopped: its CT layer was closed.")
        if task == "run all" and session is not None and self._live(session.y1_layer):
            session.y1_layer.refresh()
        self.run_finished.emit(task, outcome)

    # ------------------------------------------------------------------ mask
    def _on_mask_params_changed(self, _value: float) -> None:
        if not self._applying_model_mask:  # the user's choice, remembered with the radius' unit
            self.settings.setValue(keys.THRESHOLD, self.threshold_spin.value())
            self.settings.setValue(keys.RADIUS, self.radius_spin.value())
            self.settings.setValue(keys.RADIUS_UNIT, self._radius_unit())
        if self._session is not None and self._session.y1_complete:
            self._mask_timer.start()

    def update_mask(self, now: bool = False) -> None:
        """Recompute the mask from y1 in a worker (debounced by the spin boxes' timer)."""
        from napari.qt.threading import create_worker

        from ._tasks import make_mask, mask_spacing

        self._mask_timer.stop()
        session = self._session
        if session is None or not session.y1_complete or session.y1 is None:
            return
        if self._mask_worker is not None:
            self._mask_dirty = True  # recompute when the running one finishes
            return
        self._mask_dirty = False
        spacing = mask_spacing(self._segmenter, session.prepared) if self._segmenter is not None else None
        worker = create_worker(make_mask, session.y1, self.threshold_spin.value(), self.radius_spin.value(),
                               spacing, _start_thread=False, _ignore_errors=True)
        worker.returned.connect(self._on_mask_returned)
        worker.errored.connect(self._on_mask_errored)
        worker.finished.connect(self._on_mask_finished)
        self._mask_worker = worker
        worker.start()

    def _on_mask_errored(self, error: Exception) -> None:
        self._show_error(f"mask failed: {error}")
        session = self._session
        spare = session.spare.pop("mask", None) if session is not None else None
        if self._live(spare):
            self.viewer.layers.remove(spare)

    def _on_mask_returned(self, ready: Any) -> None:
        if not self._mask_dirty:
            self._set_mask(ready.mask)

    def _on_mask_finished(self) -> None:
        self._mask_worker = None
        if self._mask_dirty:
            self.update_mask(now=True)
            return
        self.mask_updated.emit()
        if self._after_mask is not None:
            action, self._after_mask = self._after_mask, None
            action()

    # ------------------------------------------------------------------ score
    def _on_pred_changed(self, _index: int = -1) -> None:
        layer = self.pred_combo.currentData()
        if layer is self._scored_layer:
            return
        self._clear_scores()  # they were another layer's
        before, self._scored_layer = self._scored_layer, layer
        self._watch_edits(before, layer)
        if layer is not None:
            self._on_pred_edited()  # replaced: scored anew

    def _watch_edits(self, before: Any, after: Any) -> None:
        """Score again when ``after`` is painted or replaced (the prediction, or the reference a
        user corrects), and no longer for ``before``."""
        if before is not None and before is not self._scored_layer and before is not self._scored_reference:
            for name, slot in (("paint", self._on_pred_edited), ("data", self._on_pred_edited),
                               ("set_data", self._on_undone_or_redone)):
                try:
                    getattr(before.events, name).disconnect(slot)
                except (TypeError, ValueError, RuntimeError):
                    pass
        if after is not None:
            after.events.paint.connect(self._on_pred_edited)
            after.events.data.connect(self._on_pred_edited)
            after.events.set_data.connect(self._on_undone_or_redone)
            self._history_lengths[id(after)] = _history_lengths(after)

    def _on_undone_or_redone(self, event=None) -> None:
        """napari's undo and redo (Ctrl+Z) write the labels and redraw them with no paint or data
        event. Every redraw (a slice turned) sends set_data, so only one whose undo history changed
        length is an edit: scored again, as a paint is."""
        layer = getattr(event, "source", None)
        lengths = _history_lengths(layer)
        if self._history_lengths.get(id(layer), lengths) != lengths:
            self._history_lengths[id(layer)] = lengths
            self._on_pred_edited()

    def _on_pred_edited(self, event=None) -> None:
        pred, reference = self.pred_combo.currentData(), self.gt_combo.currentData()
        # Scored unasked only where it can be: another CT's reference waits for the user's choice,
        # and a result layer a run has added but not yet filled would score as empty (Dice 0).
        if (self.auto_score_check.isChecked() and pred is not None and reference is not None and pred is not reference
                and _on_one_grid(pred, reference) and not self._is_unfilled(pred)):
            self._score_timer.start()

    def _is_unfilled(self, layer: Any) -> bool:
        """A layer a run added for its output before the output exists (``_Session.spare``)."""
        sessions = {id(s): s for s in (self._session, self._run_session) if s is not None}.values()
        return any(layer is spare for session in sessions for spare in session.spare.values())

    def _on_reference_changed(self, _index: int = -1) -> None:
        self._clear_scores()  # they were against another reference
        reference = self.gt_combo.currentData()
        if reference is not self._scored_reference:
            before, self._scored_reference = self._scored_reference, reference
            self._watch_edits(before, reference)
            if before is not None and self.ref_mapping_edit.isModified():  # typed, not yet entered: kept
                self._ref_mappings[before] = self.ref_mapping_edit.text()
        # What a reference's labels are belongs to that reference: another one is read as its own.
        self.ref_mapping_edit.setText(self._ref_mappings.get(reference, "") if reference is not None else "")
        if reference is not None and reference is not self.pred_combo.currentData():  # not a mis-click's
            self._outline_once(reference)
        self._on_pred_edited()

    def _outline_once(self, reference: Any) -> None:
        """Draw a reference as outlines, so the result's own colours show through it (filled, the two
        blend); once: a user who fills it again is not overruled by the next run or choice."""
        if reference is not None and reference not in self._outlined:
            self._outlined.add(reference)
            reference.contour = 2

    def _ref_mapping(self) -> dict[int, int] | None:
        """The reference's mapping as typed (None: none typed); ValueError naming what is wrong."""
        from kitseg.config import ConfigError, label_mapping

        text = self.ref_mapping_edit.text().replace(",", " ").split()
        if not text:
            return None
        try:
            return label_mapping(text, "reference labels")
        except ConfigError as error:
            raise ValueError(str(error)) from None

    def _on_ref_mapping_changed(self) -> None:
        if self.ref_mapping_edit.isModified():
            self.ref_mapping_edit.setModified(False)
            reference = self.gt_combo.currentData()
            if reference is not None:
                self._ref_mappings[reference] = self.ref_mapping_edit.text()
            self._clear_scores()
            self._on_pred_edited()

    def _clear_scores(self) -> None:
        """Empty the table, the tumor count and the plot: no figures shown for layers not scored."""
        self._score_timer.stop()
        self._score_round += 1
        self._score_dirty = False
        self.last_scores = None
        self._per_slice = {}
        self.table.clearContents()
        self.detection_label.setText("")
        self.plot.set_curves({})
        self.worst_button.setEnabled(False)

    @property
    def scoring_pending(self) -> bool:
        """Scores are on their way: asked for (debounced) or being computed."""
        return self._score_timer.isActive() or self._score_worker is not None

    def compute_scores(self) -> Any:
        """KiTS19 Dice and volumes of the prediction against the reference, in a worker."""
        from napari.qt.threading import create_worker

        pred, ref = self.pred_combo.currentData(), self.gt_combo.currentData()
        refusal, ref_mapping = None, None
        if pred is None or ref is None:
            refusal = "choose a reference and a prediction labels layer to score"
        elif pred is ref:
            refusal = "the reference and the prediction are the same layer"
        elif not _on_one_grid(pred, ref):
            refusal = (f"{pred.name} {pred.data.shape} and {ref.name} {ref.data.shape} are not on one grid "
                       "(they come from different CTs)")
        else:
            try:
                ref_mapping = self._ref_mapping()
            except ValueError as error:
                refusal = str(error)
        if refusal is not None:
            self._clear_scores()
            self._show_error(refusal)
            return None
        self._score_timer.stop()
        pred_geometry = geometry_of(pred)
        # The CT's own voxel size: a layer's scale is a display setting the user may change.
        spacing = _voxel_size(pred_geometry) or tuple(pred.scale)
        if self._score_worker is not None:
            self._score_dirty = True
            return None
        self._score_dirty = False
        pred_cysts = KITS21_CYST in getattr(pred_geometry, "file_labels", ())  # a KiTS23 file opened to score
        # 3 is a cyst in a KiTS reference (a case's ground truth, a KiTS21/23 map), not in another tool's.
        worker = create_worker(_score, np.asarray(pred.data), np.asarray(ref.data), spacing,
                               pred.name, ref.name, pred_cysts, _is_reference(ref), ref_mapping,
                               _start_thread=False, _ignore_errors=True)
        started = self._score_round
        worker.returned.connect(lambda result: self._on_scores(result) if self._score_round == started else None)
        worker.errored.connect(lambda e: (self._clear_scores(), self._show_error(f"scoring failed: {e}"))
                               if self._score_round == started else None)
        worker.finished.connect(self._on_score_finished)
        self._score_worker = worker
        self._score_slice_layer = pred
        worker.start()
        return worker

    def _on_score_finished(self) -> None:
        self._score_worker = None
        if self._score_dirty:
            self.compute_scores()

    def _on_scores(self, result: tuple) -> None:
        scores, curves, detection, note = result
        if self.last_error:  # what failed before (a painted 5 since erased) is not what the table shows
            self.last_error = ""
            if self.status.text() == self._error_html:  # nothing said since: the run's findings, said again
                self.status.setText(self._status_before_error)
            self._add_status("Scored.")
        self.last_scores = scores
        self._per_slice = curves
        rows = [
            (scores.kidney_dice, scores.kidney_ml, scores.ref_kidney_ml),
            (scores.tumor_dice, scores.tumor_ml, scores.ref_tumor_ml),
            (scores.composite_dice, None, None),
        ]
        for r, values in enumerate(rows):
            for c, value in enumerate(values):
                text = "" if value is None else ("n/a" if not np.isfinite(value) else
                                                 (f"{value:.4f}" if c == 0 else f"{value:.1f}"))
                item = QTableWidgetItem(text)
                item.setTextAlignment(Qt.AlignRight | Qt.AlignVCenter)
                self.table.setItem(r, c, item)
        counted = _describe_detection(detection) if detection is not None else "Tumors: not scored."
        self.detection_label.setText(counted + (f"\n{note}" if note else ""))
        self.plot.set_curves(curves)
        self.worst_button.setEnabled(self.worst_slice() is not None)
        self.scores_updated.emit()

    def worst_slice(self) -> int | None:
        """The CT slice with the lowest Dice of either region (slices with nothing to score skipped)."""
        if not self._per_slice:
            return None
        stacked = np.vstack(list(self._per_slice.values()))
        if not np.isfinite(stacked).any():
            return None
        lowest = np.nanmin(np.where(np.isfinite(stacked), stacked, np.inf), axis=0)
        return int(np.argmin(lowest))

    def go_to_worst_slice(self) -> None:
        index = self.worst_slice()
        if index is not None:
            self.go_to_slice(index)

    def go_to_slice(self, index: int) -> None:
        """Show CT slice ``index`` of the scored prediction (world position, so every layer follows)."""
        layer = getattr(self, "_score_slice_layer", None) or self.pred_combo.currentData()
        if layer is None:
            return
        z = float(layer.translate[0] + index * layer.scale[0])
        self.viewer.dims.set_point(0, z)
        self.plot.mark_slice(index)

    # ------------------------------------------------------------------ save
    def _ask_save_path(self, suggestion: Path, dicom_seg: bool = False) -> str | None:
        """The file to save to; ``dicom_seg``: labels of a DICOM series, offered as a DICOM SEG too."""
        seg_filter = "DICOM SEG over the CT series (*.dcm)"
        path, chosen = QFileDialog.getSaveFileName(
            self, "Save on the CT's grid", str(suggestion),
            "NIfTI (*.nii.gz *.nii)" + (f";;{seg_filter}" if dicom_seg else ""),
            options=QFileDialog.DontConfirmOverwrite,  # we ask ourselves, knowing the input CT
        )
        if path and chosen == seg_filter:
            # The suggestion's NIfTI suffix goes where the user changed the filter and kept the name
            # (Qt's own dialog turns SE2_labels.nii.gz into SE2_labels.nii.dcm).
            name = Path(path).name
            ending = re.search(r"(\.nii(\.gz)?)?(\.dcm)?$", name, flags=re.IGNORECASE)
            path = str(Path(path).with_name(name[:ending.start()] + (ending.group(3) or ".dcm")))  # .DCM kept
        return path or None

    def _confirm_overwrite(self, path: Path) -> bool:
        answer = QMessageBox.question(self, "Replace file?", f"{path} exists already.\nReplace it?",
                                      QMessageBox.Yes | QMessageBox.No, QMessageBox.No)
        return answer == QMessageBox.Yes

    def _save_clicked(self) -> None:
        from ._save import default_directory, default_filename, from_dicom_series

        layer = self.save_combo.currentData()
        geometry = geometry_of(layer) if layer is not None else None
        if geometry is None:
            self._show_error("nothing to save yet: run a segmentation first")
            return
        path = self._ask_save_path(default_directory(geometry) / default_filename(geometry, layer.name),
                                   dicom_seg=geometry.kind == "labels" and from_dicom_series(geometry))
        if path:
            self.save_layer(layer, path)

    def save_layer(self, layer: Any, path: str | Path) -> Any:
        """Write ``layer`` on its CT's grid at ``path``, asking before replacing a file."""
        from napari.qt.threading import create_worker

        from ._save import SaveError, refuse_input_file, refuse_open_files, save_layer, with_output_suffix

        geometry = geometry_of(layer)
        try:
            path = with_output_suffix(path)
            if path.is_dir():  # `scan` named with its suffix added, and a folder of that name
                raise SaveError(f"{path}: is a folder; choose a file name")
            refuse_input_file(geometry, path)
            refuse_open_files(path, self.viewer.layers)
        except SaveError as error:
            self._show_error(str(error))
            return None
        overwrite = False
        if path.exists():
            if not self._confirm_overwrite(path):
                self._say("Not saved.")
                return None
            overwrite = True
        data = np.array(layer.data)  # a snapshot: the user may keep painting while it writes
        worker = create_worker(save_layer, data, geometry, path, overwrite, layer.name, layer.metadata.get(RUN_KEY),
                               _start_thread=False, _ignore_errors=True)
        worker.returned.connect(lambda written: (self._say(f"Saved {written}"), self.saved.emit(str(written))))
        worker.errored.connect(lambda e: self._show_error(f"{layer.name} not saved: {e}"))
        worker.finished.connect(lambda: setattr(self, "_save_worker", None))
        self._save_worker = worker
        self._say(f"Saving {path.name}…")
        worker.start()
        return worker

    # ------------------------------------------------------------------ teardown
    def closeEvent(self, event) -> None:  # noqa: N802 (Qt name)
        self._maker_timer.stop()
        self._pending_makers.clear()
        for worker in (self._worker, self._mask_worker, self._score_worker):
            if worker is not None:
                worker.quit()
        super().closeEvent(event)


def _score(pred: np.ndarray, ref: np.ndarray, spacing: tuple, name: str, ref_name: str = "the reference",
           pred_cysts: bool = False, ref_cysts: bool = True, ref_mapping: dict[int, int] | None = None) -> tuple:
    """Worker body: the engine's KiTS19 scores, per-slice Dice curves, tumors found (None where the
    reference has no tumor class), and a note on how the labels were read (else empty).

    ``ref_mapping`` (the user's, as ``kits-seg evaluate --map-gt-labels``) maps the reference's
    values first. Without one, KiTS21/23 cysts (3) lie within the kidney region: a KiTS
    reference's (``ref_cysts``), and a prediction's where its file held them (``pred_cysts``; a 3
    painted anew is refused)."""
    from kitseg.config import KITS_LABELS, apply_label_mapping, describe_label_mapping, tumor_left_unlabelled
    from kitseg.io import name_a_few
    from kitseg.metrics import kits_scores, per_slice_dice, tumor_detection

    if ref_mapping is not None:
        try:
            ref = apply_label_mapping(ref, ref_mapping)
        except ValueError as error:  # values no label map holds (a brush set to 300)
            raise ValueError(f"{ref_name}: {error}") from None
        ref_cysts = False  # the mapping says what every value is
    with_cysts = []
    for layer_name, labels, cysts_allowed, is_ref in ((name, pred, pred_cysts, False), (ref_name, ref, ref_cysts, True)):
        values = KITS_LABELS.stray_values(labels)
        stray = [v for v in values if not (cysts_allowed and v == KITS21_CYST)]
        if stray:
            fix = ("type what its labels are under 'Its labels' (TotalSegmentator's kidneys: 2=1 3=1 *=0; "
                   "KiTS21/23's cysts: 3=1), or paint" if is_ref else "paint")
            raise ValueError(f"{layer_name} holds label {name_a_few(stray, 8)}"
                             f"{' after its mapping' if is_ref and ref_mapping else ''}: KiTS19 labels are 0 "
                             f"(background), 1 (kidney), 2 (tumor); {fix} those voxels with 1 or 2, or erase them")
        if cysts_allowed and KITS21_CYST in values:
            with_cysts.append(layer_name)
    notes = []
    if ref_mapping:
        notes.append(f"{ref_name} read as {describe_label_mapping(ref_mapping)}")
    if with_cysts:
        notes.append(f"cysts (label 3) of {' and '.join(with_cysts)} are scored within the kidney region")
    if ref_mapping and tumor_left_unlabelled(ref_mapping):
        notes.append("no label of the reference is tumor: tumor is not scored")
        scores = kits_scores(pred, ref, spacing, case=name, tumor_scored=False)
        return scores, {"kidney": per_slice_dice(pred, ref, "kidney")}, None, "; ".join(notes)
    detection = tumor_detection(pred, ref, spacing)
    scores = kits_scores(pred, ref, spacing, case=name, detection=detection)
    curves = {region: per_slice_dice(pred, ref, region) for region in ("kidney", "tumor")}
    return scores, curves, detection, "; ".join(notes)


def _describe_detection(detection: Any) -> str:
    """One line: tumors found, how much of each (largest first, up to three) is labelled, false pieces."""
    order = sorted(range(len(detection.ref_ml)), key=lambda i: -detection.ref_ml[i])
    shares = ", ".join(f"{100 * detection.labelled_share[i]:.0f}%" for i in order[:3])
    more = ", …" if len(order) > 3 else ""
    labelled = f" (labelled tumor: {shares}{more})" if order else ""
    return (f"Tumors found: {detection.found} of {len(order)}{labelled}; "
            f"false tumor pieces: {len(detection.false_ml)} ({sum(detection.false_ml):.1f} mL)")


def _is_reference(layer: Any) -> bool:
    """A layer to score against, chosen without asking: a case's ground truth or a KiTS19 label map
    opened from a file (LayerGeometry.offered_as_reference); not a result, another tool's organ
    map, or a layer napari-kits did not open (a user's scratch)."""
    geometry = geometry_of(layer)
    return geometry is not None and (geometry.kind == "ground_truth" or geometry.offered_as_reference)


def _is_result(layer: Any) -> bool:
    """A layer to score, chosen without asking: labels a run made, or a result opened from its file
    (``prediction_00042``, ``NAME_labels``) to correct; not another tool's map or a reference."""
    from kitseg.io import is_result_name

    geometry = geometry_of(layer)
    if geometry is None or geometry.kind != "labels":
        return False
    if geometry.offered_as_reference:  # a DICOM SEG a person drew or corrected, opened over its series
        return False
    return geometry.source_holds == "ct" or is_result_name(getattr(geometry.source, "path", None) or "")


def _history_lengths(layer: Any) -> tuple[int, int]:
    """How many edits a labels layer can undo and redo (napari keeps no public count)."""
    return len(getattr(layer, "_undo_history", ())), len(getattr(layer, "_redo_history", ()))


def _on_one_grid(a: Any, b: Any) -> bool:
    """Two labels layers hold voxels of one CT grid (so they can be scored against each other)."""
    return a.data.shape == b.data.shape and _same_ct_grid(geometry_of(a), geometry_of(b))


def _same_ct_grid(a: Any, b: Any) -> bool:
    """Two layers' CT geometries agree, as the engine checks it (layers without one: by shape alone)."""
    from kitseg.io import InputError, check_same_grid

    if a is None or b is None or a.source is None or b.source is None:
        return True
    try:
        check_same_grid(a.source, b.source)
    except InputError:
        return False
    return True


def _voxel_size(geometry: Any) -> tuple | None:
    """The internal-grid voxel size in mm of a layer on its CT's grid, else None."""
    from kitseg.geometry import voxel_spacing

    if geometry is None or geometry.source is None or geometry.on_stage_grid:
        return None
    return voxel_spacing(geometry.source.internal_affine())


def _escape(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def _describe_metadata(meta: dict) -> str:
    """A few lines for a radiologist/engineer: stages, preprocessing, mask, provenance."""
    from kitseg.checkpoint import model_summary, provenance_summary  # loaded already by read_metadata's caller

    summary = model_summary(meta)
    origins = provenance_summary(meta) or ["not recorded"]
    lines = [
        f"<b>Stages</b> {_escape(summary['stages'])}",
        f"<b>Preprocessing</b> {_escape(summary['preprocessing'])}",
        f"<b>Mask</b> {_escape(summary['mask'])} (the model's own; the Mask section sets the one used)",
        "<b>Training</b> " + "<br>".join(_escape(line) for line in origins)
        + " (all of it: <tt>kits-seg info --json</tt>)",
        f"<small>{_escape(summary['version'])}</small>",
    ]
    return "<br>".join(lines)
