"""Several trained networks of one stage, used as one: the mean of their class probabilities.

For inference only (nothing trains an ensemble). A checkpoint stores it like any network: the
architecture ``"ensemble"``, kwargs listing each member's architecture and kwargs (and, when
the members do not count the same, their ``mix``), and the members' weights under
``members.<i>.``.
"""

from __future__ import annotations

import copy
import math
import numbers
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from kitseg.networks.unetpp import predict_logits

# Probabilities are clamped before the log so that softmax(log p) stays finite; 1e-12 is far
# below the 8-bit resolution (1/255) at which probabilities are saved.
_MIN_PROBABILITY = 1e-12


class StageEnsemble(nn.Module):
    """Average the softmax outputs of ``members``; return them as logits (their log).

    ``softmax`` of the returned tensor is exactly the (weighted) mean probability, so callers
    treat an ensemble like one network. Each member's own output is first reduced by
    :func:`predict_logits` (a UNet++ ensembles its deep-supervision heads).

    Args:
        members: at least two ``{"architecture": name, "kwargs": {...}}`` of registered,
            non-ensemble networks with the same input channels and classes.
        mix: how much each member counts, one number >= 0 per member (normalised to sum 1);
            None counts them all the same. Stored in the checkpoint only when given, so files
            with equal members keep their kwargs.
    """

    def __init__(self, members: list[dict[str, Any]], mix: list[float] | None = None):
        super().__init__()
        from kitseg.networks.registry import build_network  # the registry imports this module

        if not isinstance(members, list) or len(members) < 2:
            raise ValueError(f"an ensemble needs a list of at least 2 members, got {members!r}")
        for i, member in enumerate(members):
            if not isinstance(member, dict) or set(member) != {"architecture", "kwargs"}:
                raise ValueError(f"member {i} must be {{'architecture': ..., 'kwargs': {{...}}}}, got {member!r}")
            if member["architecture"] == "ensemble":
                raise ValueError(f"member {i}: an ensemble cannot hold another ensemble")
        self.members = nn.ModuleList(build_network(m["architecture"], **m["kwargs"]) for m in members)
        shapes = {(m.in_channels, m.num_classes) for m in self.members}
        if len(shapes) != 1:
            raise ValueError(f"members differ in (in_channels, num_classes): {sorted(shapes)}")
        (self.in_channels, self.num_classes), = shapes
        self.mix = normalised_mix(mix, len(members))
        self._init_kwargs: dict[str, Any] = {"members": copy.deepcopy(members)}
        if mix is not None:
            self._init_kwargs["mix"] = [float(v) for v in mix]

    @property
    def init_kwargs(self) -> dict[str, Any]:
        """The constructor kwargs (a copy), as checkpoints store them."""
        return copy.deepcopy(self._init_kwargs)

    def set_inference_level(self, level: int | None) -> None:
        """UNet++ pruned inference, passed on to every member that supports it."""
        for member in self.members:
            if not hasattr(member, "set_inference_level"):
                raise ValueError(f"pruned inference needs UNet++ members; {type(member).__name__} is not one")
            member.set_inference_level(level)

    def forward(self, x: Tensor) -> Tensor:
        probs = sum(share * torch.softmax(predict_logits(m(x)).float(), dim=1)
                    for share, m in zip(self.mix, self.members) if share > 0)
        return torch.log(probs.clamp_min(_MIN_PROBABILITY))


def normalised_mix(mix: Any, n_members: int) -> list[float]:
    """Each member's share of the mean, summing to 1; None gives equal shares.

    Checked with a clear ValueError, since checkpoints may come from strangers: one number >= 0
    per member, finite, not all zero. Divided by the largest first, so even huge finite numbers
    make finite shares.
    """
    if mix is None:
        return [1.0 / n_members] * n_members
    if not isinstance(mix, (list, tuple)) or len(mix) != n_members:
        raise ValueError(f"mix must give one number per member ({n_members}), got {mix!r}")
    problem = f"mix must hold finite numbers >= 0, got {mix!r}"
    if not all(isinstance(v, numbers.Real) and not isinstance(v, (bool, np.bool_)) for v in mix):
        raise ValueError(problem)
    try:
        values = [float(v) for v in mix]
    except OverflowError:  # an integer too large for a float
        raise ValueError(problem) from None
    if not all(math.isfinite(v) and v >= 0 for v in values):
        raise ValueError(problem)
    largest = max(values)
    if largest <= 0:
        raise ValueError(f"mix must not be all zeros, got {mix!r}")
    scaled = [v / largest for v in values]
    return [v / sum(scaled) for v in scaled]
