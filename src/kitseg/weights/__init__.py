"""The shipped default model (``default.kseg``) and its model card; importable without torch."""

from __future__ import annotations

from pathlib import Path

DEFAULT_WEIGHTS = Path(__file__).parent / "default.kseg"


def default_weights_path() -> Path:
    """The shipped default model; a clear error if this install has none."""
    if not DEFAULT_WEIGHTS.is_file():
        raise FileNotFoundError(
            f"{DEFAULT_WEIGHTS}: the default weights are not installed; pass --weights FILE.kseg "
            "(train one with `kits-seg train`)"
        )
    return DEFAULT_WEIGHTS
