"""Stopping a command on Ctrl-C (SIGINT) or SIGTERM (``kill``, a cluster scheduler's stop).

The first of either is raised as ``KeyboardInterrupt`` where the command is, so every atomic
write in progress removes its temporary file and a training run resumes from its last
checkpoint; a second one acts as the default would (it kills).
Python drops an exception raised while it runs a finalizer ("Exception ignored in ..."), so a
signal that lands there would be lost: the signal is also recorded, and the training loop
checks the record at each step (:func:`raise_if_stop_requested`).
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator


class Terminated(KeyboardInterrupt):
    """SIGTERM, unwound as Ctrl-C is."""


_requested: int | None = None


def _stop_for(signum: int) -> KeyboardInterrupt:
    return Terminated() if signum == signal.SIGTERM else KeyboardInterrupt()


def _stop(signum: int, frame) -> None:
    global _requested
    _requested = signum
    # A handler runs only between Python steps: a process blocked in C (a torchrun rank waiting
    # at a barrier for a peer) would not stop. The next such signal is the default again: it kills.
    signal.signal(signum, signal.SIG_DFL)
    raise _stop_for(signum)


def raise_if_stop_requested() -> None:
    """Raise the stop a signal asked for, if its first raise was swallowed."""
    if _requested is not None:
        raise _stop_for(_requested)


@contextlib.contextmanager
def stop_on_signals() -> Iterator[None]:
    """Within the block, SIGINT and SIGTERM stop the command as described above; the handlers
    before it are restored after it (only the main thread may set them: elsewhere, nothing changes)."""
    global _requested
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    _requested = None
    for s in previous:
        signal.signal(s, _stop)
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, signal.SIG_DFL if handler is None else handler)
        _requested = None
