"""Benchmark: how long the Qt event loop stalls while the widget runs stage 1, the mask and stage 2.

Usage (from the repository root; needs a display, e.g. Xvfb)::

    PYTHONPATH=src:. xvfb-run -a python benchmarks/bench_gui_responsiveness.py [--weights M.kseg]
        [--shape 100 512 512] [--spacing 3 0.78 0.78] [--batch 8]

A QTimer ticks every 10 ms on the GUI thread; the gap between consecutive ticks beyond those
10 ms is a stall (the viewer could not repaint or take input). The case is a synthetic
KiTS-sized abdomen (100 x 512 x 512 at 3 mm slices -> 60 stage slices); without ``--weights``
a tiny random model is used (the network cost is then small; the GUI-side cost -- layer
refreshes, the mask, the labels -- is what this measures). Goal: no stall > 100 ms while a
run runs. The widget adds a run's output layers when the user clicks, before the worker starts
(napari needs 0.1-0.3 s per new layer): those clicks are reported as their own phases.
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

TICK_MS = 10


class StallMeter:
    """Records the gaps between 10 ms timer ticks on the GUI thread."""

    def __init__(self):
        from qtpy.QtCore import QTimer

        self.gaps: list[float] = []
        self.phase_gaps: dict[str, list[float]] = {}
        self.phase = "idle"
        self._last = time.perf_counter()
        self.timer = QTimer()
        self.timer.setInterval(TICK_MS)
        self.timer.timeout.connect(self._tick)

    def _tick(self):
        now = time.perf_counter()
        gap = (now - self._last) * 1000.0 - TICK_MS
        self._last = now
        self.gaps.append(gap)
        self.phase_gaps.setdefault(self.phase, []).append(gap)

    def start(self):
        self._last = time.perf_counter()
        self.timer.start()


def _summary(gaps: list[float]) -> str:
    a = np.maximum(np.asarray(gaps), 0.0)
    return f"max {a.max():7.1f} ms   p99 {np.percentile(a, 99):6.1f} ms   ticks {a.size}"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weights", type=Path)
    parser.add_argument("--shape", type=int, nargs=3, default=(100, 512, 512))
    parser.add_argument("--spacing", type=float, nargs=3, default=(3.0, 0.78, 0.78))
    parser.add_argument("--batch", type=int, default=8)
    args = parser.parse_args(argv)
    os.environ.setdefault("NAPARI_KITS_SETTINGS", str(Path(tempfile.mkdtemp()) / "settings.ini"))
    warnings.filterwarnings("ignore", message=".*PyQt5 backend is deprecated.*")

    import napari
    from qtpy.QtWidgets import QApplication

    from napari_kits._sample_data import make_sample_data
    from napari_kits._widget import KitsWidget

    weights = args.weights
    if weights is None:
        from kitseg.checkpoint import make_tiny_bundle, save_bundle

        weights = save_bundle(make_tiny_bundle(), Path(tempfile.mkdtemp()) / "tiny.kseg")
    t0 = time.perf_counter()
    layers = make_sample_data(shape=tuple(args.shape), spacing=tuple(args.spacing))
    print(f"case {tuple(args.shape)} at {tuple(args.spacing)} mm generated in {time.perf_counter() - t0:.1f} s")

    viewer = napari.Viewer()
    app = QApplication.instance()
    for data, kwargs, kind in layers:
        getattr(viewer, f"add_{kind}")(data, **kwargs)
    widget = KitsWidget(viewer)
    viewer.window.add_dock_widget(widget)
    widget.set_weights(weights)
    widget.batch_spin.setValue(args.batch)
    ct = viewer.layers[0]
    viewer.dims.set_point(0, ct.translate[0] + ct.data.shape[0] // 2 * ct.scale[0])

    def wait(predicate, timeout=1800):
        end = time.monotonic() + timeout
        while not predicate():
            if time.monotonic() > end:
                raise TimeoutError(widget.last_error)
            app.processEvents()
            time.sleep(0.001)

    finished = []
    widget.run_finished.connect(lambda task, outcome: finished.append((task, outcome)))
    meter = StallMeter()
    meter.start()
    wait(lambda: len(meter.gaps) > 50)  # settle
    meter.phase_gaps.clear()
    meter.gaps.clear()

    timings = {}
    mask_done = lambda: widget._mask_worker is None and not widget._mask_timer.isActive() and time.perf_counter() - t > 0.5  # noqa: E731
    steps = [
        ("stage 1 (+ mask)", widget.run_stage1, lambda: finished and widget._session.mask_layer is not None and mask_done()),
        ("mask update", lambda: widget.threshold_spin.setValue(0.6), mask_done),
        ("stage 2 (+ labels)", widget.run_stage2, lambda: finished),
    ]
    # The first run creates the layers (napari/vispy cost, once); the second reuses them.
    steps += [(f"{name}, again", start, done) for name, start, done in steps]
    steps[4] = ("mask update, again", lambda: widget.threshold_spin.setValue(0.5), mask_done)
    for phase, start, done in steps:
        finished.clear()
        # A run adds its output layers when the user clicks, before its worker starts:
        # that click is its own phase; the run's phase begins when the worker does.
        meter.phase = f"{phase}: click"
        t = time.perf_counter()
        worker = start()
        if worker is not None and hasattr(worker, "started"):
            worker.started.connect(lambda phase=phase: setattr(meter, "phase", phase))
        else:
            meter.phase = phase
        wait(done)
        timings[phase] = time.perf_counter() - t
        if finished and finished[-1][1] != "done":
            raise RuntimeError(f"{phase}: {finished[-1]} {widget.last_error}")
    meter.phase = "after"
    wait(lambda: len(meter.phase_gaps.get("after", [])) > 20)
    meter.timer.stop()

    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, {platform.system()}")
    stage_shape = widget._session.y1.shape
    print(f"stage grid {stage_shape}, labels {widget._session.labels_layer.data.shape}, batch {args.batch}")
    for phase, gaps in meter.phase_gaps.items():
        took = f"{timings[phase]:6.1f} s" if phase in timings else " " * 8
        print(f"{phase:27s} {took}   {_summary(gaps)}")
    running = [g for p, gs in meter.phase_gaps.items() if not p.endswith("click") for g in gs]
    print(f"{'while running (goal <= 100 ms)':27s} {'':8s} {_summary(running)}")
    everything = [g for gs in meter.phase_gaps.values() for g in gs]
    print(f"{'all, clicks included':27s} {'':8s} {_summary(everything)}")
    viewer.close()


if __name__ == "__main__":
    main()
