"""Memory of `kits-seg train`: what the training data holds, the networks kept tiny.

    kits-seg phantom --masks ../shared/data/kits19 --out work_data/phantoms --cases case_00000 ...
    python benchmarks/bench_train_memory.py --data work_data/phantoms --cases 24
    python benchmarks/bench_train_memory.py --data work_data/phantoms --cases 24 --src /tmp/old/src  # another engine

Runs `kits-seg train` twice in a child process on the first ``--cases`` case folders of
``--data`` (the last ``--val`` of them for validation), with the recipe's grid (default: the
`paper` preset, native in-plane resolution) and its networks shrunk to a few channels and
steps, so the data is what fills the memory. The first run prepares the cases into a cache;
the second starts a new run folder over that cache, as a new training on prepared data does
(``--first-only`` skips it: for large sets, where the first run is what decides whether it fits).
Memory is sampled every 0.1 s over the whole process tree (preparation workers included):

- anonymous: memory the processes own (RssAnon); it has to fit in RAM (no swap here);
- file-backed: pages of mapped files (RssFile), the page cache, which the kernel drops and
  reads again when memory runs short, and which processes mapping one file share.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine  # noqa: E402

TINY = {"base_channels": 4, "depth": 2, "norm": "batch"}


def tree_memory(pid: int) -> tuple[int, int]:
    """(anonymous, file-backed) resident bytes of a process and its descendants."""
    import psutil

    anon = file = 0
    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0, 0
    for proc in procs:
        try:
            with open(f"/proc/{proc.pid}/status") as fh:
                fields = dict(line.split(":", 1) for line in fh if ":" in line)
        except OSError:
            continue
        anon += int(fields.get("RssAnon", "0 kB").split()[0]) * 1024
        file += int(fields.get("RssFile", "0 kB").split()[0]) * 1024
    return anon, file


def run_training(cmd: list[str], env: dict) -> dict:
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    peak = {"anon": 0, "file": 0, "total": 0}
    output: list[str] = []
    reader = threading.Thread(target=lambda: output.extend(proc.stdout), daemon=True)
    reader.start()
    start = time.perf_counter()
    while proc.poll() is None:
        anon, file = tree_memory(proc.pid)
        peak = {"anon": max(peak["anon"], anon), "file": max(peak["file"], file), "total": max(peak["total"], anon + file)}
        time.sleep(0.1)
    reader.join()
    if proc.returncode != 0:
        raise SystemExit(f"training failed (rc {proc.returncode}):\n{''.join(output[-40:])}")
    return {**peak, "seconds": time.perf_counter() - start}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True, help="KiTS19-layout folder (phantoms or real cases)")
    parser.add_argument("--cases", type=int, default=24, help="how many case folders to train on (default 24)")
    parser.add_argument("--val", type=int, default=4, help="of which held out for validation (default 4)")
    parser.add_argument("--preset", default="paper")
    parser.add_argument("--src", type=Path, default=None, help="another engine's src/ folder to measure instead")
    parser.add_argument("--first-only", action="store_true", help="only the run that prepares the cases (large sets)")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = parser.parse_args()

    folders = sorted(p for p in args.data.iterdir() if (p / "segmentation.nii.gz").is_file())[: args.cases]
    if len(folders) < args.cases:
        raise SystemExit(f"{args.data}: {len(folders)} case folders with segmentation.nii.gz, {args.cases} asked for")
    env = dict(os.environ)
    if args.src is not None:
        env["PYTHONPATH"] = str(args.src.resolve())
    results = {"machine": machine(), "preset": args.preset, "cases": args.cases, "val": args.val,
               "engine": str(args.src or "this checkout")}
    with tempfile.TemporaryDirectory(prefix="bench_train_memory_") as tmp:
        data = Path(tmp) / "data"
        data.mkdir()
        for folder in folders:
            (data / folder.name).symlink_to(folder.resolve())
        common = [
            "--data", str(data), "--preset", args.preset, "--device", "cpu", "--no-progress",
            "--cache", str(Path(tmp) / "cache"), "--val-cases", *[f.name for f in folders[-args.val:]],
            "--stage1-steps", "4", "--stage2-steps", "4", "--steps-per-epoch", "4",
            "--set", f"stage1_kwargs={json.dumps(TINY)}", "--set", f"stage2_kwargs={json.dumps(TINY)}",
            "--set", "batch_size_stage1=2", "--set", "batch_size_stage2=2",
        ]
        cmd = [sys.executable, "-m", "kitseg.cli", "train"]
        results["preparing"] = run_training([*cmd, "--out", str(Path(tmp) / "run1"), *common], env)
        if not args.first_only:
            results["prepared"] = run_training([*cmd, "--out", str(Path(tmp) / "run2"), *common], env)
        cache_bytes = sum(f.stat().st_size for f in (Path(tmp) / "cache").iterdir())
    results["cache_bytes"] = cache_bytes
    gib = 2.0**30
    print(f"{machine()}\nengine: {results['engine']}; preset {args.preset}, {args.cases} cases ({args.val} validation); "
          f"cache {cache_bytes / gib:.2f} GiB")
    for phase in ("preparing", "prepared")[: 1 if args.first_only else 2]:
        r = results[phase]
        print(f"  {phase:>9}: peak anonymous {r['anon'] / gib:.2f} GiB, file-backed {r['file'] / gib:.2f} GiB, "
              f"together {r['total'] / gib:.2f} GiB; {r['seconds']:.0f} s")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
