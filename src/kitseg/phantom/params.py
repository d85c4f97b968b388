"""What the realistic phantom randomizes, and the tissue values of each contrast phase.

:class:`PhantomParams` holds the *ranges* (frozen, JSON round trip, validated once);
:func:`sample_protocol` draws one case's scanner, protocol and patient from them.
All intensities are Hounsfield units (HU); all lengths are millimetres.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

Phase = Literal["none", "arterial", "venous", "delayed"]
PHASES: tuple[Phase, ...] = ("none", "arterial", "venous", "delayed")

#: Unenhanced tissue values (HU). Literature ranges for adult abdominal CT.
UNENHANCED_HU: dict[str, float] = {
    "air": -1000.0,
    "lung": -830.0,
    "fat": -100.0,
    "skin": 35.0,
    "muscle": 45.0,
    "liver": 56.0,
    "spleen": 47.0,
    "pancreas": 42.0,
    "blood": 42.0,  # aorta, arteries
    "vein": 42.0,  # IVC, renal veins
    "bowel_wall": 38.0,
    "fluid": 8.0,  # bowel fluid, gallbladder, stomach content
    "csf": 12.0,
    "disc": 85.0,
    "bone_cancellous": 190.0,
    "bone_cortex": 550.0,
    "rib": 380.0,
    "kidney_cortex": 32.0,
    "kidney_medulla": 30.0,
    "urine": 8.0,  # renal pelvis and calyces
}

#: Enhancement (HU added to the unenhanced value) per contrast phase, at a nominal dose.
#: arterial = corticomedullary (~30 s): cortex bright, medulla still dark, veins early;
#: venous = nephrographic / portal-venous (~80-100 s): homogeneous kidney, liver enhanced;
#: delayed = excretory (3-10 min): everything washing out, contrast excreted into the pelvis.
ENHANCEMENT_HU: dict[Phase, dict[str, float]] = {
    "none": {},
    "arterial": {
        "blood": 270.0, "vein": 60.0, "liver": 15.0, "spleen": 75.0, "pancreas": 70.0,
        "bowel_wall": 35.0, "muscle": 6.0, "kidney_cortex": 150.0, "kidney_medulla": 45.0, "skin": 10.0,
    },
    "venous": {
        "blood": 130.0, "vein": 120.0, "liver": 55.0, "spleen": 70.0, "pancreas": 50.0,
        "bowel_wall": 40.0, "muscle": 12.0, "kidney_cortex": 135.0, "kidney_medulla": 125.0, "skin": 15.0,
    },
    "delayed": {
        "blood": 70.0, "vein": 70.0, "liver": 35.0, "spleen": 35.0, "pancreas": 30.0,
        "bowel_wall": 20.0, "muscle": 8.0, "kidney_cortex": 80.0, "kidney_medulla": 85.0, "urine": 650.0,
        "skin": 8.0,
    },
}

_RANGE_FIELDS = (
    "noise_sigma_hu", "noise_correlation_px", "psf_sigma_mm", "slice_blur_fraction", "hu_scale",
    "hu_offset", "enhancement_scale", "body_half_width_mm", "body_half_depth_mm",
    "subcutaneous_fat_mm", "perirenal_fat_mm", "extra_tumor_ml", "hypervascular_enhancement",
)


@dataclass(frozen=True)
class PhantomParams:
    """Ranges the realistic phantom draws from (each ``(low, high)``, uniform).

    Attributes:
        phases, phase_weights: contrast phases and their probabilities.
        noise_sigma_hu: standard deviation of the image noise.
        noise_correlation_px: in-plane correlation (Gaussian sigma, pixels) of that noise.
        psf_sigma_mm: in-plane point-spread function (Gaussian sigma).
        slice_blur_fraction: slice-profile Gaussian sigma as a fraction of the slice spacing.
        hu_scale, hu_offset: scanner calibration: ``hu * scale + offset``.
        enhancement_scale: contrast dose / timing factor applied to every enhancement.
        body_half_width_mm, body_half_depth_mm: body semi-axes (left-right, anterior-posterior).
        subcutaneous_fat_mm, perirenal_fat_mm: fat thicknesses.
        cyst_probability: chance that a kidney carries (non-tumor) cysts.
        organ_lesion_probability: chance that the liver and spleen carry unlabelled lesions
            (cysts, solid masses that look like renal tumors): hard negatives.
        adrenal_probability: chance that a kidney has an adrenal gland drawn above it (and that
            the spleen has a lobule towards the left kidney): unlabelled hard negatives.
        adrenal_nodule_probability: chance that such an adrenal carries a nodule (adenoma).
        oral_contrast_probability: chance the bowel holds positive oral contrast.
        fov_circle_probability: chance that voxels outside the reconstruction circle are -1024.
        table_probability: chance a patient table shows under the back.
        coarse_spacing_mm: grid on which the anatomy around the kidneys is built, then upsampled.
        cancellous_bone_hu: range of the vertebral bodies' (unenhanced) trabecular bone. Wide since
            2026-12-03: in adults over 50 (KiTS19's median age is 60) an osteoporotic L1 measures
            about 110 HU or less (Pickhardt et al., AJR 2013), in the range of an enhancing tumor; a
            model that never saw such a vertebra called one beside the kidneys tumor. ``None``: the
            generator before, 190 HU with a spread of 25 (remakes older phantoms bit for bit).
        extra_tumors: (low, high) number of tumors grown into each mask's kidneys before the
            image is drawn (uniform integer, both ends included; :mod:`.extra_tumors`); the
            written segmentation holds them. ``(0, 0)``, the default, keeps the mask as it is.
            For training data: more small tumors than the masks hold (model card).
        extra_tumor_ml: (low, high) volume of each extra tumor, drawn log-uniformly.
        hypervascular_probability: chance that a tumor is hypervascular (clear-cell-like); the
            others enhance weakly (papillary/chromophobe-like, 0.1-0.65 of the cortex's enhancement).
        hypervascular_enhancement: a hypervascular tumor's enhancement as a fraction of the renal
            cortex's. Above about 1.1 the tumor is brighter than its kidney; the default (0.6, 1.3)
            makes few such tumors, and models trained on it miss most of them (docs/model_studies.md: "stage 2
            with bright-tumor twins"). Training data may ask for more: (0.6, 1.8) in
            ``scripts/phantoms_bright_tumors.json``.
        ureter_probability: chance, per kidney, that its renal pelvis is drawn leaving the hilum
            (outside the mask: an extrarenal pelvis) and running on as the ureter down the psoas,
            urine-dense (opacified in the excretory phase). On the real non-contrast CT the models
            of rounds 12 and 13 labelled such water-dense hilar tissue tumor. 0, the default, draws
            neither and keeps the phantoms of before bit for bit; training data may ask for it
            (``scripts/phantoms_ureters.json``).
        medulla: ``"radial"`` draws the renal medulla as pyramids under the cortex pointing at
            the sinus; ``"blobs"``, the generator before 2026-12-03, as random patches (kept to
            remake the phantoms older models were trained on).
    """

    phases: tuple[Phase, ...] = PHASES
    phase_weights: tuple[float, ...] = (0.25, 0.3, 0.3, 0.15)
    noise_sigma_hu: tuple[float, float] = (5.0, 30.0)
    noise_correlation_px: tuple[float, float] = (0.6, 1.4)
    psf_sigma_mm: tuple[float, float] = (0.3, 0.8)
    slice_blur_fraction: tuple[float, float] = (0.25, 0.45)
    hu_scale: tuple[float, float] = (0.96, 1.04)
    hu_offset: tuple[float, float] = (-12.0, 12.0)
    enhancement_scale: tuple[float, float] = (0.65, 1.3)
    body_half_width_mm: tuple[float, float] = (140.0, 205.0)
    body_half_depth_mm: tuple[float, float] = (95.0, 150.0)
    subcutaneous_fat_mm: tuple[float, float] = (6.0, 40.0)
    perirenal_fat_mm: tuple[float, float] = (4.0, 18.0)
    cyst_probability: float = 0.4
    organ_lesion_probability: float = 0.5
    adrenal_probability: float = 0.8
    adrenal_nodule_probability: float = 0.25
    oral_contrast_probability: float = 0.4
    fov_circle_probability: float = 0.5
    table_probability: float = 0.7
    coarse_spacing_mm: float = 2.0
    cancellous_bone_hu: tuple[float, float] | None = (70.0, 250.0)
    extra_tumors: tuple[int, int] = (0, 0)
    extra_tumor_ml: tuple[float, float] = (0.5, 20.0)
    hypervascular_probability: float = 0.45
    hypervascular_enhancement: tuple[float, float] = (0.6, 1.3)
    medulla: Literal["radial", "blobs"] = "radial"
    ureter_probability: float = 0.0

    def __post_init__(self) -> None:
        unknown = [p for p in self.phases if p not in PHASES]
        if not self.phases or unknown:
            raise ValueError(f"phases must be a non-empty subset of {PHASES}, got {self.phases}")
        if len(self.phase_weights) != len(self.phases) or min(self.phase_weights) < 0 or sum(self.phase_weights) <= 0:
            raise ValueError("phase_weights must give one non-negative weight per phase, not all zero")
        optional_ranges = () if self.cancellous_bone_hu is None else ("cancellous_bone_hu",)
        for name in _RANGE_FIELDS + optional_ranges:
            low, high = getattr(self, name)
            if not (np.isfinite(low) and np.isfinite(high) and low <= high):
                raise ValueError(f"{name} must be a range (low <= high), got {(low, high)}")
        for name in ("noise_sigma_hu", "noise_correlation_px", "psf_sigma_mm", "hu_scale", "body_half_width_mm",
                     "body_half_depth_mm", "slice_blur_fraction", "hypervascular_enhancement"):
            if getattr(self, name)[0] < 0:
                raise ValueError(f"{name} must not be negative, got {getattr(self, name)}")
        if not self.hu_scale[0] > 0:  # a scale of 0 draws a blank image
            raise ValueError(f"hu_scale must be above 0, got {self.hu_scale}")
        for name in ("cyst_probability", "organ_lesion_probability", "adrenal_probability",
                     "adrenal_nodule_probability", "hypervascular_probability", "oral_contrast_probability",
                     "fov_circle_probability", "table_probability", "ureter_probability"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be a probability in [0, 1], got {getattr(self, name)}")
        low, high = self.extra_tumors
        whole = all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in (low, high))
        if not (whole and 0 <= low <= high):
            raise ValueError(f"extra_tumors must be a range of whole numbers, 0 <= low <= high, got {self.extra_tumors}")
        if not self.extra_tumor_ml[0] > 0:  # drawn log-uniformly
            raise ValueError(f"extra_tumor_ml must be positive volumes in mL, got {self.extra_tumor_ml}")
        if self.medulla not in ("radial", "blobs"):
            raise ValueError(f"medulla must be 'radial' or 'blobs', got {self.medulla!r}")
        if not self.coarse_spacing_mm > 0:
            raise ValueError(f"coarse_spacing_mm must be > 0, got {self.coarse_spacing_mm}")

    def to_dict(self) -> dict[str, Any]:
        return {f.name: list(v) if isinstance(v := getattr(self, f.name), tuple) else v
                for f in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "PhantomParams":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"PhantomParams: unknown field(s) {', '.join(unknown)}; valid: {', '.join(sorted(names))}")
        defaults = cls()
        optional = {f.name for f in dataclasses.fields(cls) if "None" in str(f.type)}
        for name, value in data.items():  # the kind each field takes, named, before any arithmetic on it
            if not (value is None and name in optional):
                _check_kind(name, value, getattr(defaults, name))
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in data.items()})


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)


def _check_kind(name: str, value: Any, default: Any) -> None:
    """``value`` is of the kind ``default`` is: a range of two numbers, a list of names or numbers,
    a number, a switch or a text."""
    if isinstance(default, tuple):
        numbers = all(_is_number(v) for v in default)
        is_range = numbers and name != "phase_weights"  # phase_weights: one number per phase
        ok = (isinstance(value, (list, tuple)) and all(_is_number(v) if numbers else isinstance(v, str) for v in value)
              and (not is_range or len(value) == 2))
        kind = "a range [low, high]" if is_range else "a list of numbers" if numbers else "a list of names"
    elif isinstance(default, bool):
        ok, kind = isinstance(value, bool), "true or false"
    elif _is_number(default):
        ok, kind = _is_number(value), "a number"
    else:
        ok, kind = isinstance(value, type(default)), "a text" if isinstance(default, str) else type(default).__name__
    if not ok:
        raise ValueError(f"{name} must be {kind}, got {value!r}")


@dataclass(frozen=True)
class Protocol:
    """One case's draw: contrast phase, tissue values and scanner settings."""

    phase: Phase
    hu: dict[str, float]
    enhancement: float
    noise_sigma_hu: float
    noise_correlation_px: float
    psf_sigma_mm: float
    slice_blur_fraction: float
    hu_scale: float
    hu_offset: float
    oral_contrast: bool
    fov_circle: bool
    table: bool


def _uniform(rng: np.random.Generator, bounds: tuple[float, float]) -> float:
    return float(rng.uniform(bounds[0], bounds[1]))


def sample_protocol(rng: np.random.Generator, params: PhantomParams) -> Protocol:
    """Draw a contrast phase and per-tissue HU (case-to-case spread included) from ``params``."""
    weights = np.asarray(params.phase_weights, dtype=float)
    phase: Phase = params.phases[int(rng.choice(len(params.phases), p=weights / weights.sum()))]
    enhancement = _uniform(rng, params.enhancement_scale)
    deltas = ENHANCEMENT_HU[phase]
    hu, standard_draw = {}, {}
    for tissue, base in UNENHANCED_HU.items():
        spread = 0.0 if tissue in ("air",) else (25.0 if tissue.startswith("bone") or tissue == "rib" else 5.0)
        enhanced = base + enhancement * deltas.get(tissue, 0.0) * float(rng.uniform(0.85, 1.15))
        standard_draw[tissue] = float(rng.normal(0.0, 1.0))
        hu[tissue] = enhanced + spread * standard_draw[tissue]
    if params.cancellous_bone_hu is not None:
        # The same normal draw, mapped through its CDF onto the range: no extra draw, so the rest
        # of the case (anatomy, tumor, noise) is what it was with the narrow range.
        low, high = params.cancellous_bone_hu
        quantile = 0.5 * (1.0 + math.erf(standard_draw["bone_cancellous"] / math.sqrt(2.0)))
        hu["bone_cancellous"] = low + (high - low) * quantile
    return Protocol(
        phase=phase,
        hu=hu,
        enhancement=enhancement,
        noise_sigma_hu=_uniform(rng, params.noise_sigma_hu),
        noise_correlation_px=_uniform(rng, params.noise_correlation_px),
        psf_sigma_mm=_uniform(rng, params.psf_sigma_mm),
        slice_blur_fraction=_uniform(rng, params.slice_blur_fraction),
        hu_scale=_uniform(rng, params.hu_scale),
        hu_offset=_uniform(rng, params.hu_offset),
        oral_contrast=bool(rng.random() < params.oral_contrast_probability),
        fov_circle=bool(rng.random() < params.fov_circle_probability),
        table=bool(rng.random() < params.table_probability),
    )
