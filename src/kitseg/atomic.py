"""Atomic file writing: outputs appear whole or not at all, and never half-written.

Every writer of the engine (NIfTI outputs, model files, score tables, training state) goes
through :func:`atomic_path`: the data go to a temporary file in the destination's folder,
are flushed to disk, and ``os.replace`` puts them in place in one step.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
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
    if path.is_dir():  # os.replace would fail after the work, naming the temporary file
        raise IsADirectoryError(errno.EISDIR, "a folder is in the way of the file to write", str(path))
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    except OSError as exc:  # a read-only or full folder: name the file asked for, not the hidden temporary one
        raise OSError(exc.errno, exc.strerror or str(exc), str(path)) from exc
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~_umask())
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        # A failed write() names no file, a failed replace or fsync the temporary one: name the file asked for.
        if isinstance(exc, OSError) and exc.filename in (None, str(tmp)):
            raise OSError(exc.errno, exc.strerror or str(exc), str(path)) from exc
        raise


def require_free_space(folder: str | os.PathLike, needed_bytes: int, what: str) -> None:
    """Fail before a long job starts, not hours into it, when ``folder``'s disk cannot hold ``needed_bytes``.

    ``what`` says what needs the space, for the message. ``folder`` need not exist yet.
    """
    folder = Path(folder).absolute()
    existing = next(p for p in (folder, *folder.parents) if p.exists())
    free = shutil.disk_usage(existing).free
    if needed_bytes > free:
        raise OSError(errno.ENOSPC, f"{what} needs about {needed_bytes / 1e9:.1f} GB and the disk holding it has "
                      f"{free / 1e9:.1f} GB free; free some space or choose a folder on another disk", str(folder))
