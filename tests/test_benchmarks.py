"""Benchmark scripts run end to end: the GPU check on the CPU (so it works the day a GPU is lent), the I/O one small."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_gpu_check_dry_run_times_training_and_inference_and_compares_predictions():
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "bench_gpu.py"), "--device", "cpu", "--preset", "smoke",
         "--steps", "2", "--shape", "20", "96", "96", "--train-shape", "12", "96", "96"],
        capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    for stage in ("1", "2"):
        rate = re.search(rf"training stage {stage}: .* ([\d.]+) images/s", out)
        assert rate and float(rate.group(1)) > 0, out
    comparisons = re.findall(r"cpu vs cpu: largest y1 difference (\S+), same label in ([\d.]+)%", out)
    assert len(comparisons) == 2, out  # the briefly trained preset model and the shipped one
    for difference, same in comparisons:
        # The same file on the same device twice: identical.
        assert float(difference) == 0.0 and float(same) == 100.0, out
    assert len(re.findall(r"on cpu: +[\d.]+ s end to end", out)) == 4, out


def test_io_benchmark_checks_the_tiled_copy_and_reads_a_case():
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "bench_io.py"), "--shape", "9", "70", "66"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert len(re.findall(r"np.ascontiguousarray [\d.]+ s, to_c_order [\d.]+ s", proc.stdout)) == 2, proc.stdout
    assert re.search(r"read_ct \+ read_labels of a \(9, 70, 66\) case .*: [\d.]+ s", proc.stdout), proc.stdout


def test_gpu_kernel_benchmark_dry_run_times_each_layout_of_both_stages():
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "bench_gpu_kernels.py"), "--device", "cpu", "--preset", "smoke",
         "--steps", "1", "--rounds", "1"],
        capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = re.findall(r"stage ([12]) (\S+) +[\d.]+ ms/step .* ([\d.]+)x plain", proc.stdout)
    assert [(stage, name) for stage, name, _ in rows] == [
        (stage, name) for stage in "12" for name in ("plain", "cudnn.benchmark", "channels_last", "both")], proc.stdout
    assert all(float(ratio) > 0 for *_, ratio in rows) and rows[0][2] == "1.00", proc.stdout


def test_training_memory_benchmark_measures_both_runs_and_the_cache(dataset, tmp_path):
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "bench_train_memory.py"), "--data", str(dataset), "--cases", "4",
         "--val", "1", "--preset", "smoke", "--json", str(tmp_path / "memory.json")],
        capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = re.findall(r"(preparing|prepared): peak anonymous ([\d.]+) GiB, file-backed ([\d.]+) GiB", proc.stdout)
    assert [r[0] for r in rows] == ["preparing", "prepared"], proc.stdout
    assert all(float(anon) > 0 for _, anon, _ in rows), proc.stdout
    figures = json.loads((tmp_path / "memory.json").read_text())
    assert figures["cache_bytes"] > 0 and figures["prepared"]["anon"] > 0
