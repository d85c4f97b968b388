"""Wall time and peak memory of `kits-seg predict`, end to end (read, both stages, write).

    python benchmarks/bench_predict.py                       # median KiTS19 case: 108 x 512 x 512, 3 mm
    python benchmarks/bench_predict.py --shape 1059 512 512 --slice-mm 0.5   # the largest KiTS19 case

The prediction runs in a child process; its peak RSS comes from wait4 (the child alone).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import REPO, machine, write_synthetic_ct  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", type=int, nargs=3, default=(108, 512, 512))
    parser.add_argument("--slice-mm", type=float, default=3.0)
    parser.add_argument("--inplane-mm", type=float, default=0.78)
    parser.add_argument("--weights", type=Path, default=None, help="default: the shipped model")
    parser.add_argument("--repeat", type=int, default=2, help="runs (the best is reported)")
    parser.add_argument("--mirror", default="off", help="kits-seg predict --mirror MODE (off, stage2, both)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        ct = write_synthetic_ct(tmp / "ct.nii.gz", tuple(args.shape), (args.slice_mm, args.inplane_mm, args.inplane_mm))
        cmd = [sys.executable, "-m", "kitseg.cli", "predict", str(ct), "-o", str(tmp / "out"), "--overwrite", "--device", "cpu",
               "--mirror", args.mirror]
        if args.weights:
            cmd += ["--weights", str(args.weights)]
        env = {**os.environ, "PYTHONPATH": str(REPO / "src") + os.pathsep + os.environ.get("PYTHONPATH", "")}
        results = []
        for _ in range(args.repeat):
            start = time.perf_counter()
            proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            _, status, usage = os.wait4(proc.pid, 0)
            wall = time.perf_counter() - start
            if status != 0:
                sys.exit(f"predict failed: {proc.stderr.read().decode()[-2000:]}")
            results.append((wall, usage.ru_maxrss / 1024 / 1024))  # ru_maxrss is in KiB on Linux
    wall, rss = min(results)
    print(f"machine: {machine()}")
    print(f"input: {tuple(args.shape)} voxels, spacing {args.slice_mm} x {args.inplane_mm} x {args.inplane_mm} mm")
    print(f"kits-seg predict (end to end, incl. interpreter start): best of {args.repeat}: {wall:.2f} s, peak RSS {rss:.2f} GiB")
    print("all runs: " + ", ".join(f"{w:.2f} s / {r:.2f} GiB" for w, r in results))


if __name__ == "__main__":
    main()
