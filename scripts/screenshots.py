"""Screenshots of the napari-kits workflow on the sample case, one PNG per step.

Usage (from the repository root; needs a display, e.g. Xvfb)::

    PYTHONPATH=src:. xvfb-run -a python scripts/screenshots.py [--weights M.kseg] [--out docs/screenshots]

Without ``--weights`` it uses the shipped default weights, or -- while none ship -- a tiny
random model (the pictures then show the workflow, not a meaningful segmentation; the
status line says so).
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
KIDNEY_SLICE_FRACTION = 0.55  # the phantom's kidneys sit around mid-volume
_LAST_ERROR = lambda: ""  # noqa: E731 (set once the widget exists)


def _wait(app, predicate, timeout: float = 120.0) -> None:
    end = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > end:
            raise TimeoutError(f"the step did not finish in time: {_LAST_ERROR()}")
        app.processEvents()
        time.sleep(0.01)
    for _ in range(20):  # let the canvas repaint
        app.processEvents()
        time.sleep(0.01)


def _weights(path: Path | None) -> tuple[Path, bool]:
    if path is not None:
        return path, False
    try:
        from kitseg.weights import default_weights_path

        return default_weights_path(), False
    except FileNotFoundError:
        from kitseg.checkpoint import make_tiny_bundle, save_bundle

        tiny = Path(tempfile.mkdtemp()) / "tiny-random.kseg"
        return save_bundle(make_tiny_bundle(seed=0), tiny), True


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weights", type=Path)
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "screenshots")
    parser.add_argument("--size", type=int, nargs=2, default=(1600, 1050), metavar=("W", "H"))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO)

    import os

    os.environ.setdefault("NAPARI_KITS_SETTINGS", str(Path(tempfile.mkdtemp()) / "settings.ini"))
    import warnings

    # A deprecation toast would sit over the canvas in every picture.
    warnings.filterwarnings("ignore", message=".*PyQt5 backend is deprecated.*")
    import napari
    from qtpy.QtWidgets import QApplication

    from napari_kits._registration import PLUGIN_NAME, WIDGET_NAME, ensure_registered
    from napari_kits.launch import close_notifications

    args.out.mkdir(parents=True, exist_ok=True)
    ensure_registered()
    viewer = napari.Viewer(title="napari-kits")
    app = QApplication.instance()
    viewer.window._qt_window.resize(*args.size)
    viewer.open_sample(PLUGIN_NAME, "synthetic")
    _, widget = viewer.window.add_plugin_dock_widget(PLUGIN_NAME, WIDGET_NAME)
    global _LAST_ERROR
    _LAST_ERROR = lambda: widget.last_error  # noqa: E731
    weights, random_model = _weights(args.weights)
    widget.set_weights(weights)
    ct = viewer.layers[0]
    viewer.dims.set_point(0, ct.translate[0] + round(KIDNEY_SLICE_FRACTION * ct.data.shape[0]) * ct.scale[0])
    viewer.reset_view()
    scroll = widget.findChild(type(widget.layout().itemAt(0).widget()))

    def shot(name: str, caption: str = "") -> None:
        # The widget's own status line shows, as a user sees it; the caption goes to the log (and docs).
        if caption:
            logging.info("%s: %s", name, caption)
        close_notifications()
        _wait(app, lambda: True)
        path = args.out / f"{name}.png"
        viewer.screenshot(str(path), canvas_only=False)
        logging.info("wrote %s", path)

    note = " (tiny random model: the segmentation is meaningless)" if random_model else ""
    shot("01_open", "Sample CT opened: abdominal window W400/L40, ground truth overlaid.")

    finished = []
    widget.run_finished.connect(lambda task, outcome: finished.append((task, outcome)))
    viewer.layers[1].visible = False  # the ground truth comes back for scoring
    widget.run_stage1()
    _wait(app, lambda: finished)
    shot("02_stage1", f"Stage 1 done: y1 = P(kidney or tumor) on 5 mm slices{note}.")

    _wait(app, lambda: widget._session.mask_layer is not None and widget._mask_worker is None)
    widget._session.y1_layer.visible = True
    shot("03_mask", "Mask = (y1 >= threshold) dilated by the radius; paint/erase it to steer stage 2.")

    finished.clear()
    widget.run_stage2()
    _wait(app, lambda: finished)
    shot("04_stage2", f"Stage 2 done: kidney (red) and tumor (yellow) on the CT grid, ready to edit{note}.")

    viewer.layers[1].visible = True
    viewer.layers[1].contour = 1
    done = []
    widget.scores_updated.connect(lambda: done.append(1))
    widget.compute_scores()
    _wait(app, lambda: done)
    widget.go_to_worst_slice()
    if scroll is not None:
        scroll.ensureWidgetVisible(widget.plot)
    shot("05_score", "Scores vs the ground truth (outlined); the viewer jumped to the worst slice.")

    viewer.close()


if __name__ == "__main__":
    main()
