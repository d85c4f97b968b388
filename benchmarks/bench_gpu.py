"""The GPU check: training and inference images/s of a preset, and CPU against GPU predictions.

    python benchmarks/bench_gpu.py                                  # paper preset on cuda
    python benchmarks/bench_gpu.py --device cpu --preset smoke --steps 2 --shape 20 96 96 --train-shape 12 96 96  # dry run

1. Training: ``--steps`` timed steps (after 3 warm-up steps) of the preset's stage-1 and stage-2
   training on synthetic cases (sampling, augmentation, forward, backward, Adam:
   ``train_network`` itself, in the preset's precision: mixed on CUDA; the checkpoint writes at
   the run's end left out, ``_common.timed_steps``); images/s = batch / step time. Each stage
   is timed twice, its batches drawn ahead in a thread (as training does on a GPU) and in line.
   ``--train-only`` stops here.
2. Those two briefly trained networks become a model file of the preset (saved and loaded again,
   as a user's would be). It and the shipped model segment a CT of ``--shape`` (default the median
   KiTS19 case, 108 x 512 x 512 at 3 mm) on ``--device``, timed after one warm-up run:
   stage-grid slices/s through both stages, and the end-to-end seconds.
3. Agreement: the same files segment the same CT on the CPU (with ``--device cpu``: the CPU
   twice). Reported: the largest y1 difference, and the share of voxels with the same label
   (float16 on CUDA against float32 on the CPU; a borderline voxel may flip). The figures are
   printed, with the machine; nothing is asserted here, the numbers go into the README and the
   model card.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import REPO, machine, timed_steps, write_synthetic_ct  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="paper", help="the training preset to time (default: paper)")
    parser.add_argument("--device", default="cuda", help="the device to time and to compare with the CPU")
    parser.add_argument("--steps", type=int, default=20, help="timed training steps per stage")
    parser.add_argument("--train-only", action="store_true", help="time training only (part 1)")
    parser.add_argument("--shape", type=int, nargs=3, default=(108, 512, 512), metavar=("Z", "Y", "X"))
    parser.add_argument("--slice-mm", type=float, default=3.0)
    parser.add_argument("--train-shape", type=int, nargs=3, default=(40, 512, 512), metavar=("Z", "Y", "X"),
                        help="the synthetic training cases' shape (0.8 mm pixels, 2.5 mm slices: KiTS19-like)")
    parser.add_argument("--weights", type=Path, default=REPO / "src" / "kitseg" / "weights" / "default.kseg",
                        help="a second model file to time and compare (default: the shipped one)")
    args = parser.parse_args()

    import torch

    from kitseg.checkpoint import ModelBundle, StageModel, load_bundle, save_bundle
    from kitseg.config import KITS_LABELS
    from kitseg.device import mixed_precision_dtype
    from kitseg.io import read_ct
    from kitseg.phantom import make_synthetic_case
    from kitseg.pipeline import Segmenter
    from kitseg.training import preset
    from kitseg.training.data import load_cases
    from kitseg.training.loop import precision_name, stage1_task, stage2_task

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device here (use --device cpu for a dry run)")
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "none"
    config = preset(args.preset).replace(steps_per_epoch=10**6)  # no validation inside the timed steps
    precision = precision_name(mixed_precision_dtype(device)) if config.amp else "float32"
    print(f"machine: {machine()}; GPU: {gpu}; torch {torch.__version__}; preset {args.preset}, training in {precision}")

    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        for i in range(4):  # KiTS-like slices, few of them: prepared in seconds
            case = make_synthetic_case(shape=tuple(args.train_shape), spacing=(2.5, 0.8, 0.8), seed=i)
            case.save_case_folder(tmp / f"case_{i:05d}")
        cases = load_cases(tmp, config.preprocessing, None, progress=False)
        y1 = {c.name: (c.labels > 0).astype(np.float32) for c in cases}  # speed only: any y1 of the right shape
        tasks = {"1": (stage1_task(cases, [], config, args.steps, "stage 1", device), config.batch_size_stage1, config.crop_stage1),
                 "2": (stage2_task(cases, [], y1, {}, config, device), config.batch_size_stage2, config.crop_stage2)}
        nets = {}
        for stage, (task, batch, crop) in tasks.items():
            crop_text = f"{crop}^2 crops" if crop else "full slices"
            # Batches drawn ahead in a thread (as training does off the CPU) and, to compare, in line.
            for prefetch in (True, False):
                seconds, nets[stage, prefetch] = timed_steps(task, stage, config, device, args.steps, prefetch=prefetch)
                print(f"training stage {stage}: {seconds * 1000:7.1f} ms/step, batch {batch} ({crop_text}): "
                      f"{batch / seconds:7.1f} images/s, batches drawn {'ahead' if prefetch else 'in line'}")
        net1, net2 = nets["1", True], nets["2", True]

        if args.train_only:
            return 0
        briefly_trained = ModelBundle(config.preprocessing, KITS_LABELS, config.mask,
                                      StageModel.from_module(net1.cpu()), StageModel.from_module(net2.cpu()))
        models = {f"{args.preset} preset, {args.steps + 4} steps": save_bundle(briefly_trained, tmp / "model.kseg"),
                  args.weights.name: args.weights}
        ct = read_ct(write_synthetic_ct(tmp / "ct.nii.gz", tuple(args.shape), (args.slice_mm, 0.8, 0.8)))
        print(f"inference CT: {ct.shape} at {args.slice_mm} mm slices")
        for name, path in models.items():
            # With --device cpu the comparison is CPU against CPU: a determinism check.
            results = []
            for where in (device, torch.device("cpu")):
                segmenter = Segmenter(load_bundle(path), device=where, batch_size=16)
                segmenter.segment(ct)  # warm-up: kernels, allocator
                start = time.perf_counter()
                results.append(segmenter.segment(ct))
                seconds = time.perf_counter() - start
                slices = results[-1].prepared.image.shape[0]
                print(f"  {name} on {where.type}: {seconds:6.2f} s end to end, {slices / seconds:6.1f} stage-grid "
                      f"slices/s ({slices} slices, both stages)")
            ours, cpu = results
            same = float(np.mean(ours.labels == cpu.labels))
            print(f"  {name}, {device.type} vs cpu: largest y1 difference {np.abs(ours.y1 - cpu.y1).max():.2e}, "
                  f"same label in {same:.4%} of voxels ({int((ours.labels != cpu.labels).sum())} differ; "
                  f"kidney+tumor {int((cpu.labels > 0).sum())} voxels on cpu)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
