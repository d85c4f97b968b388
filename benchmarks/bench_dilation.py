"""Benchmark: ball dilation of a KiTS-sized mask, brute force vs :func:`kitseg.morphology.dilate_ball`.

Usage (from the repository root)::

    PYTHONPATH=src python benchmarks/bench_dilation.py [--mask PATH] [--radius 10] [--spacing-mm]

The mask is a real KiTS19 segmentation (``../shared/data/kits19/case_00000`` by default, or
``--mask``) resampled along the slice axis to 5 mm by nearest neighbour, foreground = label > 0,
i.e. what stage 2 dilates on the stage grid; without the data, a synthetic two-kidney mask of
shape 61x512x512. The brute force runs once (it takes tens of seconds), the fast path best of 5.
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from pathlib import Path

import numpy as np
from scipy import ndimage

from kitseg.morphology import ball, dilate_ball

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_MASK = REPO_ROOT.parent / "shared" / "data" / "kits19" / "case_00000" / "segmentation.nii.gz"
STAGE_SLICE_MM = 5.0


def load_kits_mask(path: Path) -> tuple[np.ndarray, tuple[float, float, float], str]:
    """A KiTS19 foreground (label > 0) resampled to 5 mm slices; shape (Z, 512, 512), its spacing."""
    import nibabel as nib

    image = nib.load(str(path))
    labels = np.asarray(image.dataobj)
    spacing = tuple(float(s) for s in image.header.get_zooms()[:3])
    # KiTS19 files are stored slice-first (axis 0 = slices), so only axis 0 is resampled.
    n_out = max(int(round(labels.shape[0] * spacing[0] / STAGE_SLICE_MM)), 1)
    centres = (np.arange(n_out) + 0.5) * STAGE_SLICE_MM / spacing[0] - 0.5
    source = np.clip(np.rint(centres).astype(int), 0, labels.shape[0] - 1)
    mask = np.ascontiguousarray(labels[source] > 0)
    return mask, (STAGE_SLICE_MM, spacing[1], spacing[2]), f"KiTS19 {path.parent.name}"


def synthetic_mask(shape: tuple[int, int, int] = (61, 512, 512)) -> tuple[np.ndarray, tuple[float, float, float], str]:
    """Two ellipsoidal 'kidneys' left and right of the spine, 5 mm x 0.8 mm x 0.8 mm voxels."""
    z, y, x = np.ogrid[: shape[0], : shape[1], : shape[2]]
    mask = np.zeros(shape, dtype=np.bool_)
    for cx in (0.3 * shape[2], 0.7 * shape[2]):
        mask |= ((z - shape[0] * 0.45) / 12) ** 2 + ((y - shape[1] * 0.55) / 45) ** 2 + ((x - cx) / 35) ** 2 <= 1
    return mask, (5.0, 0.8, 0.8), "synthetic two kidneys"


def machine() -> str:
    uname = platform.uname()
    cpu = platform.processor() or uname.machine
    return f"{uname.system} {uname.release} {cpu}, {os.cpu_count()} CPUs, Python {platform.python_version()}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mask", type=Path, default=None, help="a KiTS19 segmentation.nii.gz")
    parser.add_argument("--radius", type=float, default=10.0, help="ball radius (voxels; mm with --spacing-mm)")
    parser.add_argument("--spacing-mm", action="store_true", help="radius in mm using the stage grid's spacing")
    parser.add_argument("--repeats", type=int, default=5, help="fast-path repeats (best is reported)")
    args = parser.parse_args(argv)

    path = args.mask if args.mask is not None else DEFAULT_MASK
    if path.exists():
        mask, spacing, source = load_kits_mask(path)
    elif args.mask is not None:
        parser.error(f"no such file: {path}")
    else:
        mask, spacing, source = synthetic_mask()
    use_spacing = spacing if args.spacing_mm else None
    structure = ball(args.radius, use_spacing)

    start = time.perf_counter()
    naive = ndimage.binary_dilation(mask, structure=structure)
    naive_s = time.perf_counter() - start

    fast_s = float("inf")
    for _ in range(args.repeats):
        start = time.perf_counter()
        fast = dilate_ball(mask, args.radius, use_spacing)
        fast_s = min(fast_s, time.perf_counter() - start)

    identical = bool(np.array_equal(naive, fast))
    unit = "mm" if args.spacing_mm else "voxels"
    rows = [
        ("mask", source),
        ("shape (Z, Y, X)", "x".join(map(str, mask.shape))),
        ("spacing mm", ", ".join(f"{s:.3g}" for s in spacing)),
        ("foreground voxels", f"{int(np.count_nonzero(mask))}"),
        ("ball", f"radius {args.radius:g} {unit}, structure {'x'.join(map(str, structure.shape))}"),
        ("naive binary_dilation s", f"{naive_s:.3f}"),
        (f"dilate_ball s (best of {args.repeats})", f"{fast_s:.4f}"),
        ("speed-up", f"{naive_s / fast_s:.0f}x"),
        ("identical", "yes" if identical else "NO"),
        ("machine", machine()),
    ]
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        print(f"{name:<{width}}  {value}")
    return 0 if identical else 1


if __name__ == "__main__":
    raise SystemExit(main())
