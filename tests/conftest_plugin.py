"""Fixtures of the napari-kits plugin tests; test modules import them by name.

(Kept out of ``tests/conftest.py``, which the engine's tests own.)
"""

from __future__ import annotations

import pytest

#: Small enough for two CPU cores, odd sizes, KiTS-like 2.5 mm slices (-> 12 stage slices).
SMALL_SHAPE = (24, 64, 72)
SMALL_SPACING = (2.5, 1.5, 1.5)


@pytest.fixture(autouse=True)
def isolated_settings(tmp_path, monkeypatch):
    """Never read or write the user's QSettings."""
    from napari_kits._settings import ENV_VAR

    path = tmp_path / "napari-kits-settings.ini"
    monkeypatch.setenv(ENV_VAR, str(path))
    return path


@pytest.fixture(scope="session")
def small_case():
    from kitseg.phantom import make_synthetic_case

    return make_synthetic_case(shape=SMALL_SHAPE, spacing=SMALL_SPACING, seed=1)


@pytest.fixture(scope="session")
def case_folder(tmp_path_factory, small_case):
    """A KiTS19 case folder ``case_00007`` with imaging and segmentation."""
    return small_case.save_case_folder(tmp_path_factory.mktemp("kits") / "case_00007")


@pytest.fixture(scope="session")
def tiny_kseg(tmp_path_factory):
    from kitseg.checkpoint import make_tiny_bundle, save_bundle

    return save_bundle(make_tiny_bundle(seed=0), tmp_path_factory.mktemp("models") / "tiny.kseg")
