"""``napari-kits``: napari with the KiTS segmentation widget docked and a CT loaded.

    napari-kits                         # the synthetic sample case
    napari-kits case_00042/             # a KiTS19 case folder, or a .nii/.nii.gz file
    napari-kits results/SE2_labels.dcm  # a DICOM SEG, over its series (opened with it)
    napari-kits --weights m.kseg --run-all --screenshot out.png --quit   # CI smoke, no blocking
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

log = logging.getLogger(__name__)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="napari-kits", description=__doc__.splitlines()[0])
    p.add_argument("inputs", nargs="*", help="CT .nii/.nii.gz files, KiTS case folders or DICOM series folders, "
                   "label maps (.nii.gz, or DICOM SEG .dcm: its series is opened too) (default: the sample case)")
    p.add_argument("--weights", type=Path, help="a .kseg checkpoint (default: the shipped weights, or the last used)")
    p.add_argument("--device", default=None, help="auto, cpu, cuda, cuda:N or mps")
    p.add_argument("--run-all", action="store_true", help="run stage 1, the mask and stage 2 on the first CT")
    p.add_argument("--screenshot", type=Path, help="save a screenshot of the window (after --run-all finishes)")
    p.add_argument("--quit", action="store_true", help="close when done (with --run-all / --screenshot)")
    return p


def close_notifications() -> None:
    """Close napari's notification toasts (a deprecation warning, say): in a screenshot they would
    cover the canvas."""
    from qtpy.QtWidgets import QApplication

    for toast in QApplication.allWidgets():
        if type(toast).__name__ == "NapariQtNotification":
            toast.close()


#: How long --screenshot waits for a run's scores before taking the picture without them.
SCORES_WAIT_MS = 60_000


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    import napari
    from qtpy.QtCore import QTimer

    from ._registration import PLUGIN_NAME, WIDGET_NAME, ensure_registered

    ensure_registered()
    viewer = napari.Viewer(title="napari-kits")
    if args.inputs:
        from kitseg.io import InputError, is_dicom_file, is_dicom_seg

        from ._reader import read_kits

        # SEGs last: their series, if named too, is open by then, and a SEG's reading does not open it again.
        for path in sorted(args.inputs, key=lambda p: is_dicom_seg(Path(p))):
            if Path(path).is_file() and is_dicom_file(Path(path)):  # one file of a series, or a SEG (with its series)
                try:
                    layers = read_kits(path)
                except InputError as exc:  # a DICOMDIR, a scout view: said, as napari says a refusal
                    log.error("%s", exc)
                    viewer.close()
                    return 2
                for data, kwargs, kind in layers:
                    getattr(viewer, f"add_{kind}")(data, **kwargs)
            else:
                viewer.open(path, plugin=PLUGIN_NAME)
    else:
        viewer.open_sample(PLUGIN_NAME, "synthetic")
    _, widget = viewer.window.add_plugin_dock_widget(PLUGIN_NAME, WIDGET_NAME)
    if args.weights is not None and not widget.set_weights(args.weights):
        log.error("cannot use %s: %s", args.weights, widget.model_info.text())
    if args.device:
        index = widget.device_combo.findData(args.device.lower())
        if index >= 0:
            widget.device_combo.setCurrentIndex(index)
    outcome = {"code": 0}

    def finish() -> None:
        if args.screenshot is not None:
            from qtpy.QtWidgets import QApplication

            # The whole case and the widget, not napari's small default window (Xvfb has no window manager).
            screen = QApplication.primaryScreen().availableGeometry()
            viewer.window.resize(min(screen.width(), 1600), min(screen.height(), 1050))
            close_notifications()
            QApplication.processEvents()
            viewer.reset_view()
            args.screenshot.parent.mkdir(parents=True, exist_ok=True)
            viewer.screenshot(str(args.screenshot), canvas_only=False)
            log.info("screenshot saved to %s", args.screenshot)
        if args.quit:
            viewer.close()

    def finish_once_scored() -> None:
        """A run's result is scored a moment after the run (debounced, in a worker): the picture
        and the log show the scores, or, if scoring fails or hangs, what there is after a minute."""
        if not widget.scoring_pending:
            finish()
            return
        done = []

        def scored() -> None:
            if done:
                return
            done.append(True)
            if widget.last_scores is not None:
                log.info("scored against %s: kidney Dice %.4f, tumor Dice %.4f", widget.gt_combo.currentText(),
                         widget.last_scores.kidney_dice, widget.last_scores.tumor_dice)
            QTimer.singleShot(300, finish)  # let the table and the plot paint first

        widget.scores_updated.connect(scored)
        QTimer.singleShot(SCORES_WAIT_MS, scored)

    def on_run_finished(task: str, result: str) -> None:
        if result != "done":
            outcome["code"] = 1
            log.error("%s %s %s", task, result, widget.last_error)
        QTimer.singleShot(300, finish_once_scored)  # let the last layer updates paint first

    if args.run_all:
        widget.run_finished.connect(on_run_finished)
        QTimer.singleShot(0, lambda: widget.run_all() or on_run_finished("run all", "error"))
    elif args.screenshot is not None or args.quit:
        QTimer.singleShot(500, finish)
    napari.run()
    return outcome["code"]


if __name__ == "__main__":
    sys.exit(main())
