"""Inside the real kidney mask: cortex, medulla, sinus and pelvis, cysts, and the tumor's texture.

Work happens on a crop around the foreground at full resolution; the smooth fields (depth under
the kidney surface, pyramids, tumor texture) are computed on an intermediate grid (~1.5-2 mm)
and up-sampled, while tissue *boundaries* always come from the full-resolution labels, so the
image agrees voxel for voxel with the segmentation.

Cysts are painted inside label 1 (kidney): in KiTS19 a cyst is kidney, not tumor, and their
fluid density keeps a single HU threshold from telling tumor apart.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from ._grid import block_mean, coarse_factors, smooth_field, upsample
from .params import UNENHANCED_HU, PhantomParams, Protocol

KIDNEY, TUMOR = 1, 2


@dataclass(frozen=True)
class TumorLook:
    """How one case's tumor looks: drawn per case so that tumor and kidney HU overlap across cases."""

    unenhanced_hu: float
    enhancement_ratio: float  # fraction of the renal cortex's enhancement
    heterogeneity_hu: float
    texture_mm: float
    necrosis: bool
    necrosis_fraction: float
    necrosis_hu: float
    rim_hu: float
    calcification: bool
    fat: bool


def sample_tumor_look(rng: np.random.Generator, protocol: Protocol, params: PhantomParams) -> TumorLook:
    hypervascular = rng.random() < params.hypervascular_probability  # clear-cell-like
    low, high = params.hypervascular_enhancement if hypervascular else (0.1, 0.65)  # papillary/chromophobe-like
    ratio = float(rng.uniform(low, high))
    if protocol.phase == "delayed" and hypervascular:
        ratio *= float(rng.uniform(0.5, 0.9))  # wash-out
    unenhanced = float(rng.uniform(50.0, 70.0) if rng.random() < 0.1 else rng.uniform(22.0, 45.0))
    return TumorLook(
        unenhanced_hu=unenhanced,
        enhancement_ratio=ratio,
        heterogeneity_hu=float(rng.uniform(4.0, 35.0)),
        texture_mm=float(rng.uniform(2.0, 7.0)),
        necrosis=bool(rng.random() < 0.55),
        necrosis_fraction=float(rng.uniform(0.25, 0.6)),
        necrosis_hu=float(rng.uniform(5.0, 30.0)),
        rim_hu=float(rng.uniform(0.0, 40.0)) if hypervascular else 0.0,
        calcification=bool(rng.random() < 0.08),
        fat=bool(rng.random() < 0.04),
    )


def foreground_crop(labels: np.ndarray, spacing: tuple[float, float, float], margin_mm: float) -> tuple[slice, ...] | None:
    """Bounding box of labels > 0, grown by ``margin_mm`` and clipped to the array."""
    fg = labels > 0
    if not fg.any():
        return None
    crop = []
    for axis, (d, n) in enumerate(zip(spacing, labels.shape)):
        hit = np.nonzero(fg.any(axis=tuple(a for a in range(3) if a != axis)))[0]
        grow = int(np.ceil(margin_mm / d))
        crop.append(slice(max(0, int(hit[0]) - grow), min(n, int(hit[-1]) + 1 + grow)))
    return tuple(crop)


def kidney_crop_hu(
    labels: np.ndarray,
    background: np.ndarray,
    spacing: tuple[float, float, float],
    crop_origin_x_mm: float,
    spine_x_mm: float,
    protocol: Protocol,
    params: PhantomParams,
    rng: np.random.Generator,
) -> tuple[np.ndarray, TumorLook]:
    """HU of a crop (Z, Y, X): kidney and tumor painted over ``background``, then blurred; and
    the tumor's drawn look (drawn whether or not the crop holds a tumor).

    Args:
        labels: the crop of the label map (0 background, 1 kidney, 2 tumor).
        background: the crop of the up-sampled abdomen (HU), same shape.
        crop_origin_x_mm: x (mm, full grid) of the crop's first column.
        spine_x_mm: x of the spine centre, to know which side is medial (the hilum faces the spine).
    """
    hu_of = protocol.hu
    shape = labels.shape
    fg = labels > 0
    kidney = labels == KIDNEY
    tumor = labels == TUMOR
    factors = coarse_factors(spacing, (2.0, 1.5, 1.5))
    ispacing = tuple(d * f for d, f in zip(spacing, factors))
    ishape = tuple(int(np.ceil(n / f)) for n, f in zip(shape, factors))
    fg_i = ndimage.binary_fill_holes(block_mean(fg, factors) >= 0.5)
    depth, nearest_outside = ndimage.distance_transform_edt(fg_i, sampling=ispacing, return_indices=True)
    depth = depth.astype(np.float32)

    # Medial direction per column: towards the spine.
    x_i = crop_origin_x_mm + (np.arange(ishape[2]) * factors[2] + (factors[2] - 1) / 2) * spacing[2]
    side = np.where(x_i < spine_x_mm, -1.0, 1.0).astype(np.float32)  # -1: patient right kidney
    # Centre of each kidney's columns, per side, from the intermediate mask.
    cols = np.nonzero(fg_i.any(axis=(0, 1)))[0]
    medial = np.zeros(ishape[2], np.float32)
    for s in (-1.0, 1.0):
        on_side = cols[side[cols] == s]
        if on_side.size:
            centre = x_i[on_side].mean()
            medial[side == s] = (centre - x_i[side == s]) * s  # mm towards the spine from the kidney centre
    medial = medial[None, None, :]

    # --- parenchyma: cortex rim, medullary pyramids, sinus (fat) and pelvis (urine / excreted contrast)
    cortex_t = float(rng.uniform(4.0, 7.5))
    if params.medulla == "blobs":  # the generator before 2026-12-03: remakes older phantoms bit for bit
        pyramids = smooth_field(rng, ishape, ispacing, 4.0)
        w_med = _sigmoid((depth - cortex_t) / 1.0) * _sigmoid((pyramids + 0.4) / 0.25)
        k_hu = hu_of["kidney_cortex"] * (1.0 - w_med) + hu_of["kidney_medulla"] * w_med
        k_hu += 4.0 * smooth_field(rng, ishape, ispacing, 3.0)
        sinus_depth = float(rng.uniform(10.0, 16.0))
    else:
        sinus_depth = float(rng.uniform(10.0, 16.0))
        w_med = radial_pyramids(depth, nearest_outside, ispacing, cortex_t, sinus_depth, rng)
        k_hu = hu_of["kidney_cortex"] * (1.0 - w_med) + hu_of["kidney_medulla"] * w_med
        k_hu += 4.0 * smooth_field(rng, ishape, ispacing, 3.0)
    sinus = (depth > sinus_depth) & (medial > -3.0)
    sinus_hu = UNENHANCED_HU["fat"] + float(rng.uniform(30.0, 70.0)) + 15.0 * smooth_field(rng, ishape, ispacing, 3.0)
    k_hu = np.where(sinus, sinus_hu, k_hu)
    pelvis = sinus & (depth > sinus_depth + 2.0) & (medial > 4.0)
    k_hu = np.where(pelvis, hu_of["urine"], k_hu)

    # --- tumor
    look = sample_tumor_look(rng, protocol, params)
    cortex_gain = hu_of["kidney_cortex"] - UNENHANCED_HU["kidney_cortex"]
    t_base = look.unenhanced_hu + look.enhancement_ratio * max(cortex_gain, 0.0)
    texture = smooth_field(rng, ishape, ispacing, look.texture_mm)
    t_hu = t_base + look.heterogeneity_hu * texture
    if tumor.any():
        tumor_i = block_mean(tumor, factors) >= 0.5
        tdepth = ndimage.distance_transform_edt(tumor_i, sampling=ispacing).astype(np.float32)
        max_depth = float(tdepth.max())
        if look.rim_hu > 0:
            t_hu += look.rim_hu * protocol.enhancement * _sigmoid((3.0 - tdepth) / 1.0)
        if look.necrosis and max_depth > 6.0:
            wobble = 0.15 * max_depth * smooth_field(rng, ishape, ispacing, 6.0)
            core = _sigmoid((tdepth - look.necrosis_fraction * max_depth - wobble) / 1.5)
            t_hu = t_hu * (1.0 - core) + (look.necrosis_hu + 5.0 * texture) * core
        spots = smooth_field(rng, ishape, ispacing, 2.0)
        if look.calcification:
            t_hu = np.where(spots > 2.6, t_hu + float(rng.uniform(200.0, 500.0)), t_hu)
        if look.fat:
            t_hu = np.where(spots < -1.6, -60.0 + 10.0 * texture, t_hu)

    out = background.astype(np.float32, copy=True)
    out[kidney] = upsample(k_hu.astype(np.float32), factors, shape)[kidney]
    if tumor.any():
        out[tumor] = upsample(t_hu.astype(np.float32), factors, shape)[tumor]

    # --- cysts: fluid (sometimes proteinaceous, hyperdense) inside label 1 only
    if rng.random() < params.cyst_probability:
        candidates = np.argwhere((depth > 0) & (depth < 6.0) & (block_mean(kidney, factors) >= 0.5))
        for _ in range(min(1 + int(rng.poisson(0.8)), 4)):
            if not len(candidates):
                break
            centre = (candidates[rng.integers(len(candidates))] * factors + (np.asarray(factors) - 1) / 2) * spacing
            radius = float(rng.uniform(3.0, 14.0))
            cyst_hu = float(rng.uniform(40.0, 75.0) if rng.random() < 0.2 else rng.uniform(-5.0, 20.0))
            region = _ball_region(centre, radius, spacing, shape)
            if region is None:
                continue
            sl, ball = region
            inside = ball & kidney[sl]
            out[sl][inside] = cyst_hu

    sigma = (protocol.slice_blur_fraction,) + (protocol.psf_sigma_mm / spacing[1], protocol.psf_sigma_mm / spacing[2])
    return ndimage.gaussian_filter(out, sigma, mode="nearest", truncate=3.0), look


def radial_pyramids(
    depth: np.ndarray,
    nearest_outside: np.ndarray,
    spacing: tuple[float, float, float],
    cortex_mm: float,
    sinus_depth_mm: float,
    rng: np.random.Generator,
) -> np.ndarray:
    """Medulla weight (0-1): pyramids under the cortex, narrowing towards the sinus.

    A kidney's medulla is a ring of cone-shaped pyramids, their bases under a cortex of even
    thickness, their tips (papillae) pointing at the sinus, the cortex reaching down between
    them as the renal columns. Drawn as a random pattern on the kidney's surface carried straight
    inwards (each voxel reads it at its nearest point outside the kidney, ``nearest_outside``
    from the distance transform), with a threshold that rises with depth so that each pyramid
    narrows to its tip. Random blobs instead would look like small dark tumors in the
    corticomedullary phase, which a real medulla does not: its regular pattern is what a tumor breaks.
    """
    surface_pattern = smooth_field(rng, depth.shape, spacing, 5.0)[tuple(nearest_outside)]
    irregularity = 0.25 * smooth_field(rng, depth.shape, spacing, 3.0)
    below_cortex = np.clip((depth - cortex_mm) / max(sinus_depth_mm - cortex_mm, 1.0), 0.0, 1.0)
    threshold = -0.25 + 1.3 * below_cortex  # about 60% of the base area is pyramid, 15% at the tips
    return _sigmoid((depth - cortex_mm) / 1.0) * _sigmoid((surface_pattern + irregularity - threshold) / 0.2)


def _ball_region(centre_mm, radius_mm, spacing, shape):
    lo = [max(0, int(np.floor((c - radius_mm) / d))) for c, d in zip(centre_mm, spacing)]
    hi = [min(n, int(np.ceil((c + radius_mm) / d)) + 1) for c, d, n in zip(centre_mm, spacing, shape)]
    if any(h <= low for low, h in zip(lo, hi)):
        return None
    grids = np.ogrid[tuple(slice(low, h) for low, h in zip(lo, hi))]
    d2 = sum(((g * d - c) / radius_mm) ** 2 for g, d, c in zip(grids, spacing, centre_mm))
    return tuple(slice(low, h) for low, h in zip(lo, hi)), d2 < 1.0


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return (0.5 * (1.0 + np.tanh(0.5 * x))).astype(np.float32)
