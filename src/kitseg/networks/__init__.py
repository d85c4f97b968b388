"""Segmentation networks and the registry that builds them by name.

* ``"unet2d"`` -- :class:`UNet2D`, the stage-1 network: ``(N, C_in, H, W) -> (N, classes, H, W)``.
* ``"unetpp2d"`` -- :class:`UNetPlusPlus2D`, the stage-2 network: returns a list of logits maps;
  :func:`predict_logits` ensembles them into one.
* ``"ensemble"`` -- :class:`StageEnsemble`, trained networks of one stage averaged (inference only).
"""

from kitseg.networks.ensemble import StageEnsemble
from kitseg.networks.registry import available_networks, build_network, network_name
from kitseg.networks.unet import UNet2D
from kitseg.networks.unetpp import UNetPlusPlus2D, predict_logits

__all__ = [
    "StageEnsemble",
    "UNet2D",
    "UNetPlusPlus2D",
    "available_networks",
    "build_network",
    "network_name",
    "predict_logits",
]
