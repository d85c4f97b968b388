"""Grid helpers shared by the realistic phantom: block down-sampling, linear up-sampling, smooth noise.

A coarse grid with integer factors ``f`` per axis has ``ceil(n / f)`` voxels; coarse voxel ``i``
is centred on fine index ``i * f + (f - 1) / 2`` (the ``align_corners=False`` convention), so
up-sampling puts every structure back where it was built.
"""

from __future__ import annotations

import math

import numpy as np
from scipy import ndimage


def coarse_factors(spacing: tuple[float, float, float], target_mm: tuple[float, float, float]) -> tuple[int, int, int]:
    """Integer factors that bring ``spacing`` close to (never below) ``target_mm`` per axis."""
    return tuple(max(1, int(round(t / s))) for s, t in zip(spacing, target_mm))


def coarse_shape(shape: tuple[int, ...], factors: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(math.ceil(n / f) for n, f in zip(shape, factors))


def block_any(mask: np.ndarray, factors: tuple[int, int, int]) -> np.ndarray:
    """Down-sample a boolean mask: a coarse voxel is True when any of its fine voxels is."""
    cshape = coarse_shape(mask.shape, factors)
    padded = np.zeros([c * f for c, f in zip(cshape, factors)], dtype=bool)
    padded[: mask.shape[0], : mask.shape[1], : mask.shape[2]] = mask
    (cz, cy, cx), (fz, fy, fx) = cshape, factors
    return padded.reshape(cz, fz, cy, fy, cx, fx).any(axis=(1, 3, 5))


def block_mean(values: np.ndarray, factors: tuple[int, int, int]) -> np.ndarray:
    """Down-sample by block averaging (edge blocks padded by replication)."""
    cshape = coarse_shape(values.shape, factors)
    pad = [(0, c * f - n) for c, f, n in zip(cshape, factors, values.shape)]
    padded = np.pad(values.astype(np.float32, copy=False), pad, mode="edge")
    (cz, cy, cx), (fz, fy, fx) = cshape, factors
    return padded.reshape(cz, fz, cy, fy, cx, fx).mean(axis=(1, 3, 5), dtype=np.float32)


def _axis_weights(n_fine: int, n_coarse: int, factor: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    u = (np.arange(n_fine, dtype=np.float64) + 0.5) / factor - 0.5
    u = np.clip(u, 0.0, n_coarse - 1)
    i0 = np.floor(u).astype(np.intp)
    i1 = np.minimum(i0 + 1, n_coarse - 1)
    return i0, i1, (u - i0).astype(np.float32)


def upsample_axis(array: np.ndarray, axis: int, factor: int, n_fine: int,
                  index: np.ndarray | slice | None = None) -> np.ndarray:
    """Linear up-sampling of ``array`` along ``axis`` by ``factor`` to ``n_fine`` samples.

    ``index`` optionally selects which fine samples to produce (a slab of slices, say).
    """
    i0, i1, w = _axis_weights(n_fine, array.shape[axis], factor)
    if index is not None:
        i0, i1, w = i0[index], i1[index], w[index]
    if factor == 1 and array.shape[axis] == n_fine and index is None:
        return array
    shape = [1] * array.ndim
    shape[axis] = len(w)
    w = w.reshape(shape)
    a0 = np.take(array, i0, axis=axis)
    a1 = np.take(array, i1, axis=axis)
    a1 -= a0
    a1 *= w
    a0 += a1
    return a0


def upsample(array: np.ndarray, factors: tuple[int, ...], shape: tuple[int, ...]) -> np.ndarray:
    """Separable linear up-sampling of a coarse (Z, Y, X) array to the fine ``shape``."""
    out = array.astype(np.float32, copy=False)
    for axis in (2, 1, 0):  # the last pass is the largest: do the small axes first
        out = upsample_axis(out, axis, factors[axis], shape[axis])
    return out


def smooth_field(rng: np.random.Generator, shape: tuple[int, int, int], spacing: tuple[float, float, float],
                 scale_mm: float | tuple[float, float, float]) -> np.ndarray:
    """Zero-mean, roughly unit-variance Gaussian random field with correlation length ``scale_mm``.

    Drawn on a grid about ``scale_mm`` coarse, lightly smoothed there and linearly up-sampled:
    the cost is one up-sampling pass whatever the correlation length.
    """
    scales = np.broadcast_to(np.asarray(scale_mm, dtype=float), (3,))
    factors = tuple(max(1, int(round(s / d))) for s, d in zip(scales, spacing))
    small = coarse_shape(shape, factors)
    noise = rng.standard_normal(small, dtype=np.float32)
    sigma = [0.7 if n > 2 else 0.0 for n in small]
    noise = ndimage.gaussian_filter(noise, sigma, mode="wrap", truncate=2.5)
    noise -= float(noise.mean())
    # Linear up-sampling lowers the variance between grid points; 0.8 compensates on average.
    noise /= max(float(noise.std()), 1e-6) * (0.8 if max(factors) > 1 else 1.0)
    return upsample(noise, factors, shape)
