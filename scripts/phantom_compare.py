"""Compare realistic phantoms with a real CT: axial slices at kidney level and HU histograms.

Writes ``docs/phantom_vs_real.png``: the real non-contrast abdomen of TotalSegmentator's example
(``../shared/data/realct``) beside phantoms built around real KiTS19 masks in different contrast
phases, all in an abdominal window (W400/L40) and the radiological view (patient right on the
image's left), then HU histograms of body voxels and kidney voxels.

Usage: python scripts/phantom_compare.py [--data ../shared/data] [--out docs/phantom_vs_real.png]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import nibabel as nib  # noqa: E402
import numpy as np  # noqa: E402

from kitseg.geometry import Volume, voxel_spacing  # noqa: E402
from kitseg.phantom import PhantomParams, synthesize_ct_with_protocol  # noqa: E402

WINDOW = (40 - 200, 40 + 200)  # W400 / L40
PHANTOMS = (("case_00149", "none"), ("case_00042", "arterial"), ("case_00100", "venous"), ("case_00066", "delayed"))


def load_internal(path: Path) -> Volume:
    img = nib.load(str(path))
    return Volume.from_source_array(np.asarray(img.dataobj), img.affine, path)


def main() -> None:
    root = Path(__file__).resolve().parents[1]
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=root.parent / "shared" / "data")
    parser.add_argument("--out", type=Path, default=root / "docs" / "phantom_vs_real.png")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    real = load_internal(args.data / "realct" / "totalseg_example_ct.nii.gz")
    real_labels = load_internal(args.data / "realct" / "totalseg_example_ct_pred_labels.nii.gz").array
    real_kidney = np.isin(real_labels, (2, 3))
    panels = [("real CT (non-contrast)", real.array.astype(np.float32), real_kidney.astype(np.uint8), real.spacing)]
    for case, phase in PHANTOMS:
        mask = load_internal(args.data / "kits19" / case / "segmentation.nii.gz")
        params = PhantomParams(phases=(phase,), phase_weights=(1.0,))
        start = time.perf_counter()
        ct, protocol = synthesize_ct_with_protocol(mask.array, voxel_spacing(mask.affine),
                                                   np.random.default_rng(args.seed), params)
        print(f"{case} {mask.shape} {phase}: {time.perf_counter() - start:.1f} s, noise {protocol.noise_sigma_hu:.0f} HU")
        panels.append((f"phantom {case} ({phase})", ct.astype(np.float32), mask.array, mask.spacing))

    fig = plt.figure(figsize=(4 * len(panels), 9))
    grid = fig.add_gridspec(2, len(panels), height_ratios=(1.15, 1))
    for i, (title, image, labels, spacing) in enumerate(panels):
        z = int(np.argmax((labels > 0).sum(axis=(1, 2))))
        ax = fig.add_subplot(grid[0, i])
        ax.imshow(image[z], cmap="gray", vmin=WINDOW[0], vmax=WINDOW[1], aspect=spacing[1] / spacing[2])
        ax.contour(labels[z] == 2, levels=[0.5], colors="yellow", linewidths=0.6)
        ax.set_title(f"{title}\nslice {z}", fontsize=9)
        ax.set_xticks([]), ax.set_yticks([])
        ax.text(0.02, 0.5, "R", color="w", transform=ax.transAxes), ax.text(0.94, 0.5, "L", color="w", transform=ax.transAxes)
    bins = np.arange(-200, 401, 5)
    for j, (what, select) in enumerate((("body voxels (HU > -500)", lambda im, lb: im > -500),
                                        ("kidney voxels (label 1)", lambda im, lb: lb == 1),
                                        ("tumor voxels (label 2)", lambda im, lb: lb == 2))):
        ax = fig.add_subplot(grid[1, j * len(panels) // 3:(j + 1) * len(panels) // 3])
        for k, (title, image, labels, _) in enumerate(panels):
            values = image[select(image, labels)]
            if values.size:
                ax.hist(values, bins=bins, density=True, histtype="step", lw=2.2 if k == 0 else 1.2,
                        color="k" if k == 0 else None, label=title)
        ax.set_title(what, fontsize=9)
        ax.set_xlabel("HU")
        ax.legend(fontsize=6)
    fig.suptitle("Real CT vs. realistic phantoms (W400/L40, radiological view; yellow: tumor)", fontsize=11)
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=70)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
