"""The two-stage method, one step at a time, so a GUI can run, show and edit between steps.

    prepared = segmenter.prepare(volume)                 # resample to the stage grid, normalize
    y1 = segmenter.stage1(prepared)                      # P(kidney or tumor), (Zs, Ys, Xs)
    mask = make_mask(y1, threshold=0.5, radius=10)       # dilated foreground, the stage-2 ROI
    probs = segmenter.stage2(prepared, y1, mask)         # (3, Zs, Ys, Xs): background, kidney, tumor
    labels = segmenter.labels_on_source(prepared, probs) # uint8 on the CT's own grid, stray
                                                         # pieces removed (kitseg.postprocess)

Every long step has an ``iter_*`` twin: a generator that fills a caller-owned output array batch
by batch and yields :class:`Progress` after each batch, so a caller can show partial results
and stop between batches (closing the generator leaves finished batches in place).
"""

from __future__ import annotations

import contextlib
import itertools
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .checkpoint import ModelBundle, StageModel, load_bundle
from .config import MIRROR_MODES, TUMOR_SLICE_SMOOTHING, MaskConfig, check_tumor_slice_smoothing, stage2_in_channels
from .device import get_device
from .geometry import Volume
from .morphology import bounding_box, dilate_ball
from .networks import build_network, predict_logits
from .networks.unetpp import widened_state_dict
from .postprocess import KIDNEY, TUMOR, CleanupRules, remove_stray_components
from .preprocess import PreparedVolume, prepare
from .weights import default_weights_path

log = logging.getLogger(__name__)

#: A CT in HU has air at about -1000 (around the body, in lungs and bowel); lowest values above
#: this suggest raw scanner values stored without the header's rescale intercept (often -1024).
NOT_HU_LOWEST = -500.0


def hu_warning(volume: Volume) -> str | None:
    """A warning naming the file when the CT's lowest values are no air in HU, else ``None``.

    Only a warning: a CT cropped close to the kidneys may hold no air.
    """
    sample = np.asarray(volume.array[:: max(1, volume.array.shape[0] // 16)], np.float32)
    lowest = float(np.percentile(sample, 0.5))
    if lowest <= NOT_HU_LOWEST:
        return None
    name = getattr(volume.source, "path", None) or "the CT"
    return (f"{name}: its lowest values are about {lowest:.0f}, where a CT in HU has air at about -1000: if these "
            "are raw scanner values, the header needs its rescale intercept (scl_inter, often -1024); the models read HU")


# Stage-2 probabilities are kept as float16 on the stage grid: 3 x 106 x 512 x 512 fits in 170 MB.
PROB_DTYPE = np.float16
STAGE2_MARGIN = 16  # pixels of the stage grid


def mirror_mode(mirror: bool | str) -> str:
    """One of MIRROR_MODES; True and False are "both" and "off", as before the modes."""
    if isinstance(mirror, bool):
        return "both" if mirror else "off"
    if mirror not in MIRROR_MODES:
        raise ValueError(f"mirror must be one of {', '.join(MIRROR_MODES)} (or a bool), got {mirror!r}")
    return mirror


@dataclass(frozen=True)
class Progress:
    """One finished batch: ``done`` of ``total`` units; ``slices`` = stage slices just written."""

    step: str
    done: int
    total: int
    slices: tuple[int, int] | None = None


def stage2_input(image, y1, mask):
    """The paper's stage-2 input ``I2 = mask * concat(y1*I, I, (1-y1)*I)``.

    Works on numpy arrays (inference) and torch tensors (training), so both use one formula.

    Args:
        image: normalized CT ``I``, shape (..., H, W).
        y1: stage-1 foreground probability, same shape.
        mask: the dilated stage-1 foreground (bool or 0/1), same shape.
    Returns:
        float32 (..., 3, H, W): channels (y1*I, I, (1-y1)*I), zero outside the mask.
    """
    if not (image.shape == y1.shape == mask.shape):
        raise ValueError(f"image {tuple(image.shape)}, y1 {tuple(y1.shape)} and mask {tuple(mask.shape)} must have one shape")
    if isinstance(image, torch.Tensor):
        masked = mask.to(torch.float32) * image.to(torch.float32)
        y1 = y1.to(torch.float32)
        return torch.stack([y1 * masked, masked, (1.0 - y1) * masked], dim=-3)
    y1 = y1.astype(np.float32, copy=False)
    masked = mask.astype(np.float32, copy=False) * image.astype(np.float32, copy=False)
    return np.stack([y1 * masked, masked, (1.0 - y1) * masked], axis=-3)


def tumor_lead(probs: np.ndarray, weight: float, box: tuple[slice, slice, slice] | None = None) -> np.ndarray:
    """Stage 2's tumor probability minus its kidney probability (float32, (Z, Y, X) from the
    (3, Z, Y, X) ``probs``), averaged along the slice axis with weights (``weight``,
    1 - 2 ``weight``, ``weight``); tumor where it is > 0, kidney at a tie, as the argmax.

    Stage 2 sees one 5 mm slice at a time (the shipped model), so its kidney-or-tumor call
    flickers from slice to slice; a tumor is a body that goes on through its neighbours. The
    first and last slices of the volume count their own value for the missing neighbour; a
    slice beyond the stage-2 mask counts 0 (there both probabilities are 0), so a tumor's end
    slice, next to it, leans to kidney. ``box``: the region holding every voxel whose
    background probability is under 1 (zero elsewhere); only it is computed, to spare memory.
    """
    lead = np.zeros(probs.shape[1:], np.float32)
    if box is None:
        box = tuple(slice(0, n) for n in lead.shape)
    zs, ys, xs = box
    zs = slice(max(zs.start - 1, 0), min(zs.stop + 1, lead.shape[0]))  # the zeros just outside vote too
    region = probs[2, zs, ys, xs].astype(np.float32)
    region -= probs[1, zs, ys, xs]
    if weight > 0 and region.shape[0] > 1:
        averaged = region * (1.0 - 2.0 * weight)
        averaged[1:] += weight * region[:-1]
        averaged[:-1] += weight * region[1:]
        averaged[0] += weight * region[0]  # the ends of this region: its own value, or the zeros
        averaged[-1] += weight * region[-1]  # beyond the box, which are their own value too
        region = averaged
    lead[zs, ys, xs] = region
    return lead


def make_mask(
    y1: np.ndarray,
    threshold: float = 0.5,
    radius: float = 10.0,
    spacing: tuple[float, float, float] | None = None,
) -> np.ndarray:
    """Stage-2 region of interest: ``y1 >= threshold`` dilated by a ball.

    ``radius`` is in voxels of the stage grid (the original implementation) unless ``spacing``
    (mm per voxel) is given, in which case it is in mm.
    """
    MaskConfig(threshold=threshold, radius=radius)  # validates the values
    return dilate_ball(y1 >= threshold, radius, spacing)


def neighbour_indices(indices: np.ndarray, context: int, n_slices: int) -> np.ndarray:
    """(B, 2*context+1) slice indices: each slice with its neighbours, the edge slices repeated."""
    offsets = np.arange(-context, context + 1)
    return np.clip(np.asarray(indices)[:, None] + offsets[None, :], 0, n_slices - 1)


def _stage1_batch(image: np.ndarray, indices: np.ndarray, context: int) -> np.ndarray:
    """(B, 2*context+1, Ys, Xs) float32 input: each slice with its neighbours (edges repeat).

    The image may be stored narrower (training maps its cases as float16): a batch at a time is cast.
    """
    return image[neighbour_indices(indices, context, image.shape[0])].astype(np.float32, copy=False)


def stage2_context_input(image, y1, mask):
    """:func:`stage2_input` of a slice and its neighbours, as one (B, 3*K, H, W) network input.

    ``image``, ``y1`` and ``mask`` are (B, K, H, W): K = 2*context+1 slices centred on each
    sample. Channels run slice by slice, each the method's (y1*I, I, (1-y1)*I), so the
    centre slice's three are channels 3*context .. 3*context+2 and K = 1 is the paper's input.
    """
    x = stage2_input(image, y1, mask)  # (B, K, 3, H, W)
    return x.reshape(x.shape[0], -1, *x.shape[-2:])


def widen_stage2_input(state: dict[str, torch.Tensor], target: dict[str, torch.Tensor], from_context: int,
                       to_context: int) -> dict[str, torch.Tensor]:
    """A stage-2 state dict for more neighbouring slices, computing exactly what it computed before.

    Weights reading the input (the first convolution: ``stage2_in_channels(from_context)`` inputs)
    are placed on the same slices in the wider input and the new slices' weights are zero, so
    fine-tuning starts from the given network's output and learns what the neighbours add.
    """
    offset = 3 * (to_context - from_context)
    widened = {}
    for name, tensor in state.items():
        want = target[name].shape
        if tensor.shape == want:
            widened[name] = tensor
            continue
        if (tensor.ndim < 2 or tensor.shape[0] != want[0] or tensor.shape[2:] != want[2:]
                or tensor.shape[1] != stage2_in_channels(from_context) or want[1] != stage2_in_channels(to_context)):
            raise ValueError(f"stage 2 weight {name!r} has shape {tuple(tensor.shape)}; cannot widen it to {tuple(want)}")
        wide = torch.zeros(want, dtype=tensor.dtype)
        wide[:, offset: offset + tensor.shape[1]] = tensor
        widened[name] = wide
    return widened


def widen_stage2(stage: StageModel, from_context: int, to_context: int) -> StageModel:
    """``stage`` (a stage-2 network) rebuilt to read ``to_context`` neighbours on each side.

    Its output is exactly the given network's (:func:`widen_stage2_input`); an ensemble is
    refused, since its members would each need widening: combine their source files instead.
    """
    if from_context == to_context:
        return stage
    if stage.architecture == "ensemble":
        raise ValueError("an ensemble stage 2 cannot be widened; widen its members' source files instead")
    kwargs = {**stage.kwargs, "in_channels": stage2_in_channels(to_context)}
    module = build_network(stage.architecture, **kwargs)
    module.load_state_dict(widen_stage2_input(stage.module.state_dict(), module.state_dict(), from_context, to_context))
    return StageModel(stage.architecture, kwargs, module.eval())


def widen_stage_channels(stage: StageModel, base_channels: int) -> StageModel:
    """``stage`` (a UNet++) rebuilt with ``base_channels``, computing exactly what it computed.

    The added channels start with zero weights into the old ones (:func:`widened_state_dict`), so
    fine-tuning a wider network starts from the given one's output. An ensemble is refused, as
    in :func:`widen_stage2`.
    """
    if stage.kwargs.get("base_channels") == base_channels:
        return stage
    if stage.architecture != "unetpp2d":
        raise ValueError(f"only a UNet++ can be widened, not {stage.architecture!r}")
    kwargs = {**stage.kwargs, "base_channels": base_channels}
    module = build_network(stage.architecture, **kwargs)
    module.load_state_dict(widened_state_dict(stage.module, module))
    return StageModel(stage.architecture, kwargs, module.eval())


class Segmenter:
    """A loaded two-stage model on one device; reuse it across cases (the weights load once)."""

    def __init__(
        self,
        bundle: ModelBundle,
        device: str | torch.device = "auto",
        batch_size: int = 8,
        stage2_level: int | None = None,
        mirror: bool | str = False,
        tumor_slice_smoothing: float = TUMOR_SLICE_SMOOTHING,
    ):
        """
        Args:
            bundle: the loaded model file.
            device: "auto" (cuda > mps > cpu), or a device name.
            batch_size: slices per network call.
            stage2_level: UNet++ pruned inference: use only the sub-network of this depth and its
                supervised head (faster, slightly less accurate); None ensembles all heads.
            mirror: test-time mirroring: average a network's output on a slice and on its
                left-right mirror image (twice that network's time); "stage2" mirrors stage 2
                only, "both" (or True) both stages, "off" (or False) none. The networks were
                trained with such flips, so both views are ones they know. Stage 1 mirrored
                found less kidney on the real CT (model card); stage 2 mirrored alone gains a
                little kidney Dice.
            tumor_slice_smoothing: where the labels say kidney or tumor, read stage 2's tumor and
                kidney probabilities averaged with the neighbouring slices', weights (w, 1 - 2w, w)
                (:func:`tumor_lead`); 0 reads each slice alone. What is foreground stays the
                plain argmax's.
        """
        try:
            tumor_slice_smoothing = check_tumor_slice_smoothing(tumor_slice_smoothing)
        except ValueError as error:
            raise ValueError(f"tumor_slice_smoothing: {error}") from None
        if bundle.stage1 is None and bundle.stage2 is None:
            raise ValueError("the model has no stage at all")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.bundle = bundle
        self.device = device if isinstance(device, torch.device) else get_device(device)
        self.batch_size = batch_size
        self.mirror = mirror_mode(mirror)
        self.tumor_slice_smoothing = tumor_slice_smoothing
        self.stage1_net = bundle.stage1.module.to(self.device).eval() if bundle.stage1 else None
        self.stage2_net = bundle.stage2.module.to(self.device).eval() if bundle.stage2 else None
        if stage2_level is not None:
            if self.stage2_net is None or not hasattr(self.stage2_net, "set_inference_level"):
                raise ValueError("stage2_level needs a UNet++ stage 2")
            self.stage2_net.set_inference_level(stage2_level)

    def require_both_stages(self) -> None:
        """Segmentation needs both stages; a stage-1-only file can still make y1 maps."""
        for number, net in ((1, self.stage1_net), (2, self.stage2_net)):
            if net is None:
                raise ValueError(f"the model has no stage {number}; segmentation needs both stages")

    @classmethod
    def from_file(
        cls,
        path: str | Path | None = None,
        device: str = "auto",
        batch_size: int = 8,
        stage2_level: int | None = None,
        mirror: bool | str = False,
        tumor_slice_smoothing: float = TUMOR_SLICE_SMOOTHING,
    ) -> "Segmenter":
        path = path or default_weights_path()
        bundle = load_bundle(path)
        segmenter = cls(bundle, device=device, batch_size=batch_size, stage2_level=stage2_level, mirror=mirror,
                        tumor_slice_smoothing=tumor_slice_smoothing)
        try:
            segmenter.require_both_stages()  # e.g. a training run's stage-1 file (fold1/best.kseg)
        except ValueError as exc:
            raise ValueError(f"{path}: {exc}") from None
        return segmenter

    @property
    def preprocessing(self):
        return self.bundle.preprocessing

    def prepare(self, volume: Volume) -> PreparedVolume:
        prepared = prepare(volume, self.bundle.preprocessing)
        prepared.warning = hu_warning(volume)  # logged here, and shown by the plugin from the prepared CT
        if prepared.warning:
            log.warning("%s", prepared.warning)
        return prepared

    def _autocast(self):
        # Mixed precision helps on CUDA only; on CPU it is slower and less exact.
        return torch.autocast("cuda", dtype=torch.float16) if self.device.type == "cuda" else contextlib.nullcontext()

    @torch.inference_mode()
    def _forward_probs(self, net: torch.nn.Module, batch: np.ndarray, mirror: bool) -> np.ndarray:
        x = torch.from_numpy(np.ascontiguousarray(batch)).to(self.device)
        with self._autocast():
            # UNet++ returns one logits map per supervised head; predict_logits ensembles them.
            probs = torch.softmax(predict_logits(net(x)).float(), dim=1)
            if mirror:
                mirrored = torch.softmax(predict_logits(net(torch.flip(x, dims=(-1,)))).float(), dim=1)
                probs = 0.5 * (probs + torch.flip(mirrored, dims=(-1,)))
        return probs.cpu().numpy()

    # ---------------------------------------------------------------- stage 1
    def iter_stage1(self, prepared: PreparedVolume, y1_out: np.ndarray) -> Iterator[Progress]:
        """Fill ``y1_out`` (float32, stage shape) with P(foreground), a batch of slices at a time."""
        if self.stage1_net is None:
            self.require_both_stages()
        image = prepared.image
        if y1_out.shape != image.shape:
            raise ValueError(f"y1_out has shape {y1_out.shape}, expected {image.shape}")
        context = self.bundle.preprocessing.context_slices
        n = image.shape[0]
        for start in range(0, n, self.batch_size):
            stop = min(n, start + self.batch_size)
            batch = _stage1_batch(image, np.arange(start, stop), context)
            y1_out[start:stop] = self._forward_probs(self.stage1_net, batch, self.mirror == "both")[:, 1]
            yield Progress("stage 1", stop, n, (start, stop))

    def stage1(self, prepared: PreparedVolume) -> np.ndarray:
        y1 = np.zeros(prepared.image.shape, np.float32)
        for _ in self.iter_stage1(prepared, y1):
            pass
        return y1

    # ---------------------------------------------------------------- stage 2
    def mask(self, prepared: PreparedVolume, y1: np.ndarray, mask_config: MaskConfig | None = None) -> np.ndarray:
        """Stage 2's region: ``y1`` thresholded and dilated as the model file says (or ``mask_config``)."""
        config = mask_config or self.bundle.mask
        return make_mask(y1, config.threshold, config.radius, config.dilation_spacing(prepared.grid.spacing))

    def iter_stage2(
        self,
        prepared: PreparedVolume,
        y1: np.ndarray,
        mask: np.ndarray,
        probs_out: np.ndarray,
        crop_to_mask: bool = True,
    ) -> Iterator[Progress]:
        """Fill ``probs_out`` (3, Zs, Ys, Xs) with class probabilities inside the mask.

        Everything outside the mask is background with probability 1, as the method defines,
        so only the mask's bounding box (plus a margin) goes through the network.
        ``crop_to_mask=False`` runs every full slice instead: slower, and different only where
        the network's view reaches past the box's margin (kept for benchmarks and checks).
        """
        if self.stage2_net is None:
            self.require_both_stages()
        shape = prepared.image.shape
        if y1.shape != shape or mask.shape != shape:
            raise ValueError(f"y1 {y1.shape} and mask {mask.shape} must match the image {shape}")
        if probs_out.shape != (3,) + shape:
            raise ValueError(f"probs_out has shape {probs_out.shape}, expected {(3,) + shape}")
        probs_out[...] = 0
        probs_out[0] = 1
        mask = mask.astype(bool, copy=False)
        # In-plane margin: the network sees some of the zeros around the mask, as in training crops.
        box = bounding_box(mask, margin=(0, STAGE2_MARGIN, STAGE2_MARGIN))
        if box is None:
            yield Progress("stage 2", 0, 0)
            return
        if not crop_to_mask:
            box = tuple(slice(0, n) for n in shape)
        zs, ys, xs = box
        total = zs.stop - zs.start
        context = self.bundle.preprocessing.stage2_context_slices
        for start in range(zs.start, zs.stop, self.batch_size):
            stop = min(zs.stop, start + self.batch_size)
            region = (slice(start, stop), ys, xs)
            # Neighbours come from the whole volume: outside the mask they are zeros, as in training.
            near = neighbour_indices(np.arange(start, stop), context, shape[0])
            batch = stage2_context_input(prepared.image[near, ys, xs], y1[near, ys, xs], mask[near, ys, xs])
            probs = self._forward_probs(self.stage2_net, batch, self.mirror != "off")  # (B, 3, h, w)
            inside = mask[region][:, None]
            background = np.zeros((1, 3, 1, 1), np.float32)
            background[0, 0] = 1.0
            probs = np.where(inside, probs, background)
            probs_out[:, start:stop, ys, xs] = probs.transpose(1, 0, 2, 3)
            yield Progress("stage 2", stop - zs.start, total, (start, stop))

    def stage2(self, prepared: PreparedVolume, y1: np.ndarray, mask: np.ndarray) -> np.ndarray:
        probs = np.empty((3,) + prepared.image.shape, PROB_DTYPE)
        for _ in self.iter_stage2(prepared, y1, mask, probs):
            pass
        return probs

    # ---------------------------------------------------------------- back to the CT grid
    def iter_labels_on_source(
        self,
        prepared: PreparedVolume,
        probs: np.ndarray,
        labels_out: np.ndarray,
        cleanup: CleanupRules | None = CleanupRules(),
        lead: np.ndarray | None = None,
    ) -> Iterator[Progress]:
        """Resample probabilities to the CT's grid slice by slice, then argmax into ``labels_out``.

        Only the source region that the non-background stage box reaches is resampled; the
        rest of the CT is background by construction. With ``tumor_slice_smoothing`` the
        argmax decides foreground, and the tumor's lead over the kidney, averaged with the
        neighbouring slices' (:func:`tumor_lead`), decides kidney or tumor. ``cleanup`` then
        removes foreground pieces that cannot be a kidney (None keeps the raw labels).
        ``lead``: a (Z, Y, X) map on the stage grid that decides kidney (<= 0) or tumor (> 0)
        in :func:`tumor_lead`'s place, whatever ``tumor_slice_smoothing`` says (for studies
        of other rules; the foreground stays the argmax's).
        """
        grid = prepared.grid
        labels_out[...] = 0
        foreground = probs[0] < 1
        box = bounding_box(foreground)
        if box is None:
            yield Progress("labels", 1, 1)
            return
        src_z, src_y, src_x = grid.source_box(box)
        total = src_z.stop - src_z.start
        z_range = (src_z.start, src_z.stop)
        planes = grid.iter_to_source(probs, z_range)
        if lead is None and self.tumor_slice_smoothing > 0:
            lead = tumor_lead(probs, self.tumor_slice_smoothing, box)
        if lead is not None:
            if lead.shape != probs.shape[1:]:
                raise ValueError(f"lead has shape {lead.shape}; the probabilities' grid is {probs.shape[1:]}")
            leads = grid.iter_to_source(lead, z_range)
        else:
            leads = itertools.repeat((None, None))
        for (i, plane), (_, lead_plane) in zip(planes, leads):
            labels = np.argmax(plane[:, src_y, src_x], axis=0).astype(np.uint8)
            if lead_plane is not None:
                foreground = labels > 0
                labels[foreground] = np.where(lead_plane[src_y, src_x][foreground] > 0, TUMOR, KIDNEY)
            labels_out[i, src_y, src_x] = labels
            done = i - src_z.start + 1
            if done % 16 == 0 or done == total:
                yield Progress("labels", done, total)
        if cleanup is not None:
            report = remove_stray_components(labels_out, cleanup)
            if report.removed:
                log.info("removed %d stray piece(s), %d voxels", report.removed, report.removed_voxels)
            if report.relabelled_voxels:
                log.info("relabelled kidney %d voxels of minor tumor pieces", report.relabelled_voxels)

    def labels_on_source(
        self,
        prepared: PreparedVolume,
        probs: np.ndarray,
        cleanup: CleanupRules | None = CleanupRules(),
        lead: np.ndarray | None = None,
    ) -> np.ndarray:
        labels = np.zeros(prepared.volume.shape, np.uint8)
        for _ in self.iter_labels_on_source(prepared, probs, labels, cleanup, lead):
            pass
        return labels

    # ---------------------------------------------------------------- all steps
    def segment(
        self, volume: Volume, mask_config: MaskConfig | None = None, cleanup: CleanupRules | None = CleanupRules()
    ) -> "Segmentation":
        """Both stages end to end; see :meth:`iter_segment` for progress."""
        result = None
        for item in self.iter_segment(volume, mask_config, cleanup):
            if isinstance(item, Segmentation):
                result = item
        assert result is not None
        return result

    def iter_segment(
        self, volume: Volume, mask_config: MaskConfig | None = None, cleanup: CleanupRules | None = CleanupRules()
    ) -> Iterator["Progress | Segmentation"]:
        """Run every step, yielding Progress, then the :class:`Segmentation` last."""
        self.require_both_stages()
        prepared = self.prepare(volume)
        yield Progress("prepare", 1, 1)
        y1 = np.zeros(prepared.image.shape, np.float32)
        yield from self.iter_stage1(prepared, y1)
        mask = self.mask(prepared, y1, mask_config)
        yield Progress("mask", 1, 1)
        probs = np.empty((3,) + prepared.image.shape, PROB_DTYPE)
        yield from self.iter_stage2(prepared, y1, mask, probs)
        labels = np.zeros(volume.shape, np.uint8)
        yield from self.iter_labels_on_source(prepared, probs, labels, cleanup)
        yield Segmentation(labels=labels, y1=y1, mask=mask, probs=probs, prepared=prepared)


@dataclass
class Segmentation:
    """Everything a run produced. ``labels`` is on the CT's internal grid; the rest on the stage grid."""

    labels: np.ndarray
    y1: np.ndarray
    mask: np.ndarray
    probs: np.ndarray
    prepared: PreparedVolume
