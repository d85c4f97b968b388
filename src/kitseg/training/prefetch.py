"""The batches of a training run, drawn in step order, optionally ahead of time in a thread.

Each step's batch comes from its own generator, ``default_rng([seed, rank, step])``: the
sampler draws the arrays from it, and the step then draws its augmentation from the same
generator where the sampler left it. So a batch drawn ahead in a thread is the batch drawn in
line, and a resumed run repeats the same sequence either way.

On a GPU, drawing a batch (numpy crops on one CPU thread) took longer than the `paper` preset's
step itself (README, "Measured on a GPU"); drawn in a thread, it overlaps with the GPU's work.
Numpy's copies let go of the interpreter lock, and the training thread mostly waits for the
GPU, so a thread suffices: no worker processes, no copies of the cases.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator

import numpy as np
import torch

DrawBatch = Callable[[int, np.random.Generator], tuple[np.ndarray, ...]]  # (batch size, generator)


def step_generator(seed: int, rank: int, step: int) -> np.random.Generator:
    """The generator of one (rank, step): what makes a resumed run repeat the same batches."""
    return np.random.default_rng([seed, rank, step])


def _draw(draw: DrawBatch, seed: int, rank: int, step: int, batch: int, pin: bool):
    rng = step_generator(seed, rank, step)
    arrays = tuple(torch.from_numpy(np.ascontiguousarray(a)) for a in draw(batch, rng))
    if pin:  # page-locked: the copy to the GPU can then run beside the GPU's work
        arrays = tuple(a.pin_memory() for a in arrays)
    return arrays, rng


def in_line(draw: DrawBatch, seed: int, rank: int, first: int, stop: int, batch: int) -> Iterator[tuple]:
    """Steps ``first`` .. ``stop - 1``: (tensors on the CPU, that step's generator), drawn on demand."""
    for step in range(first, stop):
        yield _draw(draw, seed, rank, step, batch, pin=False)


class Prefetcher:
    """The same sequence as ``in_line``, drawn ``depth`` steps ahead by a background thread.

    Use as a context manager: leaving it (a finished run, an error, Ctrl-C) stops the thread.
    An error raised while drawing is raised again where that step's batch is taken.
    """

    def __init__(self, draw: DrawBatch, seed: int, rank: int, first: int, stop: int, batch: int,
                 depth: int = 2, pin: bool = False):
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stopped = threading.Event()
        self._remaining = stop - first
        self._thread = threading.Thread(target=self._work, args=(draw, seed, rank, first, stop, batch, pin),
                                        name="kitseg-batches", daemon=True)
        self._thread.start()

    def _work(self, draw, seed, rank, first, stop, batch, pin) -> None:
        for step in range(first, stop):
            try:
                item = ("batch", _draw(draw, seed, rank, step, batch, pin))
            except BaseException as error:  # noqa: BLE001 - handed to the training thread, raised there
                item = ("error", error)
            while not self._stopped.is_set():
                try:
                    self._queue.put(item, timeout=0.1)
                    break
                except queue.Full:
                    continue
            if self._stopped.is_set() or item[0] == "error":
                return

    def __iter__(self) -> Iterator[tuple]:
        return self

    def __next__(self) -> tuple:
        if self._remaining <= 0:
            raise StopIteration
        kind, value = self._queue.get()
        if kind == "error":
            self._remaining = 0
            raise value
        self._remaining -= 1
        return value

    def close(self) -> None:
        self._stopped.set()
        self._thread.join()

    def __enter__(self) -> "Prefetcher":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
