"""Make sure napari knows the plugin when it runs from a source checkout (not pip-installed)."""

from __future__ import annotations

from pathlib import Path

MANIFEST = Path(__file__).with_name("napari.yaml")
PLUGIN_NAME = "napari-kits"
WIDGET_NAME = "KiTS segmentation"


def ensure_registered() -> None:
    """Register ``napari.yaml`` with npe2 unless the entry point already did."""
    import npe2

    pm = npe2.PluginManager.instance()
    if PLUGIN_NAME not in pm._manifests:  # no public "is registered" query
        pm.register(npe2.PluginManifest.from_file(MANIFEST))
