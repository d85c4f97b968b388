"""Packaging: setup.cfg lists every package (the layout needs an explicit list), data ship."""

from __future__ import annotations

import configparser

from .conftest import REPO


def _listed_packages() -> set[str]:
    config = configparser.ConfigParser()
    config.read(REPO / "setup.cfg")
    return {line.strip() for line in config["options"]["packages"].splitlines() if line.strip()}


def test_every_package_is_listed_in_setup_cfg():
    found = set()
    for root, prefix in ((REPO / "src" / "kitseg", "kitseg"), (REPO / "napari_kits", "napari_kits")):
        for init in root.rglob("__init__.py"):
            parts = init.parent.relative_to(root).parts
            found.add(".".join((prefix, *parts)))
    assert found == _listed_packages()


def test_shipped_model_and_its_card_are_package_data():
    config = configparser.ConfigParser()
    config.read(REPO / "setup.cfg")
    data = config["options.package_data"]["kitseg"]
    assert "weights/*.kseg" in data and "weights/*.md" in data
    weights = REPO / "src" / "kitseg" / "weights"
    assert (weights / "default.kseg").stat().st_size < 20_000_000  # "small enough to ship" (aim under 20 MB)
    assert "CC BY-NC-SA 4.0" in (weights / "MODEL_CARD.md").read_text()


def test_the_weights_licence_ships_and_the_metadata_says_both_licences():
    """The code is BSD-3-Clause, the weights CC BY-NC-SA 4.0 (derived from KiTS19): both said where
    a package index or a user's pip reads them, the weights' text beside them."""
    config = configparser.ConfigParser()
    config.read(REPO / "setup.cfg")
    assert config["metadata"]["license"] == "BSD-3-Clause AND CC-BY-NC-SA-4.0"
    files = config["metadata"]["license_files"].split()
    assert files == ["LICENSE", "src/kitseg/weights/WEIGHTS_LICENSE.md"] and all((REPO / f).is_file() for f in files)
    text = (REPO / "src" / "kitseg" / "weights" / "WEIGHTS_LICENSE.md").read_text()
    assert "CC BY-NC-SA 4.0" in text and "KiTS19" in text and "Heller" in text  # installed with weights/*.md
