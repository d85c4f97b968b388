"""Training the two stages (``kits-seg train``): presets, data on the stage grid, the loop."""

from .config import PRESETS, TrainConfig, preset

__all__ = ["PRESETS", "TrainConfig", "preset"]
