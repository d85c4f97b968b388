"""Training recipes: one frozen record per run, stored in the run folder and the checkpoints."""

from __future__ import annotations

import dataclasses
import numbers
from dataclasses import dataclass, field
from typing import Any

from ..config import ConfigError, MaskConfig, PreprocessingConfig, label_mapping, label_mapping_text

# How stage 2 draws a tumor sample (TrainConfig.tumor_sampling; Stage2Sampler).
TUMOR_SAMPLING = ("slice", "lesion")

DEFAULT_WINDOW_HU = PreprocessingConfig().hu_max - PreprocessingConfig().hu_min


@dataclass(frozen=True)
class TrainConfig:
    """Everything that defines a training run (the paper's defaults where it gives them).

    Networks use batch normalization: training sees crops and inference sees whole slices or
    mask boxes of other sizes, and running statistics, unlike per-image instance statistics,
    do not change with the crop (stage-2 inputs are zero outside the mask).

    Attributes:
        stage1_steps / stage2_steps: optimizer steps per stage (over all processes).
        steps_per_epoch: steps between validations and checkpoints.
        oof_folds: stage 2 learns from out-of-fold stage-1 predictions made by this many
            stage-1 models, each trained without the cases it predicts.
        oof_steps_fraction: fold models train for this fraction of ``stage1_steps`` (they only
            have to produce y1 maps *as imperfect as* the final stage 1's are on unseen cases).
        crop_stage1 / crop_stage2: square training crops in stage-grid pixels (None: full slices).
        foreground_fraction: share of stage-1 samples drawn from slices containing kidney.
        tumor_fraction: share of stage-2 samples drawn from slices containing tumor.
        tumor_sampling: how such a sample is drawn: "slice" (a tumor slice, the crop around a
            random mask pixel) or "lesion" (one of the case's tumors with equal chance, the crop
            around it: small tumors are shown as often as large ones; ``Stage2Sampler``).
        stage2_tumor_contrast_hu: stage-2 training shifts the tumor's intensity in half the samples
            that show tumor by a uniform draw in +-this many HU (0: off; needs the ``window``
            normalization), so that a tumor is not learnt by the one intensity its image gave it.
        stage2_dice_weight: adds this multiple of a soft Dice loss (kidney, tumor) to stage 2's
            masked cross-entropy; 0 is the paper's loss. Dice counts a small tumor as much as a
            large kidney, so it helps tumors when training is short.
        stage2_dice_per_image: that Dice per slice and class (every pair, as nnU-Net without
            batch Dice) instead of over the batch: a small tumor's slice weighs as much as a large
            one's. Off in every preset; see the model card for what it did on CPU budgets.
        stage2_tumor_weight: stage 2's cross-entropy counts each tumor pixel this many times (1:
            the paper's loss), so that the few pixels of a small tumor weigh more against the
            many of the kidney around it.
        stage2_hard_fraction: stage 2's cross-entropy keeps only this fraction of the masked
            pixels, those with the largest loss (ranked after the tumor weight), scaled up by its
            inverse (the "TopK" loss; 1: the paper's loss; ``masked_cross_entropy``). Once most
            pixels are right, the few still wrong (small tumors labelled kidney) carry the loss
            instead of being averaged away.
        augment_noise_hu: training adds Gaussian noise to each image, its standard deviation drawn
            uniformly up to this many HU on the networks' grid. With the ``zscore`` normalization,
            where HU have no fixed scale, it converts as in the default 600 HU window (15 HU: 0.05
            units, the amount every run before this option used). The phantoms carry noise of
            their own; this widens the range a model tolerates.
        lr_schedule: "constant" (the paper: Adam at 1e-3 throughout) or "poly" (decays to 0 as
            (1 - step/steps)^0.9, as nnU-Net does: converges within a short budget).
        label_mapping: label values of the data's convention mapped onto KiTS19's before
            training, as JSON (``{"3": 1}``: KiTS21/23's cysts trained as kidney; ``kits-seg
            train --map-labels 3=1``). Empty: the labels must hold 0, 1 and 2 only.
        amp: mixed precision (autocast; weights, losses and optimizer stay float32) where it is
            fast: on CUDA, and on CPUs that multiply bfloat16 in hardware (Intel AMX, AVX-512
            BF16), where it trains 1.5-2x as fast; float32 elsewhere or when False.
    """

    preset: str = "custom"
    preprocessing: PreprocessingConfig = field(default_factory=PreprocessingConfig)
    mask: MaskConfig = field(default_factory=MaskConfig)
    stage1_architecture: str = "unet2d"
    stage1_kwargs: dict[str, Any] = field(default_factory=lambda: {"base_channels": 32, "depth": 4, "norm": "batch"})
    stage2_architecture: str = "unetpp2d"
    stage2_kwargs: dict[str, Any] = field(default_factory=lambda: {"base_channels": 32, "depth": 4, "norm": "batch"})
    batch_size_stage1: int = 12
    batch_size_stage2: int = 8
    learning_rate: float = 1e-3
    lr_schedule: str = "constant"
    stage2_dice_weight: float = 0.0
    stage2_dice_per_image: bool = False
    stage2_tumor_contrast_hu: float = 0.0
    stage2_tumor_weight: float = 1.0
    stage2_hard_fraction: float = 1.0
    stage1_steps: int = 20000
    stage2_steps: int = 20000
    steps_per_epoch: int = 500
    oof_folds: int = 2
    oof_steps_fraction: float = 0.5
    crop_stage1: int | None = None
    crop_stage2: int | None = 256
    foreground_fraction: float = 0.6
    tumor_fraction: float = 0.4
    tumor_sampling: str = "slice"
    augment: bool = True
    augment_noise_hu: float = 15.0
    label_mapping: dict[str, int] = field(default_factory=dict)
    amp: bool = True
    seed: int = 0

    def __post_init__(self) -> None:
        positive = ("batch_size_stage1", "batch_size_stage2", "stage1_steps", "stage2_steps", "steps_per_epoch",
                    "crop_stage1", "crop_stage2")  # the crops may also be None: whole slices
        for name in positive + ("oof_folds", "seed"):
            value = getattr(self, name)
            if value is None and name.startswith("crop"):
                continue
            if not _whole_number(value):
                raise ConfigError(f"{name} must be a whole number, got {value!r}")
            if name in positive and value < 1:
                raise ConfigError(f"{name} must be >= 1, got {value}")
        if self.seed < 0:
            raise ConfigError(f"seed must be >= 0, got {self.seed}")
        for name in ("stage1_kwargs", "stage2_kwargs"):
            if not isinstance(getattr(self, name), dict):
                raise ConfigError(f"{name} must be a JSON object of network arguments, got {getattr(self, name)!r}")
        if self.oof_folds < 2:
            raise ConfigError(f"oof_folds must be >= 2 (out-of-fold predictions), got {self.oof_folds}")
        if not 0 < self.oof_steps_fraction <= 1:
            raise ConfigError(f"oof_steps_fraction must be in (0, 1], got {self.oof_steps_fraction}")
        for name in ("foreground_fraction", "tumor_fraction"):
            if not 0 <= getattr(self, name) <= 1:
                raise ConfigError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        if self.tumor_sampling not in TUMOR_SAMPLING:
            raise ConfigError(f"tumor_sampling must be one of {', '.join(TUMOR_SAMPLING)}, got {self.tumor_sampling!r}")
        if self.stage2_tumor_contrast_hu < 0:
            raise ConfigError(f"stage2_tumor_contrast_hu must be >= 0, got {self.stage2_tumor_contrast_hu}")
        if self.stage2_tumor_contrast_hu and self.preprocessing.normalization != "window":
            raise ConfigError("stage2_tumor_contrast_hu needs the 'window' normalization (HU must map to fixed units)")
        if self.augment_noise_hu < 0:
            raise ConfigError(f"augment_noise_hu must be >= 0, got {self.augment_noise_hu}")
        if self.stage2_dice_weight < 0:
            raise ConfigError(f"stage2_dice_weight must be >= 0, got {self.stage2_dice_weight}")
        if not self.stage2_tumor_weight > 0:
            raise ConfigError(f"stage2_tumor_weight must be > 0, got {self.stage2_tumor_weight}")
        if not 0 < self.stage2_hard_fraction <= 1:
            raise ConfigError(f"stage2_hard_fraction must be in (0, 1], got {self.stage2_hard_fraction}")
        for name in ("augment", "amp", "stage2_dice_per_image"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name} must be true or false, got {getattr(self, name)!r}")
        if self.lr_schedule not in ("constant", "poly"):
            raise ConfigError(f"lr_schedule must be 'constant' or 'poly', got {self.lr_schedule!r}")
        if not self.learning_rate > 0:
            raise ConfigError(f"learning_rate must be > 0, got {self.learning_rate}")
        if not isinstance(self.label_mapping, dict):
            raise ConfigError(f"label_mapping must be a JSON object such as {{\"3\": 1}}, got {self.label_mapping!r}")
        # Stored with text keys, as JSON has them, so a resumed run compares equal to its record.
        mapped = label_mapping(self.label_mapping, "label_mapping")
        object.__setattr__(self, "label_mapping", label_mapping_text(mapped))

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["preprocessing"] = self.preprocessing.to_dict()
        d["mask"] = self.mask.to_dict()
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TrainConfig":
        data = dict(data)
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ConfigError(f"train config: unknown field(s) {', '.join(unknown)}")
        if "preprocessing" in data:
            data["preprocessing"] = PreprocessingConfig.from_dict(data["preprocessing"])
        if "mask" in data:
            data["mask"] = MaskConfig.from_dict(data["mask"])
        return cls(**data)

    def labels_mapped(self) -> dict[int, int]:
        """``label_mapping`` with whole-number keys, as :func:`kitseg.config.apply_label_mapping` takes it."""
        return label_mapping(self.label_mapping, "label_mapping")

    def hu_to_units(self, hu: float) -> float:
        """A HU difference in the networks' normalized units: the window maps onto 2 units (under
        ``zscore``, where HU have no fixed scale, the default window's)."""
        pre = self.preprocessing
        window = pre.hu_max - pre.hu_min if pre.normalization == "window" else DEFAULT_WINDOW_HU
        return 2.0 * hu / window

    def augment_noise_sigma(self) -> float:
        """``augment_noise_hu`` in the networks' normalized units."""
        return self.hu_to_units(self.augment_noise_hu)

    def replace(self, **changes: Any) -> "TrainConfig":
        return dataclasses.replace(self, **changes)


def _whole_number(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


PRESETS: dict[str, TrainConfig] = {
    # As published: native in-plane resolution, 5 mm slices, full 512 x 512 slices for stage 1.
    "paper": TrainConfig(
        preset="paper",
        preprocessing=PreprocessingConfig(slice_spacing_mm=5.0, inplane_spacing_mm=None, context_slices=1),
        stage1_kwargs={"base_channels": 32, "depth": 5, "norm": "batch"},
        stage2_kwargs={"base_channels": 32, "depth": 4, "norm": "batch"},
        stage1_steps=30000,
        stage2_steps=30000,
        steps_per_epoch=1000,
        crop_stage1=None,
        crop_stage2=256,
    ),
    # CPU-sized: 2 mm in-plane, narrow networks, small crops; 38-57 min from scratch on 150 phantoms, 2 cores (README).
    "cpu": TrainConfig(
        preset="cpu",
        preprocessing=PreprocessingConfig(slice_spacing_mm=5.0, inplane_spacing_mm=2.0, context_slices=1),
        stage1_kwargs={"base_channels": 12, "depth": 4, "norm": "batch"},
        stage2_kwargs={"base_channels": 12, "depth": 4, "norm": "batch"},
        lr_schedule="poly",
        stage2_dice_weight=1.0,
        tumor_fraction=0.5,
        stage1_steps=1000,
        stage2_steps=2000,
        steps_per_epoch=500,
        oof_steps_fraction=0.42,
        crop_stage1=160,
        crop_stage2=112,
    ),
    # Seconds, for tests and smoke runs; its weights are meaningless.
    "smoke": TrainConfig(
        preset="smoke",
        preprocessing=PreprocessingConfig(slice_spacing_mm=5.0, inplane_spacing_mm=3.0, context_slices=1),
        stage1_kwargs={"base_channels": 4, "depth": 2, "norm": "batch"},
        stage2_kwargs={"base_channels": 4, "depth": 2, "norm": "batch"},
        batch_size_stage1=4,
        batch_size_stage2=4,
        stage1_steps=4,
        stage2_steps=4,
        steps_per_epoch=2,
        oof_steps_fraction=0.5,
        crop_stage1=32,
        crop_stage2=32,
    ),
}


def preset(name: str) -> TrainConfig:
    try:
        return PRESETS[name]
    except KeyError:
        raise ConfigError(f"unknown preset {name!r}; presets: {', '.join(PRESETS)}") from None
