"""Resampling to the networks' grid and back, and intensity normalization.

The *stage grid* is the CT resampled to ``slice_spacing_mm`` along the slice axis (5 mm in the
paper) and, optionally, to ``inplane_spacing_mm`` in-plane. Resampling is separable and linear
with half-pixel-centre alignment (the two grids cover the same physical extent), written as
one small weight matrix per axis. That makes every step:

- exactly invertible in geometry: the same matrices, built the other way, map stage-grid
  probabilities back onto the source grid, where they are argmaxed (no nearest-neighbour stairs);
- streamable: an output slice needs only the few input slices its matrix row touches, so a
  1059-slice CT never has to exist as float32 in memory at once.

Downsampling widens the linear kernel by the zoom factor (anti-aliasing, as torch's
``interpolate(..., antialias=True)``), so 5 mm slices average the thin slices they cover like a
thick reconstruction would.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Iterator

import numpy as np

from .config import PreprocessingConfig
from .geometry import Volume, voxel_spacing


def resampling_matrix(n_in: int, n_out: int) -> np.ndarray:
    """Weights (n_out, n_in) of linear resampling from n_in to n_out samples over the same extent.

    Output sample j sits at input coordinate ``(j + 0.5) * n_in / n_out - 0.5``; each row sums to 1.
    """
    if n_in < 1 or n_out < 1:
        raise ValueError(f"sizes must be >= 1, got {n_in} -> {n_out}")
    if n_in == n_out:
        return np.eye(n_in, dtype=np.float32)
    scale = n_in / n_out
    support = max(scale, 1.0)  # kernel half-width in input samples; > 1 when downsampling
    centres = (np.arange(n_out) + 0.5) * scale - 0.5
    centres = np.clip(centres, 0.0, n_in - 1.0)
    inputs = np.arange(n_in)
    weights = np.maximum(0.0, 1.0 - np.abs(inputs[None, :] - centres[:, None]) / support)
    weights /= weights.sum(axis=1, keepdims=True)
    return weights.astype(np.float32)


def _rows_nonzero(matrix: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per output row, the input indices it reads and their weights (the matrix is banded)."""
    rows = []
    for row in matrix:
        idx = np.flatnonzero(row)
        rows.append((idx, row[idx]))
    return rows


@dataclass(frozen=True)
class StageGrid:
    """The networks' grid for one CT, and the matrices between it and the CT's internal grid.

    Attributes:
        source_shape: internal (Z, Y, X) shape of the CT.
        source_affine: internal affine of the CT.
        shape: (Zs, Ys, Xs) of the stage grid.
    """

    source_shape: tuple[int, int, int]
    source_affine: np.ndarray
    shape: tuple[int, int, int]

    @classmethod
    def for_volume(cls, volume: Volume, config: PreprocessingConfig) -> "StageGrid":
        return cls.for_config(volume.shape, volume.affine, config)

    @classmethod
    def for_config(cls, shape: tuple[int, int, int], affine: np.ndarray, config: PreprocessingConfig) -> "StageGrid":
        """The stage grid of an internal (Z, Y, X) grid with this affine (no image needed)."""
        spacing = voxel_spacing(affine)
        targets = (config.slice_spacing_mm, config.inplane_spacing_mm, config.inplane_spacing_mm)
        stage_shape = tuple(
            n if target is None else max(1, int(round(n * s / target)))
            for n, s, target in zip(shape, spacing, targets)
        )
        return cls(tuple(int(n) for n in shape), np.asarray(affine, dtype=np.float64), stage_shape)

    @property
    def zoom(self) -> tuple[float, float, float]:
        """Source voxels per stage voxel along each axis (> 1: the stage grid is coarser)."""
        return tuple(a / b for a, b in zip(self.source_shape, self.shape))

    @cached_property
    def affine(self) -> np.ndarray:
        """Voxel -> world affine of the stage grid (same world extent as the source)."""
        zoom = np.asarray(self.zoom)
        to_source_index = np.eye(4)
        to_source_index[:3, :3] = np.diag(zoom)
        to_source_index[:3, 3] = (zoom - 1.0) / 2.0
        return self.source_affine @ to_source_index

    @property
    def spacing(self) -> tuple[float, float, float]:
        return voxel_spacing(self.affine)

    # Matrices: forward (source -> stage) and back (stage -> source), per axis.
    @cached_property
    def _forward(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return tuple(resampling_matrix(a, b) for a, b in zip(self.source_shape, self.shape))

    @cached_property
    def _back(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return tuple(resampling_matrix(b, a) for a, b in zip(self.source_shape, self.shape))

    @property
    def inplane_identity(self) -> bool:
        return self.shape[1:] == self.source_shape[1:]

    def _inplane(self, plane: np.ndarray, back: bool) -> np.ndarray:
        """Resample (..., Y, X) planes in-plane with the per-axis matrices."""
        if self.inplane_identity:
            return plane
        _, wy, wx = self._back if back else self._forward
        return np.matmul(np.matmul(wy, plane), wx.T)

    def iter_to_stage(self, source: np.ndarray) -> Iterator[tuple[int, np.ndarray]]:
        """Yield (stage slice index, float32 (Ys, Xs) slice) from a source (Z, Y, X) array."""
        if tuple(source.shape) != self.source_shape:
            raise ValueError(f"array of shape {source.shape} is not on the source grid {self.source_shape}")
        for j, (idx, w) in enumerate(_rows_nonzero(self._forward[0])):
            plane = np.tensordot(w, source[idx].astype(np.float32, copy=False), axes=(0, 0))
            yield j, self._inplane(plane, back=False).astype(np.float32, copy=False)

    def to_stage(self, source: np.ndarray) -> np.ndarray:
        """Resample a source (Z, Y, X) array onto the stage grid (float32)."""
        out = np.empty(self.shape, np.float32)
        for j, plane in self.iter_to_stage(source):
            out[j] = plane
        return out

    def iter_to_source(self, stage: np.ndarray, z_range: tuple[int, int] | None = None) -> Iterator[tuple[int, np.ndarray]]:
        """Yield (source slice index, float32 slice) from a stage array (..., Zs, Ys, Xs).

        Leading axes (class channels) are carried along: each yielded slice is (..., Y, X).
        ``z_range`` limits the source slices produced (the rest are left to the caller).
        """
        if tuple(stage.shape[-3:]) != self.shape:
            raise ValueError(f"array of shape {stage.shape} is not on the stage grid {self.shape}")
        rows = _rows_nonzero(self._back[0])
        start, stop = z_range if z_range is not None else (0, self.source_shape[0])
        for i in range(start, stop):
            idx, w = rows[i]
            plane = np.tensordot(stage[..., idx, :, :].astype(np.float32, copy=False), w, axes=([-3], [0]))
            yield i, self._inplane(plane, back=True).astype(np.float32, copy=False)

    def to_source(self, stage: np.ndarray) -> np.ndarray:
        """Resample a stage array (..., Zs, Ys, Xs) back onto the source grid (float32)."""
        out = np.empty(stage.shape[:-3] + self.source_shape, np.float32)
        for i, plane in self.iter_to_source(stage):
            out[..., i, :, :] = plane
        return out

    def source_z_range(self, stage_z: tuple[int, int]) -> tuple[int, int]:
        """The source slices whose back-resampling reads any stage slice in [start, stop)."""
        back_z = self._back[0][:, stage_z[0] : stage_z[1]]
        touched = np.flatnonzero(back_z.sum(axis=1) > 0)
        if touched.size == 0:
            return (0, 0)
        return int(touched[0]), int(touched[-1]) + 1

    def source_box(self, stage_box: tuple[slice, slice, slice]) -> tuple[slice, slice, slice]:
        """The source region whose back-resampling reads any voxel of a stage box."""
        box = []
        for back, s in zip(self._back, stage_box):
            touched = np.flatnonzero(back[:, s].sum(axis=1) > 0)
            box.append(slice(int(touched[0]), int(touched[-1]) + 1) if touched.size else slice(0, 0))
        return tuple(box)


def normalize(image_hu: np.ndarray, config: PreprocessingConfig) -> np.ndarray:
    """Map HU (float32, any shape) to the networks' intensity range, in place where possible."""
    image = np.asarray(image_hu, dtype=np.float32)
    if config.normalization == "window":
        centre = (config.hu_max + config.hu_min) / 2.0
        half_width = (config.hu_max - config.hu_min) / 2.0
        np.clip(image, config.hu_min, config.hu_max, out=image)
        image -= np.float32(centre)
        image /= np.float32(half_width)
        return image
    # Per-volume z-score as in the paper (statistics over the whole stage volume, float64 sums).
    mean = float(image.mean(dtype=np.float64))
    std = float(image.std(dtype=np.float64))
    image -= np.float32(mean)
    image /= np.float32(std if std > 1e-6 else 1.0)
    return image


@dataclass
class PreparedVolume:
    """A CT on the stage grid, normalized: what both networks read.

    Attributes:
        image: float32 (Zs, Ys, Xs), normalized intensities.
        grid: the stage grid and the way back to ``volume``.
        volume: the CT as read (internal orientation).
        warning: what the CT gave cause to warn about (``Segmenter.prepare``: not HU?), else ``None``.
    """

    image: np.ndarray
    grid: StageGrid
    volume: Volume
    config: PreprocessingConfig
    warning: str | None = None


def prepare(volume: Volume, config: PreprocessingConfig) -> PreparedVolume:
    """Resample a CT to the stage grid and normalize it."""
    grid = StageGrid.for_volume(volume, config)
    image = normalize(grid.to_stage(volume.array), config)
    return PreparedVolume(image=image, grid=grid, volume=volume, config=config)
