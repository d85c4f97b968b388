"""The widget's work as plain generators: no Qt, no napari, runnable (and tested) headless.

Each generator yields the engine's :class:`kitseg.pipeline.Progress` after every batch and a
few typed events when there is something new to show (a model loaded, the y1 array allocated,
the mask, the final labels). The widget runs them in napari thread workers; ``worker.quit()``
stops one at its next yield and the arrays keep the batches already finished.

Arrays follow the engine: the CT (Z, Y, X) in the internal orientation; ``y1``, the mask and
the probabilities on the stage grid (Zs, Ys, Xs).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np


@dataclass(frozen=True)
class ModelSpec:
    """Which model to run: a ``.kseg`` file on a device. Equal specs share one loaded Segmenter."""

    path: Path
    device: str = "auto"

    @property
    def key(self) -> tuple:
        path = Path(self.path)
        mtime = path.stat().st_mtime_ns if path.exists() else None
        return (str(path.resolve()), mtime, self.device)


@dataclass(frozen=True)
class ModelReady:
    segmenter: Any  # kitseg.pipeline.Segmenter
    key: tuple


@dataclass(frozen=True)
class Stage1Started:
    """The CT is on the stage grid; ``y1`` (zeros, filled in place from now on) can be shown."""

    prepared: Any  # kitseg.preprocess.PreparedVolume (its ``warning``, if any, goes on the status line)
    y1: np.ndarray


@dataclass(frozen=True)
class MaskReady:
    mask: np.ndarray  # uint8 (Zs, Ys, Xs), 1 inside the stage-2 region of interest
    threshold: float
    radius: float


@dataclass(frozen=True)
class Stage2Done:
    labels: np.ndarray  # uint8 on the CT's internal grid (Z, Y, X)
    probabilities: dict[str, np.ndarray] | None  # class name -> float32 (Zs, Ys, Xs), if asked


class TaskFailed(Exception):
    """A run failed; carries the original error (see :func:`reporting_failures`)."""


def reporting_failures(generator: Callable[..., Iterator[Any]], *args: Any, **kwargs: Any) -> Iterator[Any]:
    """Run ``generator``, re-raising a RuntimeError as :class:`TaskFailed`.

    superqt's generator workers take a RuntimeError for "the worker was deleted" and drop it:
    no ``errored``, no ``finished``, and the widget would wait forever. torch reports most
    failures (out of memory, wrong shapes) as RuntimeError.
    """
    try:
        return (yield from generator(*args, **kwargs))
    except RuntimeError as error:
        raise TaskFailed(str(error) or type(error).__name__) from error


def load_segmenter(spec: ModelSpec, batch_size: int = 8):
    import os

    import torch

    from kitseg.pipeline import Segmenter

    # Leave one core to the GUI thread: with every core busy in torch's CPU kernels the Qt
    # event loop stalls for 100+ ms at a time (benchmarks/bench_gui_responsiveness.py).
    cores = os.cpu_count() or 1
    if cores > 1 and torch.get_num_threads() >= cores:
        torch.set_num_threads(cores - 1)
    return Segmenter.from_file(spec.path, device=spec.device, batch_size=batch_size)


def _model(model: Any, batch_size: int) -> Iterator[Any]:
    """Yield ModelReady if ``model`` is a spec that had to be loaded; return the Segmenter."""
    if isinstance(model, ModelSpec):
        segmenter = load_segmenter(model, batch_size)
        yield ModelReady(segmenter, model.key)
    else:
        segmenter = model
        segmenter.batch_size = batch_size
    return segmenter


def make_mask(y1: np.ndarray, threshold: float, radius: float, spacing=None) -> MaskReady:
    """The engine's dilated-threshold mask, as the uint8 a napari labels layer paints on."""
    from kitseg.pipeline import make_mask as engine_make_mask

    mask = engine_make_mask(y1, threshold, radius, spacing)
    return MaskReady(mask.astype(np.uint8), threshold, radius)


def mask_spacing(segmenter: Any, prepared: Any):
    """Radius unit of the model: mm (pass the stage spacing) or stage voxels (None)."""
    return segmenter.bundle.mask.dilation_spacing(prepared.grid.spacing)


def iter_stage1(
    model: Any, volume: Any, prepared: Any = None, batch_size: int = 8, y1: np.ndarray | None = None
) -> Iterator[Any]:
    """Load (if needed), prepare (if needed) and run stage 1, filling ``y1`` (zeros; the layer's data) in place.

    Without ``y1``, or if it does not match the model's stage grid, a fresh array is filled.
    """
    from kitseg.pipeline import Progress

    segmenter = yield from _model(model, batch_size)
    if prepared is None or prepared.config != segmenter.preprocessing:
        prepared = segmenter.prepare(volume)
    yield Progress("prepare", 1, 1)
    if y1 is None or y1.shape != prepared.image.shape or y1.dtype != np.float32:
        y1 = np.zeros(prepared.image.shape, np.float32)
    yield Stage1Started(prepared, y1)
    yield from segmenter.iter_stage1(prepared, y1)
    return y1


def iter_stage2(
    model: Any,
    prepared: Any,
    y1: np.ndarray,
    mask: np.ndarray,
    with_probabilities: bool = False,
    batch_size: int = 8,
    cleanup: bool = True,
) -> Iterator[Any]:
    """Stage 2 inside ``mask`` (the layer's current, possibly edited data), then labels on the CT grid.

    ``cleanup`` removes stray pieces from the labels (kitseg.postprocess, the CLI's default).
    """
    from kitseg.pipeline import PROB_DTYPE
    from kitseg.postprocess import CleanupRules

    segmenter = yield from _model(model, batch_size)
    probs = np.empty((3,) + prepared.image.shape, PROB_DTYPE)
    yield from segmenter.iter_stage2(prepared, y1, np.asarray(mask) > 0, probs)
    labels = np.zeros(prepared.volume.shape, np.uint8)
    yield from segmenter.iter_labels_on_source(prepared, probs, labels, CleanupRules() if cleanup else None)
    probabilities = None
    if with_probabilities:
        names = segmenter.bundle.label_map.names
        probabilities = {names[c]: probs[c].astype(np.float32) for c in range(1, probs.shape[0])}
    done = Stage2Done(labels, probabilities)
    yield done
    return done


def iter_run_all(
    model: Any,
    volume: Any,
    threshold: float,
    radius: float,
    prepared: Any = None,
    with_probabilities: bool = False,
    batch_size: int = 8,
    y1: np.ndarray | None = None,
    cleanup: bool = True,
) -> Iterator[Any]:
    """Stage 1, the mask and stage 2 in one go (what the CLI's ``segment`` does), with events."""
    from kitseg.pipeline import Progress

    segmenter = yield from _model(model, batch_size)
    for event in iter_stage1(segmenter, volume, prepared, batch_size, y1):
        if isinstance(event, Stage1Started):
            prepared, y1 = event.prepared, event.y1
        yield event
    ready = make_mask(y1, threshold, radius, mask_spacing(segmenter, prepared))
    yield ready
    yield Progress("mask", 1, 1)
    return (yield from iter_stage2(segmenter, prepared, y1, ready.mask, with_probabilities, batch_size, cleanup))
