"""Training speed in float32 against mixed precision (bfloat16 autocast on a CPU that multiplies
bfloat16 in hardware: Intel AMX or AVX-512 BF16), and whether the mixed-precision network learns
as well.

    python benchmarks/bench_train_precision.py                         # speed, on synthetic cases
    python benchmarks/bench_train_precision.py --data work_data/phantoms_v3 --cache work_data/run_r4/cache \\
        --quality-steps 420 --val-cases case_00120 ... case_00149      # + stage 1 trained both ways

Speed: steps of the ``cpu`` preset's stage-1 and stage-2 training (sampling, augmentation,
forward, backward, Adam: ``kitseg.training.loop.train_network`` itself), timed per step in
float32 and with ``amp`` on, in one run; the ratio is the figure to compare across machines.
Quality (``--data``): stage 1 trained from scratch for ``--quality-steps`` on the folder's other
cases, both ways with the same seed (the same batches), and its foreground Dice on ``--val-cases``.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, timed_steps  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=20, help="timed steps per stage and precision")
    parser.add_argument("--data", type=Path, default=None, help="a KiTS19-layout folder for the quality check")
    parser.add_argument("--cache", type=Path, default=None, help="prepared-case cache (a training run's RUN/cache)")
    parser.add_argument("--quality-steps", type=int, default=420)
    parser.add_argument("--val-cases", nargs="+", default=None, help="validation cases of --data (default: the last 20%%)")
    args = parser.parse_args()

    import torch

    from kitseg.device import mixed_precision_dtype
    from kitseg.phantom import make_synthetic_case
    from kitseg.training import preset
    from kitseg.training.data import load_cases
    from kitseg.training.loop import DistInfo, foreground_dice, precision_name, predict_y1, stage1_task, stage2_task, train_network

    device = torch.device("cpu")
    mixed = precision_name(mixed_precision_dtype(device))
    print(f"machine: {machine()}; torch {torch.__version__}, {torch.get_num_threads()} threads; mixed precision here: {mixed}")
    base = preset("cpu").replace(steps_per_epoch=10**6)  # no validation inside the timed steps
    precisions = {"float32": base.replace(amp=False), mixed: base.replace(amp=True)}
    if mixed == "float32":
        print("this CPU has no fast low-precision path: training runs float32 whatever `amp` says")
        precisions = {"float32": precisions["float32"]}

    with tempfile.TemporaryDirectory() as tmp:
        for i in range(6):  # KiTS-like geometry, small enough to prepare in seconds
            make_synthetic_case(shape=(60, 200, 220), spacing=(2.5, 0.8, 0.8), seed=i).save_case_folder(Path(tmp) / f"case_{i:05d}")
        cases = load_cases(Path(tmp), base.preprocessing, None, progress=False)
    y1 = {c.name: (c.labels > 0).astype(np.float32) for c in cases}  # speed only: any y1 of the right shape
    times = {}
    for name, config in precisions.items():
        task1 = stage1_task(cases, [], config, args.steps, "stage 1", device)
        task2 = stage2_task(cases, [], y1, {}, config, device)
        times[name] = (timed_steps(task1, "1", config, device, args.steps)[0], timed_steps(task2, "2", config, device, args.steps)[0])
    for name, (t1, t2) in times.items():
        print(f"{name:<16} stage 1 {t1 * 1000:6.0f} ms/step (batch {base.batch_size_stage1}, {base.crop_stage1}^2)   "
              f"stage 2 {t2 * 1000:6.0f} ms/step (batch {base.batch_size_stage2}, {base.crop_stage2}^2)")
    if len(times) == 2:
        (f1, f2), (m1, m2) = times.values()
        print(f"speed-up of {mixed}: stage 1 x{f1 / m1:.2f}, stage 2 x{f2 / m2:.2f}")

    if args.data is not None:
        cases = load_cases(args.data, base.preprocessing, args.cache, progress=False)
        names = sorted(c.name for c in cases)
        val_names = set(args.val_cases or names[int(len(names) * 0.8):])
        train_cases = [c for c in cases if c.name not in val_names]
        val_cases = [c for c in cases if c.name in val_names]
        print(f"quality: stage 1 from scratch, {args.quality_steps} steps on {len(train_cases)} cases of {args.data}, "
              f"foreground Dice on {len(val_cases)}")
        for name, config in precisions.items():
            task = stage1_task(train_cases, [], config, args.quality_steps, "stage 1", device)
            with tempfile.TemporaryDirectory() as tmp:
                start = time.perf_counter()
                module = train_network(task, Path(tmp), config, device, DistInfo(), "1", {}, progress=False)
                seconds = time.perf_counter() - start
            score = foreground_dice(predict_y1(module, val_cases, config, device), val_cases)
            print(f"{name:<16} foreground Dice {score:.4f}   ({seconds / 60:.1f} min of training)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
