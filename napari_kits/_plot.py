"""Dice per slice: a small matplotlib canvas; clicking a point asks the viewer to show that slice."""

from __future__ import annotations

import numpy as np
from qtpy.QtCore import Signal
from qtpy.QtWidgets import QSizePolicy, QVBoxLayout, QWidget

_FOREGROUND = "#d0d3d8"  # readable on napari's dark theme
_BACKGROUND = "#262930"
_COLORS = {"kidney": "#ff4040", "tumor": "#ffd400"}


class DicePlot(QWidget):
    """Per-slice Dice curves (x: CT slice index, y: Dice); ``slice_clicked`` carries the slice."""

    slice_clicked = Signal(int)

    def __init__(self, parent: QWidget | None = None):
        super().__init__(parent)
        from matplotlib.backends.backend_qtagg import FigureCanvasQTAgg
        from matplotlib.figure import Figure

        self.figure = Figure(figsize=(3.2, 1.8), dpi=100, facecolor=_BACKGROUND, layout="constrained")
        self.canvas = FigureCanvasQTAgg(self.figure)
        self.canvas.setSizePolicy(QSizePolicy.Expanding, QSizePolicy.Expanding)
        self.canvas.setMinimumHeight(160)
        self.axes = self.figure.add_subplot(111)
        self._curves: dict[str, np.ndarray] = {}
        self._marker = None
        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.addWidget(self.canvas)
        self.canvas.mpl_connect("button_press_event", self._on_click)
        self._stale = True
        self._style()

    def _request_draw(self) -> None:
        # Only a plot on screen draws; a hidden one draws when shown. A widget that is garbage but
        # not yet collected (one never docked, in a reference cycle) is never shown, and so never
        # starts a draw that the collector, running inside it, would delete its canvas under.
        if self.isVisible():
            self.canvas.draw_idle()
        else:
            self._stale = True

    def showEvent(self, event) -> None:  # noqa: N802 (Qt's name)
        super().showEvent(event)
        if self._stale:
            self._stale = False
            self.canvas.draw_idle()

    def _style(self) -> None:
        ax = self.axes
        ax.set_facecolor(_BACKGROUND)
        for spine in ax.spines.values():
            spine.set_color(_FOREGROUND)
        ax.tick_params(colors=_FOREGROUND, labelsize=7)
        ax.set_xlabel("CT slice", color=_FOREGROUND, fontsize=8)
        ax.set_ylabel("Dice", color=_FOREGROUND, fontsize=8)
        ax.set_ylim(-0.03, 1.03)

    def set_curves(self, curves: dict[str, np.ndarray]) -> None:
        """``curves``: region name -> Dice per slice (NaN where both are empty: not drawn)."""
        self._curves = {k: np.asarray(v, float) for k, v in curves.items()}
        ax = self.axes
        ax.clear()
        self._style()
        for name, values in self._curves.items():
            x = np.flatnonzero(np.isfinite(values))
            ax.plot(x, values[x], ".-", color=_COLORS.get(name), label=name, markersize=3, linewidth=1)
        if self._curves:
            n = max(len(v) for v in self._curves.values())
            ax.set_xlim(-0.5, n - 0.5)
            legend = ax.legend(fontsize=7, loc="lower left", facecolor=_BACKGROUND, edgecolor=_FOREGROUND)
            for text in legend.get_texts():
                text.set_color(_FOREGROUND)
        self._marker = None
        self._request_draw()

    def mark_slice(self, index: int) -> None:
        if self._marker is not None:
            self._marker.remove()
        self._marker = self.axes.axvline(index, color="#00b4ff", linewidth=1, alpha=0.8)
        self._request_draw()

    def nearest_slice(self, x: float, y: float | None = None) -> int | None:
        """The plotted slice nearest to data coordinates (x, y) (nearest in x if y is None)."""
        best, best_d = None, np.inf
        for values in self._curves.values():
            idx = np.flatnonzero(np.isfinite(values))
            if idx.size == 0:
                continue
            d = np.abs(idx - x) + (0 if y is None else 20 * np.abs(values[idx] - y))
            k = int(np.argmin(d))
            if d[k] < best_d:
                best, best_d = int(idx[k]), d[k]
        return best

    def _on_click(self, event) -> None:
        if event.inaxes is not self.axes or event.xdata is None:
            return
        index = self.nearest_slice(event.xdata, event.ydata)
        if index is not None:
            self.slice_clicked.emit(index)
