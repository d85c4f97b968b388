"""Configuration records: validated once, frozen, and stored beside the weights they produced.

Each record round-trips through plain JSON (``to_dict`` / ``from_dict``) so a checkpoint can
carry it without pickling, and ``from_dict`` names the field that is wrong.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal

NormalizationMode = Literal["window", "zscore"]


class ConfigError(ValueError):
    """A configuration value is missing, unknown or out of range."""


def _from_dict(cls, data: dict[str, Any], what: str):
    if not isinstance(data, dict):
        raise ConfigError(f"{what}: expected a mapping, got {type(data).__name__}")
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"{what}: unknown field(s) {', '.join(unknown)}; valid: {', '.join(sorted(names))}")
    kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in data.items()}
    return cls(**kwargs)


# Test-time mirroring (kitseg.pipeline.Segmenter): none, stage 2 only, both stages.
MIRROR_MODES = ("off", "stage2", "both")

#: Default of ``Segmenter(tumor_slice_smoothing=...)`` (kitseg.pipeline.tumor_lead): chosen for
#: the shipped model on 120 phantom draws (docs/model_studies.md, "Kidney or tumor read from three slices").
TUMOR_SLICE_SMOOTHING = 0.25


def check_tumor_slice_smoothing(weight: float) -> float:
    """A neighbouring slice's weight in the three-slice tumor rule: in [0, 0.5), since the slice
    itself keeps 1 - 2 * weight and must outweigh each neighbour. Raises ValueError otherwise."""
    weight = float(weight)
    if not 0.0 <= weight < 0.5:  # also rejects NaN
        raise ValueError(f"a neighbouring slice's weight must be in [0, 0.5), not {weight!r}")
    return weight


def stage2_in_channels(context_slices: int) -> int:
    """Stage 2's input channels: the method's (y1*I, I, (1-y1)*I) for the slice and each neighbour."""
    return 3 * (2 * context_slices + 1)


@dataclass(frozen=True)
class PreprocessingConfig:
    """How a CT is brought to the grid and intensity range the networks work on.

    Attributes:
        slice_spacing_mm: target spacing along the slice axis (the paper: 5 mm).
        inplane_spacing_mm: target in-plane spacing; ``None`` keeps the native spacing (the paper).
        normalization: ``"window"`` clips to [hu_min, hu_max] and maps that window onto [-1, 1]
            (robust to scanner offsets and contrast spikes); ``"zscore"`` standardizes each volume
            by its own mean and standard deviation (the paper).
        hu_min, hu_max: the clipping window for ``"window"``.
        context_slices: neighbouring slices on each side fed to the stage-1 network as extra
            channels (0 = plain 2D; 1 = 2.5D with 3 channels).
        stage2_context_slices: the same for stage 2: the method's three channels of each
            neighbouring slice join the slice's own (0 = the paper's 3 channels; 1 = 9), meant to
            tell a round mass from a medullary pyramid (no gain measured on the ``cpu`` recipe).
    """

    slice_spacing_mm: float = 5.0
    inplane_spacing_mm: float | None = None
    normalization: NormalizationMode = "window"
    hu_min: float = -200.0
    hu_max: float = 400.0
    context_slices: int = 1
    stage2_context_slices: int = 0

    def __post_init__(self) -> None:
        if not self.slice_spacing_mm > 0:
            raise ConfigError(f"slice_spacing_mm must be > 0, got {self.slice_spacing_mm}")
        if self.inplane_spacing_mm is not None and not self.inplane_spacing_mm > 0:
            raise ConfigError(f"inplane_spacing_mm must be > 0 or None, got {self.inplane_spacing_mm}")
        if self.normalization not in ("window", "zscore"):
            raise ConfigError(f"normalization must be 'window' or 'zscore', got {self.normalization!r}")
        if not self.hu_max > self.hu_min:
            raise ConfigError(f"hu_max ({self.hu_max}) must exceed hu_min ({self.hu_min})")
        for name in ("context_slices", "stage2_context_slices"):
            value = getattr(self, name)
            if not (isinstance(value, int) and 0 <= value <= 5):
                raise ConfigError(f"{name} must be an integer in 0..5, got {value!r}")

    @property
    def stage1_in_channels(self) -> int:
        return 2 * self.context_slices + 1

    @property
    def stage2_in_channels(self) -> int:
        return stage2_in_channels(self.stage2_context_slices)

    def preparation_key(self) -> dict[str, Any]:
        """The fields that shape a prepared volume (grid and intensities), not the networks' inputs."""
        return {k: v for k, v in self.to_dict().items() if k not in ("context_slices", "stage2_context_slices")}

    def matches_except_stage2_context(self, other: "PreprocessingConfig") -> bool:
        """Same grid, window and stage-1 input; only stage 2's neighbouring slices may differ.

        The rule for reusing a network under another recipe: a stage 2 can be widened to see
        more slices (``pipeline.widen_stage2``), but on another grid or intensity window every
        network would read an image other than the one it was trained on.
        """
        return dataclasses.replace(self, stage2_context_slices=other.stage2_context_slices) == other

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "PreprocessingConfig":
        return _from_dict(cls, data, "preprocessing")


@dataclass(frozen=True)
class LabelMap:
    """Label values of the output map (KiTS19 convention by default)."""

    names: tuple[str, ...] = ("background", "kidney", "tumor")

    def __post_init__(self) -> None:
        if len(self.names) < 2 or self.names[0] != "background" or len(set(self.names)) != len(self.names):
            raise ConfigError(f"label names must start with 'background' and be unique, got {self.names}")

    def value(self, name: str) -> int:
        try:
            return self.names.index(name)
        except ValueError:
            raise ConfigError(f"no label {name!r}; labels are {', '.join(self.names)}") from None

    def stray_values(self, labels: Any) -> list[int]:
        """The values of a label array that name no class here (a painted 3, KiTS21's cysts), sorted.

        Anything above the last class would count as kidney in KiTS19 scoring (``label > 0``) and
        as background in training; callers refuse it, each saying what to do about it.
        """
        import numpy as np

        labels = np.asarray(labels)
        last = len(self.names) - 1
        if labels.size == 0 or labels.max() <= last:
            return []
        return [int(v) for v in np.unique(labels[labels > last])]

    def to_dict(self) -> dict[str, Any]:
        return {"names": list(self.names)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "LabelMap":
        return _from_dict(cls, data, "label_map")


@dataclass(frozen=True)
class MaskConfig:
    """How the stage-1 probability becomes the stage-2 region of interest."""

    threshold: float = 0.5
    radius: float = 10.0
    radius_unit: Literal["voxels", "mm"] = "voxels"

    def __post_init__(self) -> None:
        if not 0.0 <= self.threshold <= 1.0:
            raise ConfigError(f"threshold must be in [0, 1], got {self.threshold}")
        if not 0 <= self.radius < float("inf"):
            raise ConfigError(f"radius must be a finite number >= 0, got {self.radius}")
        if self.radius_unit not in ("voxels", "mm"):
            raise ConfigError(f"radius_unit must be 'voxels' or 'mm', got {self.radius_unit!r}")

    def describe(self) -> str:
        return f"y1 >= {self.threshold} dilated by {self.radius:g} {self.radius_unit}"

    def dilation_spacing(self, spacing: tuple[float, float, float]) -> tuple[float, float, float] | None:
        """What ``make_mask``/``dilate_ball`` take as spacing: the grid's mm for a radius in mm, else None."""
        return spacing if self.radius_unit == "mm" else None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "MaskConfig":
        return _from_dict(cls, data, "mask")


KITS_LABELS = LabelMap()

#: Who made a label map, in DICOM SEG's terms (Segment Algorithm Type): a model alone, a model's
#: labels a person corrected (what the plugin saves), or a person alone (kitseg.dicom_seg).
SEG_ALGORITHM_TYPES = ("automatic", "semiautomatic", "manual")


#: The key of ``*=TO`` in a label mapping: every other value but 0 (another tool's organs, say).
OTHER_LABELS = -1


def label_mapping(pairs: Any, what: str = "--map-labels") -> dict[int, int]:
    """Label values of another convention mapped onto KiTS19's: ``["3=1"]`` or ``{"3": 1}`` ->
    ``{3: 1}`` (KiTS21/23's cysts, 3, counted as kidney). A value maps to a KiTS19 class (0, 1 or
    2); ``*=TO`` maps every value not named but 0 (key :data:`OTHER_LABELS`): TotalSegmentator's
    kidneys are ``2=1 3=1 *=0``. Without ``*``, values not named stay as they are. Raises
    ConfigError naming the pair that is wrong."""
    if isinstance(pairs, dict):
        items = [(f"{source}={target}", source, target) for source, target in pairs.items()]
    else:
        items = [(str(pair), *str(pair).partition("=")[::2]) for pair in pairs]
    mapping: dict[int, int] = {}
    last = len(KITS_LABELS.names) - 1
    for pair, source, target in items:
        # "*", or the key a parsed mapping keeps for it; a typed -1 is no label value.
        other = str(source).strip() == "*" or (type(source) is int and source == OTHER_LABELS)
        try:
            source_value = OTHER_LABELS if other else int(str(source))
            target_value = int(str(target))
        except ValueError:
            raise ConfigError(f"{what} {pair}: expected FROM=TO with whole numbers, e.g. 3=1 "
                              "(KiTS21/23's cysts counted as kidney), or *=0 for every other value") from None
        if not (other or 0 <= source_value <= 255):
            raise ConfigError(f"{what} {pair}: a label value is 0..255")
        if not 0 <= target_value <= last:
            raise ConfigError(f"{what} {pair}: labels map to a KiTS19 class: "
                              + ", ".join(f"{k} ({name})" for k, name in enumerate(KITS_LABELS.names)))
        if mapping.get(source_value, target_value) != target_value:
            raise ConfigError(f"{what}: label {'*' if source_value == OTHER_LABELS else source_value} is mapped twice")
        mapping[source_value] = target_value
    return mapping


def label_mapping_text(mapping: dict[int, int]) -> dict[str, int]:
    """``mapping`` with text keys (``"3"``, ``"*"``), as JSON keeps it; :func:`label_mapping` reads it back."""
    ordered = sorted(mapping.items(), key=lambda item: (item[0] == OTHER_LABELS, item[0]))  # "*" last
    return {("*" if k == OTHER_LABELS else str(k)): v for k, v in ordered}


def describe_label_mapping(mapping: dict[int, int]) -> str:
    """``3=1 *=0``: the mapping as ``--map-labels`` takes it (empty: none)."""
    return " ".join(f"{k}={v}" for k, v in label_mapping_text(mapping).items())


def mapped_class(mapping: dict[int, int], value: int) -> int:
    """The value ``value`` becomes under ``mapping``."""
    if value in mapping:
        return mapping[value]
    return mapping.get(OTHER_LABELS, value) if value != 0 else 0


def tumor_left_unlabelled(mapping: dict[int, int]) -> bool:
    """Under ``mapping`` no value is tumor: the reference's convention has no tumor class (a map of
    kidneys only, or ``2=1`` to score the kidney region alone), so tumor cannot be scored."""
    tumor = len(KITS_LABELS.names) - 1
    return bool(mapping) and mapped_class(mapping, tumor) != tumor and tumor not in mapping.values()


def apply_label_mapping(labels: Any, mapping: dict[int, int]) -> Any:
    """``labels`` (whole numbers 0..255) with each value in ``mapping`` replaced; the same array if none is."""
    import numpy as np

    if not mapping:
        return labels
    labels = np.asarray(labels)
    if labels.size and (labels.min() < 0 or labels.max() > 255):  # a cast would wrap them onto real classes
        raise ValueError(f"label values must be in 0..255 to be mapped, got {labels.min()}..{labels.max()}")
    table = np.array([mapped_class(mapping, value) for value in range(256)], dtype=np.uint8)
    return table[labels.astype(np.uint8, copy=False)]
