"""The explicit table of network architectures a checkpoint may name.

A checkpoint stores an architecture name and its constructor kwargs; :func:`build_network`
turns them back into a module. The table is a constant, not a decorator-filled global, so
what can be built is visible in one place.
"""

from __future__ import annotations

import inspect
from typing import Any

from torch import nn

from kitseg.networks.ensemble import StageEnsemble
from kitseg.networks.unet import UNet2D
from kitseg.networks.unetpp import UNetPlusPlus2D

_NETWORKS: dict[str, type[nn.Module]] = {
    "unet2d": UNet2D,
    "unetpp2d": UNetPlusPlus2D,
    "ensemble": StageEnsemble,  # inference only: the mean probability of trained networks
}


def available_networks() -> list[str]:
    """The architecture names :func:`build_network` accepts, sorted."""
    return sorted(_NETWORKS)


def build_network(name: str, **kwargs: Any) -> nn.Module:
    """Build the network registered as ``name`` with constructor ``kwargs``.

    Raises:
        ValueError: unknown ``name`` (the message lists the valid names), or kwargs the network
            does not take, lacks or rejects (the message names the network).
    """
    try:
        cls = _NETWORKS[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown network {name!r}; available: {', '.join(available_networks())}") from None
    try:
        inspect.signature(cls).bind(**kwargs)
    except TypeError as error:
        raise ValueError(f"network {name!r}: invalid arguments: {error}") from None
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as error:
        raise ValueError(f"network {name!r}: {error}") from error


def network_name(module: nn.Module) -> str:
    """The registry name of ``module``'s class (exact type match), for writing checkpoints."""
    for name, cls in _NETWORKS.items():
        if type(module) is cls:
            return name
    raise ValueError(
        f"{type(module).__name__} is not a registered network; available: {', '.join(available_networks())}"
    )
