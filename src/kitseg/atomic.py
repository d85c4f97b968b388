"""Atomic file writing: outputs appear whole or not at all, and never half-written.

Every writer of the engine (NIfTI outputs, model files, score tables, training state) goes
through :func:`atomic_path`: the data go to a temporary file in the destination's folder,
are flushed to disk, and ``os.replace`` puts them in place in one step.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = ".tmp") -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it replaces ``path``.

    ``suffix`` matters to writers that choose a format by name (nibabel compresses ``.gz``).
    The file gets the permissions a plain ``open()`` would give (mkstemp's are owner-only), so
    a team can read what the tool wrote. On any error the temporary file is removed.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~_umask())
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
