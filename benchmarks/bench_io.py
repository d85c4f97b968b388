"""Benchmark: reading a NIfTI into the internal orientation, NumPy's one-pass copy vs tiled.

Usage (from the repository root)::

    PYTHONPATH=src python benchmarks/bench_io.py [--shape 602 512 512]

NIfTI stores voxels in Fortran order, so bringing a KiTS19-layout volume (slices on the file's
first axis) to the engine's C-ordered (slices, rows, cols) array is a 3D transpose. Times, best
of 3, that copy for a KiTS19-sized uint8 label map and int16 CT (default: 602 x 512 x 512, the
size of ``case_00001``) with ``np.ascontiguousarray`` and with :func:`kitseg.geometry.to_c_order`,
checks they are equal, then times ``read_ct`` + ``read_labels`` of such a case written to a
temporary folder.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np

from kitseg.geometry import to_c_order
from kitseg.io import read_ct, read_labels
from kitseg.phantom._nifti import kits_affine

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine  # noqa: E402


def best_of(fn, repeats: int = 3) -> tuple[float, np.ndarray]:
    times, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return min(times), result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", type=int, nargs=3, default=(602, 512, 512), metavar=("Z", "Y", "X"))
    args = parser.parse_args()
    shape = tuple(args.shape)
    rng = np.random.default_rng(0)
    print(f"machine: {machine()}")
    for dtype in (np.uint8, np.int16):
        fortran = np.asfortranarray(rng.integers(0, 3 if dtype == np.uint8 else 1000, shape, dtype=dtype))
        numpy_s, expected = best_of(lambda: np.ascontiguousarray(fortran))
        tiled_s, tiled = best_of(lambda: to_c_order(fortran))
        assert np.array_equal(expected, tiled) and tiled.flags.c_contiguous
        print(f"{np.dtype(dtype).name:6s} {shape}: np.ascontiguousarray {numpy_s:.2f} s, to_c_order {tiled_s:.2f} s "
              f"({numpy_s / tiled_s:.1f}x)")
    with tempfile.TemporaryDirectory() as tmp:
        affine = kits_affine((0.8, 0.78, 0.78), (0.0, 0.0, 0.0))
        ct_path, labels_path = Path(tmp) / "imaging.nii.gz", Path(tmp) / "segmentation.nii.gz"
        nib.save(nib.Nifti1Image(rng.integers(-1000, 1000, shape, dtype=np.int16), affine), str(ct_path))
        nib.save(nib.Nifti1Image(rng.integers(0, 3, shape, dtype=np.uint8), affine), str(labels_path))
        read_s, _ = best_of(lambda: read_labels(labels_path, like=read_ct(ct_path)))
        print(f"read_ct + read_labels of a {shape} case (gzip included): {read_s:.2f} s")


if __name__ == "__main__":
    main()
