"""Where voxels sit in the world, and the one internal orientation the pipeline works in.

Every array inside the engine is *slice-first* in the KiTS19 orientation: axis codes
``("I", "P", "L")`` in nibabel's convention, i.e. axis 0 runs superior -> inferior, axis 1
anterior -> posterior (image rows, anterior at the top) and axis 2 patient-right -> left
(image columns, the radiological view). KiTS19 files are already stored like this, so a
model trained on KiTS19-layout data sees real KiTS19 scans without any transform.

A file in another orientation (RAS, LPS, an oblique affine...) is brought to the internal
orientation by axis permutations and flips only -- never by resampling -- so the way back
to the file's exact grid is lossless. :class:`Volume` carries the array, its internal
affine and the :class:`SourceGrid` needed to undo the reorientation.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from nibabel import orientations as nio

#: The internal orientation (nibabel axis codes: the direction each axis increases towards).
INTERNAL_AXCODES: tuple[str, str, str] = ("I", "P", "L")


def voxel_spacing(affine: np.ndarray) -> tuple[float, float, float]:
    """Voxel size in mm along each array axis (column norms of the affine's 3x3 part)."""
    return tuple(float(v) for v in np.linalg.norm(np.asarray(affine)[:3, :3], axis=0))


@dataclass(frozen=True)
class SourceGrid:
    """The grid of the file a volume was read from, and how to return to it.

    ``to_internal`` is a nibabel orientation transform (``ornt``, shape (3, 2)): applying it
    to an array on the source grid gives the internal array; :meth:`to_source` undoes it.
    """

    shape: tuple[int, int, int]
    affine: np.ndarray
    to_internal: np.ndarray
    path: Path | None = None
    #: The code outputs' sform is written with: the file's own; 0 where it declared no orientation
    #: (the affine is then nibabel's guess from the voxel sizes) or declared it in its qform only.
    #: Outputs carry the file's codes, so every viewer reads them as it reads the CT.
    xform_code: int = 1
    #: The file's own qform (matrix, code) where it declares an orientation, written back as it
    #: was (a viewer that reads the qform must place the outputs as it places the CT); None: the
    #: affine is written as the qform too, with ``xform_code``.
    qform: tuple[np.ndarray, int] | None = None
    #: The spatial unit of the file's header ("mm", or "meter" / "micron": the affines here are in
    #: mm all the same); outputs are written in the file's own unit, so that they carry its
    #: numbers exactly, for viewers that ignore the unit too.
    xyz_unit: str = "mm"

    @property
    def declares_orientation(self) -> bool:
        """Whether the file gave its axes' directions (an sform or qform code), not nibabel's guess."""
        return self.xform_code > 0 or (self.qform is not None and self.qform[1] > 0)

    @property
    def axcodes(self) -> tuple[str, str, str]:
        return tuple(nio.ornt2axcodes(file_orientation(self.affine)))

    def internal_shape(self) -> tuple[int, int, int]:
        return tuple(int(n) for n in nio.apply_orientation(np.empty(self.shape, np.bool_), self.to_internal).shape)

    def internal_affine(self) -> np.ndarray:
        """The affine of the internal array: same world positions, permuted/flipped axes."""
        return self.affine @ nio.inv_ornt_aff(self.to_internal, self.shape)

    def to_source(self, internal_array: np.ndarray) -> np.ndarray:
        """Bring an array (3D, or 3D + trailing channel axes) from the internal to the source grid."""
        expected = self.internal_shape()
        if tuple(internal_array.shape[:3]) != expected:
            raise ValueError(
                f"array of shape {internal_array.shape} is not on this volume's grid {expected}"
            )
        back = nio.ornt_transform(INTERNAL_ORNT, file_orientation(self.affine))
        return to_c_order(nio.apply_orientation(internal_array, back))


INTERNAL_ORNT = nio.axcodes2ornt(INTERNAL_AXCODES)


def file_orientation(affine: np.ndarray) -> np.ndarray:
    """The world axis each array axis of ``affine`` runs nearest (nibabel's ``io_orientation``),
    its direction cosines rounded to 1e-4 first: a grid turned 45 degrees is a tie, which rounding
    noise in two files of the same grid (a CT and its labels) must not break two ways."""
    rzs = np.asarray(affine, np.float64)[:3, :3]
    directions = rzs / np.linalg.norm(rzs, axis=0)
    rounded = np.eye(4)
    rounded[:3, :3] = np.round(directions, 4)
    ornt = nio.io_orientation(rounded)
    # Axes so near parallel that rounding merges them (a grid no scanner makes): as nibabel reads them.
    return nio.io_orientation(affine) if np.isnan(ornt).any() else ornt


def to_c_order(array: np.ndarray, tile: int = 64) -> np.ndarray:
    """``np.ascontiguousarray``, copied tile by tile (``tile`` x ``tile`` over axes 1 and 2) when
    the first axis is the fastest-varying one in memory.

    That is the case for a KiTS19-layout file (slices on the file's first axis, stored in
    Fortran order, as NIfTI stores): its C-ordered copy is a 3D transpose. NumPy's single pass
    strides across the whole volume for every voxel written (3.6 s for a 602 x 512 x 512 label
    map on a 2-core Xeon); a tile at a time keeps the reads in cache (0.4 s,
    ``benchmarks/bench_io.py``). Other layouts (slices on the file's last axis) are nearly C
    ordered already and take NumPy's copy.
    """
    if tile < 1:
        raise ValueError(f"tile must be >= 1, got {tile}")
    if array.flags.c_contiguous or array.ndim < 3 or abs(array.strides[0]) >= abs(array.strides[2]):
        return np.ascontiguousarray(array)
    out = np.empty(array.shape, array.dtype)
    for y in range(0, array.shape[1], tile):
        for x in range(0, array.shape[2], tile):
            out[:, y:y + tile, x:x + tile] = array[:, y:y + tile, x:x + tile]
    return out


def source_grid_for(shape: tuple[int, ...], affine: np.ndarray, path: Path | None = None, xform_code: int = 1,
                    qform: tuple[np.ndarray, int] | None = None, xyz_unit: str = "mm") -> SourceGrid:
    """Describe a file's grid and the permutation/flips that make it slice-first (I, P, L)."""
    if len(shape) != 3:
        raise ValueError(f"expected a 3D volume, got shape {tuple(shape)}")
    affine = np.asarray(affine, dtype=np.float64)
    if affine.shape != (4, 4) or not np.all(np.isfinite(affine)):
        raise ValueError("the affine must be a finite 4x4 matrix")
    if abs(np.linalg.det(affine[:3, :3])) < 1e-12:
        raise ValueError("the affine is singular (zero voxel size or collinear axes)")
    to_internal = nio.ornt_transform(file_orientation(affine), INTERNAL_ORNT)
    return SourceGrid(tuple(int(n) for n in shape), affine, to_internal, path, xform_code, qform, xyz_unit)


@dataclass
class Volume:
    """A 3D image in the internal orientation, with its geometry.

    Attributes:
        array: shape (Z, Y, X) = (slices, rows, cols), axis codes (I, P, L).
        affine: 4x4 voxel -> world (RAS+ mm) affine of ``array``.
        source: the grid of the file it came from; results are written back there.
    """

    array: np.ndarray
    affine: np.ndarray
    source: SourceGrid = field(repr=False)

    @property
    def shape(self) -> tuple[int, int, int]:
        """The grid's (Z, Y, X); channel axes, if any, trail in ``array``."""
        return tuple(self.array.shape[:3])

    @property
    def spacing(self) -> tuple[float, float, float]:
        """Voxel size in mm along (Z, Y, X)."""
        return voxel_spacing(self.affine)

    @property
    def name(self) -> str:
        return "volume" if self.source.path is None else strip_nifti_suffix(self.source.path.name)

    @classmethod
    def from_source_array(
        cls, array: np.ndarray, affine: np.ndarray, path: Path | None = None, xform_code: int = 1,
        qform: tuple[np.ndarray, int] | None = None, xyz_unit: str = "mm",
    ) -> "Volume":
        """Wrap an array stored on a file's grid (any orientation) as an internal volume.

        Trailing channel axes (3D + channels, as NIfTI stores vector data) are carried along,
        the reverse of :meth:`SourceGrid.to_source`.
        """
        grid = source_grid_for(array.shape[:3], affine, path, xform_code, qform, xyz_unit)
        internal = to_c_order(nio.apply_orientation(array, grid.to_internal))
        return cls(internal, grid.internal_affine(), grid)

    @classmethod
    def from_internal(cls, array: np.ndarray, source: SourceGrid) -> "Volume":
        """Wrap an internal-orientation array that lies on ``source``'s grid."""
        if tuple(array.shape[:3]) != source.internal_shape():
            raise ValueError(f"array of shape {array.shape} is not on the grid {source.internal_shape()}")
        return cls(array, source.internal_affine(), source)

    def like(self, array: np.ndarray) -> "Volume":
        """Another array on this volume's internal grid (a label map, a probability map...)."""
        if tuple(array.shape[:3]) != self.shape:
            raise ValueError(f"array of shape {array.shape} does not match the volume {self.shape}")
        return Volume(array, self.affine, self.source)

    def to_source(self) -> np.ndarray:
        """The array on the source file's grid (for writing)."""
        return self.source.to_source(self.array)


def strip_nifti_suffix(filename: str) -> str:
    for suffix in (".nii.gz", ".nii"):
        if filename.lower().endswith(suffix):
            return filename[: -len(suffix)]
    return Path(filename).stem
