"""Zero-shot kidney Dice of a model on the real CT in ../shared/data/realct.

    python scripts/evaluate_realct.py [--weights W.kseg] [--out DIR]

The reference is a published model's kidney labels (2 = right, 3 = left kidney), not expert
annotation: an approximate check of how the model transfers from phantoms to real anatomy.

Second check: the contrast-enhanced DICOM series of the upper abdomen (liver and spleen, no
kidney; JPEG 2000, read by kitseg.dicom), where every labelled voxel is a false positive.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

from kitseg.cli import add_mirror_option

REALCT = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "realct"
REALCT_CT = REALCT / "totalseg_example_ct.nii.gz"
REALCT_REFERENCE = REALCT / "totalseg_example_ct_pred_labels.nii.gz"  # 2 = right, 3 = left kidney


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weights", type=Path, default=None, help="default: the shipped model")
    parser.add_argument("--out", type=Path, default=None, help="keep the prediction here")
    parser.add_argument("--figure", type=Path, default=None, help="save reference vs prediction slices (PNG)")
    parser.add_argument("--no-cleanup", action="store_true", help="keep stray pieces (kitseg.postprocess)")
    add_mirror_option(parser)
    args = parser.parse_args()
    ct_path, ref_path = REALCT_CT, REALCT_REFERENCE
    if not ct_path.is_file():
        print(f"skipped: {ct_path} is absent (shared development data)")
        return 0

    from kitseg.io import read_ct, read_labels, write_labels
    from kitseg.metrics import dice
    from kitseg.pipeline import Segmenter
    from kitseg.postprocess import CleanupRules

    volume = read_ct(ct_path)
    reference = read_labels(ref_path, like=volume)
    ref_kidney = np.isin(reference.array, (2, 3))
    segmenter = Segmenter.from_file(args.weights, device="cpu", mirror=args.mirror)
    start = time.perf_counter()
    result = segmenter.segment(volume, cleanup=None if args.no_cleanup else CleanupRules())
    seconds = time.perf_counter() - start
    pred_kidney = result.labels > 0
    voxel_ml = float(np.prod(volume.spacing)) / 1000.0
    print(f"real CT {volume.shape} at {tuple(round(s, 2) for s in volume.spacing)} mm, segmented in {seconds:.1f} s")
    print(f"kidney Dice (label>0 vs reference kidneys): {dice(pred_kidney, ref_kidney):.4f}")
    print(f"predicted kidney+tumor {pred_kidney.sum() * voxel_ml:.1f} mL (tumor {np.sum(result.labels == 2) * voxel_ml:.1f} mL); "
          f"reference kidneys {ref_kidney.sum() * voxel_ml:.1f} mL")
    # Per side: the patient's right is the low column half in the internal orientation.
    half = volume.shape[2] // 2
    for side, cols, label in (("right", slice(0, half), 2), ("left", slice(half, None), 3)):
        print(f"  {side} kidney Dice: {dice(pred_kidney[:, :, cols], reference.array[:, :, cols] == label):.4f}")
    _kidney_free_check(segmenter, None if args.no_cleanup else CleanupRules())
    if args.figure:
        _figure(volume.array, ref_kidney, result.labels, args.figure)
        print(f"wrote {args.figure}")
    if args.out:
        out = write_labels(result.labels, volume.source, args.out / "totalseg_example_ct_labels.nii.gz", overwrite=True)
        print(f"wrote {out}")
    return 0


def _kidney_free_check(segmenter, cleanup) -> None:
    from kitseg.io import InputError, read_ct

    folder = REALCT / "totalseg_upper_abdomen_dicom"
    if not folder.is_dir():
        print(f"kidney-free DICOM check skipped: {folder} is absent")
        return
    try:
        volume = read_ct(folder)
    except InputError as error:  # no JPEG 2000 decoder (Pillow without OpenJPEG)
        print(f"kidney-free DICOM check skipped: {error}")
        return
    labels = segmenter.segment(volume, cleanup=cleanup).labels
    voxel_ml = float(np.prod(volume.spacing)) / 1000.0
    print(f"kidney-free contrast CT {volume.shape}: {np.sum(labels > 0) * voxel_ml:.1f} mL labelled "
          f"(tumor {np.sum(labels == 2) * voxel_ml:.1f} mL), all false positive")


def _figure(ct: np.ndarray, ref_kidney: np.ndarray, labels: np.ndarray, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kidney_slice = int(np.argmax(ref_kidney.sum(axis=(1, 2))))
    slices = [kidney_slice, min(ct.shape[0] - 1, kidney_slice + 11), min(ct.shape[0] - 1, kidney_slice + 40)]
    fig, axes = plt.subplots(2, 3, figsize=(12, 8))
    for column, z in enumerate(slices):
        for row in range(2):
            axes[row, column].imshow(ct[z], cmap="gray", vmin=-160, vmax=240)
            axes[row, column].axis("off")
        axes[0, column].contour(ref_kidney[z], colors="lime", linewidths=1)
        axes[0, column].set_title(f"slice {z}: reference kidneys (green)")
        axes[1, column].imshow(np.ma.masked_equal(labels[z], 0), cmap="autumn", alpha=0.5, vmin=1, vmax=2)
        axes[1, column].set_title("prediction: kidney red, tumor yellow")
    fig.suptitle("Shipped model, zero-shot on a real non-contrast CT (TotalSegmentator test data, Apache-2.0)")
    fig.tight_layout()
    fig.savefig(path, dpi=70)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
