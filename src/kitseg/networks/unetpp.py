"""2D UNet++ (Zhou et al., "UNet++: A Nested U-Net Architecture", DLMIA 2018), the stage-2 network.

Node ``X^{i,j}`` sits at resolution level ``i`` (``1 / 2**i`` of the input) and column ``j``:

* ``X^{i,0}`` is the encoder: a conv block on the pooled ``X^{i-1,0}`` (on the input for ``i = 0``);
* ``X^{i,j}`` for ``j >= 1`` is a conv block on ``concat(X^{i,0}, ..., X^{i,j-1}, up(X^{i+1,j-1}))``
  -- the dense skip connections.

A 1x1 head on each of ``X^{0,1} .. X^{0,depth}`` gives one logits map per sub-network. Because
``X^{0,k}`` depends only on the nodes with ``i + j <= k``, the sub-network of depth ``k`` can be
run alone ("pruned" inference, the paper's speed option) and yields exactly head ``k`` of the
full network.

Tensors are ``(N, C, H, W)``. Any ``H, W`` works: the input is zero-padded for the full ``depth``
(also when pruned, so a pruned head equals the full network's head) and the logits are cropped back.
"""

from __future__ import annotations

import logging
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kitseg.networks.unet import ConvBlock, check_input, crop_to, pad_for_depth, validate_common_kwargs

logger = logging.getLogger(__name__)


def _node(i: int, j: int) -> str:
    return f"x{i}_{j}"


class UNetPlusPlus2D(nn.Module):
    """Nested U-Net with dense skip connections and (optional) deep supervision.

    Args:
        in_channels: input channels (stage 2: 3, ``mask * concat(y1*I, I, (1-y1)*I)``).
        num_classes: output channels (stage 2: 3, background / kidney / tumor).
        base_channels: feature maps at full resolution; level ``i`` has ``base_channels * 2**i``.
        depth: number of 2x downsamplings, i.e. the deepest sub-network's depth.
        deep_supervision: one head per sub-network ``X^{0,1} .. X^{0,depth}`` (all trained); without
            it there is a single head on ``X^{0,depth}``.
        norm: ``"instance"``, ``"batch"`` or ``"group"``.
        dropout: channel dropout probability inside every convolution block.

    Forward always returns a **list** of logits tensors, each ``(N, num_classes, H, W)``:

    * with deep supervision: the ``depth`` heads, shallow (``X^{0,1}``) to deep (``X^{0,depth}``);
    * without: ``[logits of X^{0,depth}]``;
    * pruned (``level=k`` or :meth:`set_inference_level`): ``[logits of X^{0,k}]``, computing only
      the sub-network of depth ``k``.

    Use :func:`predict_logits` to turn the list into one logits map.
    """

    def __init__(
        self,
        in_channels: int = 3,
        num_classes: int = 3,
        base_channels: int = 32,
        depth: int = 4,
        deep_supervision: bool = True,
        norm: str = "instance",
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        validate_common_kwargs(in_channels, num_classes, base_channels, depth, norm, dropout)
        if not isinstance(deep_supervision, bool):
            raise ValueError(f"deep_supervision must be a bool, got {deep_supervision!r}")
        self._init_kwargs: dict[str, Any] = {
            "in_channels": in_channels,
            "num_classes": num_classes,
            "base_channels": base_channels,
            "depth": depth,
            "deep_supervision": deep_supervision,
            "norm": norm,
            "dropout": float(dropout),
        }
        self.in_channels = in_channels
        self.num_classes = num_classes
        self.depth = depth
        self.deep_supervision = deep_supervision
        # Run-time choice, not a hyperparameter: not part of init_kwargs nor of checkpoints.
        self.inference_level: int | None = None

        channels = [base_channels * 2**i for i in range(depth + 1)]
        self.encoder = nn.ModuleList(
            [ConvBlock(in_channels, channels[0], norm, dropout)]
            + [ConvBlock(channels[i - 1], channels[i], norm, dropout) for i in range(1, depth + 1)]
        )
        # Each nested node has its own upsampling of the node below it (as in the paper's code).
        self.up = nn.ModuleDict()
        self.nodes = nn.ModuleDict()
        for j in range(1, depth + 1):
            for i in range(depth + 1 - j):
                self.up[_node(i, j)] = nn.ConvTranspose2d(channels[i + 1], channels[i], 2, stride=2)
                self.nodes[_node(i, j)] = ConvBlock((j + 1) * channels[i], channels[i], norm, dropout)
        # Without deep supervision only the deepest head exists: shallower heads would never be trained.
        n_heads = depth if deep_supervision else 1
        self.heads = nn.ModuleList([nn.Conv2d(channels[0], num_classes, 1) for _ in range(n_heads)])

    @property
    def init_kwargs(self) -> dict[str, Any]:
        """The constructor arguments (JSON-able), stored in checkpoints to rebuild the network."""
        return dict(self._init_kwargs)

    def _check_level(self, level: int | None) -> None:
        if level is None:
            return
        if isinstance(level, bool) or not isinstance(level, int) or not 1 <= level <= self.depth:
            raise ValueError(f"inference level must be an integer in 1..{self.depth} or None, got {level!r}")
        if not self.deep_supervision and level != self.depth:
            raise ValueError(
                f"pruned inference at level {level} needs a network trained with deep_supervision=True; "
                f"this one only has the head of level {self.depth}"
            )

    def set_inference_level(self, level: int | None) -> None:
        """Prune forward to the sub-network of depth ``level`` (1..depth); ``None`` runs them all."""
        self._check_level(level)
        self.inference_level = level

    def _head(self, j: int) -> nn.Module:
        return self.heads[j - 1] if self.deep_supervision else self.heads[0]

    def forward(self, x: Tensor, level: int | None = None) -> list[Tensor]:
        """``(N, in_channels, H, W)`` -> list of logits ``(N, num_classes, H, W)`` (see the class doc).

        ``level`` overrides :attr:`inference_level` for this call.
        """
        check_input(x, self.in_channels, type(self).__name__)
        level = self.inference_level if level is None else level
        self._check_level(level)
        top = self.depth if level is None else level

        x, size = pad_for_depth(x, self.depth)
        # grid[i][j] = X^{i,j}; only nodes with i + j <= top are computed.
        grid: list[list[Tensor]] = []
        for i in range(top + 1):
            grid.append([self.encoder[i](F.max_pool2d(grid[i - 1][0], 2) if i > 0 else x)])
        for j in range(1, top + 1):
            for i in range(top + 1 - j):
                name = _node(i, j)
                below = self.up[name](grid[i + 1][j - 1])
                grid[i].append(self.nodes[name](torch.cat([*grid[i][:j], below], dim=1)))

        if level is not None:
            columns: Sequence[int] = [level]
        elif self.deep_supervision:
            columns = range(1, self.depth + 1)
        else:
            columns = [self.depth]
        return [crop_to(self._head(j)(grid[0][j]), size) for j in columns]


def predict_logits(model_output: list[Tensor] | Tensor) -> Tensor:
    """One logits map ``(N, C, H, W)`` from a UNet++ output list (each ``(N, C, H, W)``).

    The heads are ensembled by averaging their **logits**. ``softmax`` of the mean logits is the
    normalized geometric mean of the heads' probabilities; the UNet++ paper averages the
    probabilities themselves. We average logits so the result is still a logits tensor (callers
    apply softmax/argmax exactly as for a single network, and a 1-element list -- no deep
    supervision, or pruned inference -- is returned unchanged). Both ensembles agree wherever
    the heads agree; the geometric mean leans towards the more confident heads.

    A bare tensor (e.g. a :class:`UNet2D` output) is returned as is.
    """
    if isinstance(model_output, Tensor):
        return model_output
    if len(model_output) == 0:
        raise ValueError("predict_logits: the model output list is empty")
    if len(model_output) == 1:
        return model_output[0]
    return torch.stack(list(model_output), dim=0).mean(dim=0)



def widened_state_dict(narrow: UNetPlusPlus2D, wide: UNetPlusPlus2D) -> dict[str, Tensor]:
    """``wide``'s state dict set to compute exactly what ``narrow`` computes (a Net2Net-style start).

    The networks differ only in ``base_channels``. Every channel of ``narrow`` keeps its weights
    in ``wide``; each added channel keeps ``wide``'s random weights from its inputs and gets zero
    weights into the channels that were there before (and into the heads): the output is unchanged
    at first, and training grows the added channels from there. The dense skip connections
    concatenate several maps, so a node's kept input channels are found map by map. Batch and
    instance norm act per channel and keep the function; group norm mixes channels and is refused.
    """
    same = {k: v for k, v in narrow.init_kwargs.items() if k != "base_channels"}
    if {k: v for k, v in wide.init_kwargs.items() if k != "base_channels"} != same:
        raise ValueError(f"widening changes base_channels only: {narrow.init_kwargs} -> {wide.init_kwargs}")
    if same["norm"] == "group":
        raise ValueError("group norm mixes channels: a network with it cannot be widened exactly")
    old_base, new_base = narrow.init_kwargs["base_channels"], wide.init_kwargs["base_channels"]
    if new_base < old_base:
        raise ValueError(f"cannot narrow a network: base_channels {old_base} -> {new_base}")

    def kept(level: int, maps: int = 1) -> Tensor:
        """Where ``narrow``'s channels of ``maps`` concatenated level-``level`` feature maps sit in ``wide``."""
        old, new = old_base * 2**level, new_base * 2**level
        return torch.cat([torch.arange(old) + m * new for m in range(maps)])

    # Kept (output, input) channels of each convolution; None: that side is not widened (the
    # network's input, the heads' classes).
    convs: dict[str, tuple[Tensor | None, Tensor | None]] = {}
    for i in range(narrow.depth + 1):
        convs[f"encoder.{i}.0"] = (kept(i), kept(i - 1) if i > 0 else None)
        convs[f"encoder.{i}.4"] = (kept(i), kept(i))
    for j in range(1, narrow.depth + 1):
        for i in range(narrow.depth + 1 - j):
            convs[f"up.{_node(i, j)}"] = (kept(i), kept(i + 1))
            convs[f"nodes.{_node(i, j)}.0"] = (kept(i), kept(i, maps=j + 1))
            convs[f"nodes.{_node(i, j)}.4"] = (kept(i), kept(i))
    for k in range(len(narrow.heads)):
        convs[f"heads.{k}"] = (None, kept(0))
    # Each conv block's norms follow its convolutions (ConvBlock: 0 conv, 1 norm, ..., 4 conv, 5 norm).
    norms = {f"{conv[:-2]}.{int(conv[-1]) + 1}": out for conv, (out, _) in convs.items()
             if conv.startswith(("encoder.", "nodes."))}

    modules = dict(wide.named_modules())
    state = {name: tensor.clone() for name, tensor in wide.state_dict().items()}
    for name, old in narrow.state_dict().items():
        prefix, _, field = name.rpartition(".")
        new = state[name]
        if field == "num_batches_tracked":
            new.copy_(old)
        elif prefix in norms:
            new[norms[prefix]] = old
        elif prefix in convs:
            out_kept, in_kept = (torch.arange(n) if k is None else k for k, n in zip(convs[prefix], _channels(modules[prefix])))
            if field == "bias":
                new[out_kept] = old
            elif isinstance(modules[prefix], nn.ConvTranspose2d):  # weight (in, out, kh, kw)
                new[:, out_kept] = 0.0
                new[in_kept[:, None], out_kept[None, :]] = old
            else:  # weight (out, in, kh, kw)
                new[out_kept] = 0.0
                new[out_kept[:, None], in_kept[None, :]] = old
        else:
            raise ValueError(f"widened_state_dict does not know the layer {prefix!r}")
    return state


def _channels(layer: nn.Module) -> tuple[int, int]:
    """(output, input) channels of a convolution."""
    return layer.out_channels, layer.in_channels
