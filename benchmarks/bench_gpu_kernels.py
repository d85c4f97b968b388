"""Training-step speed of the preset's networks on CUDA under cuDNN autotuning and channels-last memory.

    python benchmarks/bench_gpu_kernels.py                 # paper preset, cuda
    python benchmarks/bench_gpu_kernels.py --device cpu --preset smoke --steps 2   # dry run

The step alone (forward, loss, backward, Adam in the preset's precision) on random inputs of the
training shapes: what the data pipeline costs is ``bench_gpu.py``'s business. Each variant is
timed after warm-up steps, the variants alternating in rounds, so that the ratios come from one run.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="paper")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per variant and round")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()

    import torch

    from kitseg.device import mixed_precision_dtype
    from kitseg.losses import deep_supervision_loss, stage1_loss
    from kitseg.networks import build_network
    from kitseg.training import preset
    from kitseg.training.loop import stage1_network_kwargs, stage2_network_kwargs

    device = torch.device(args.device)
    config = preset(args.preset)
    amp = mixed_precision_dtype(device) if config.amp else None
    side1 = config.crop_stage1 or 512  # full slices: KiTS19's 512 x 512
    stages = {  # the network's recipe, a batch's shape, its loss
        "1": (lambda: build_network(config.stage1_architecture, **stage1_network_kwargs(config)),
              (config.batch_size_stage1, config.preprocessing.stage1_in_channels, side1, side1),
              lambda out, y, m: stage1_loss(out, y.clamp(max=1))),
        "2": (lambda: build_network(config.stage2_architecture, **stage2_network_kwargs(config)),
              (config.batch_size_stage2, config.preprocessing.stage2_in_channels, config.crop_stage2, config.crop_stage2),
              lambda out, y, m: deep_supervision_loss(out, y, m, dice_weight=config.stage2_dice_weight)),
    }
    print(f"machine: {machine()}; device {device}; torch {torch.__version__}; preset {args.preset}; precision {amp}")
    variants = {"plain": (False, False), "cudnn.benchmark": (True, False), "channels_last": (False, True),
                "both": (True, True)}  # name: (cudnn.benchmark, channels-last)
    for stage, (build, shape, loss_fn) in stages.items():
        template = build()
        nets = {}
        for name, (_, channels_last) in variants.items():
            net = build()
            net.load_state_dict(template.state_dict())  # the same weights in every variant
            net = net.to(device, memory_format=torch.channels_last if channels_last else torch.contiguous_format)
            nets[name] = (net, torch.optim.Adam(net.parameters(), lr=1e-3))
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(shape, generator=gen).to(device)
        y = torch.randint(0, 3, (shape[0],) + shape[2:], generator=gen).to(device)
        m = torch.ones((shape[0],) + shape[2:], device=device)
        times = {name: [] for name in variants}

        def step(name):
            cudnn_benchmark, channels_last = variants[name]
            torch.backends.cudnn.benchmark = cudnn_benchmark
            net, opt = nets[name]
            inputs = x.contiguous(memory_format=torch.channels_last) if channels_last else x
            with torch.autocast(device.type, dtype=amp) if amp else contextlib.nullcontext():
                out = net(inputs)
            loss = loss_fn(out, y, m)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        def sync():
            if device.type == "cuda":
                torch.cuda.synchronize(device)

        for name in variants:  # warm-up: autotuning, allocator
            for _ in range(3):
                step(name)
        for _ in range(args.rounds):
            for name in variants:
                sync()
                start = time.perf_counter()
                for _ in range(args.steps):
                    step(name)
                sync()
                times[name].append((time.perf_counter() - start) / args.steps)
        base = min(times["plain"])
        for name, t in times.items():
            print(f"stage {stage} {name:16s} {min(t) * 1000:8.1f} ms/step (best of {args.rounds}), "
                  f"{shape[0] / min(t):7.1f} images/s, {base / min(t):4.2f}x plain")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
