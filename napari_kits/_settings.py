"""Persistent user choices (weights file, device, mask threshold and radius, label clean-up).

Stored with ``QSettings("napari-kits", "napari-kits")``; ``NAPARI_KITS_SETTINGS`` names an
``.ini`` file to use instead (tests point it into a temporary folder so they never read or
write the user's settings).
"""

from __future__ import annotations

import os

from qtpy.QtCore import QSettings

ENV_VAR = "NAPARI_KITS_SETTINGS"

WEIGHTS = "model/weights"
DEVICE = "model/device"
BATCH_SIZE = "model/batch_size"
THRESHOLD = "mask/threshold"
RADIUS = "mask/radius"
RADIUS_UNIT = "mask/radius_unit"  # a radius is kept with its unit: voxels or mm, as the model it was set for
CLEANUP = "labels/cleanup"


def kits_settings() -> QSettings:
    path = os.environ.get(ENV_VAR)
    if path:
        return QSettings(path, QSettings.IniFormat)
    return QSettings("napari-kits", "napari-kits")


def read_float(settings: QSettings, key: str, default: float | None) -> float | None:
    value = settings.value(key, None)
    try:
        return float(value) if value is not None else default
    except (TypeError, ValueError):
        return default


def read_bool(settings: QSettings, key: str, default: bool) -> bool:
    value = settings.value(key, None)
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "false"):  # .ini files store text
        return value.lower() == "true"
    return default
