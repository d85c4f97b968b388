"""On a CUDA device: training in mixed precision resumes exactly, the CLI runs there, and a model
segments alike on the GPU and the CPU. Skipped where torch sees no CUDA device (CI, most laptops).

Run where a GPU is: ``python -m pytest tests/test_cuda.py`` (``benchmarks/gpu_check.sh`` runs it
together with ``benchmarks/bench_gpu.py``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from kitseg.checkpoint import load_bundle, read_metadata
from kitseg.io import read_ct
from kitseg.phantom import make_sample_case
from kitseg.pipeline import Segmenter
from kitseg.weights import default_weights_path

from .conftest import straight_and_resumed_runs

REPO = Path(__file__).resolve().parents[1]

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


@pytest.mark.parametrize("bfloat16", [True, False], ids=["mixed-bfloat16", "mixed-float16"])
def test_resume_on_cuda_continues_the_interrupted_run(dataset, tmp_path, monkeypatch, caplog, bfloat16):
    # float16 is what GPUs without bfloat16 (T4, V100) train in: its gradient scaler must resume too.
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: bfloat16)
    # Deterministic kernels, so that the resumed run can be compared with the straight one.
    monkeypatch.setattr(torch.backends.cudnn, "deterministic", True)
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    with caplog.at_level("INFO", logger="kitseg.training.loop"):
        straight, resumed, state, steps = straight_and_resumed_runs(dataset, tmp_path, torch.device("cuda"))
    assert ("mixed bfloat16" if bfloat16 else "mixed float16") in caplog.text
    # A run interrupted on a GPU can be inspected, or continued, on a machine without one.
    assert state["step"] == 2 and not state["finished"]
    assert bool(state["scaler"]) is not bfloat16  # the float16 scaler's scale travels with the run
    assert state["model"]["encoder.0.0.weight"].is_contiguous(memory_format=torch.channels_last)  # trained so
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert a.is_cuda and torch.isfinite(a.float()).all(), name
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4, msg=name)
    assert steps == ["2", "4"]


def test_a_run_begun_on_the_cpu_resumes_on_a_float16_gpu(dataset, tmp_path, monkeypatch, caplog):
    """A CPU (or bfloat16) run saves no loss scale; a T4/V100 resuming it starts a fresh one."""
    from kitseg.training import preset
    from kitseg.training.data import load_cases
    from kitseg.training.loop import DistInfo, stage1_task, train_network

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: False)
    config = preset("smoke").replace(steps_per_epoch=2, amp=True)
    cases = load_cases(dataset, config.preprocessing, cache_dir=None, progress=False)
    folder = tmp_path / "run"
    cpu = torch.device("cpu")
    train_network(stage1_task(cases, [], config, 2, "stage 1", cpu), folder, config, cpu, DistInfo(), "1", {},
                  progress=False)
    state = torch.load(folder / "state.pt", map_location="cpu", weights_only=True)
    state["finished"] = False  # as if the job had been stopped at its step-2 checkpoint of 4
    torch.save(state, folder / "state.pt")
    gpu = torch.device("cuda")
    with caplog.at_level("WARNING", logger="kitseg.training.loop"):
        module = train_network(stage1_task(cases, [], config, 4, "stage 1", gpu), folder, config, gpu, DistInfo(),
                               "1", {}, progress=False)
    assert "resumed in mixed float16" in caplog.text
    assert all(torch.isfinite(t.float()).all() for t in module.state_dict().values())
    assert torch.load(folder / "state.pt", map_location="cpu", weights_only=True)["scaler"]  # its own scale now


def test_train_and_predict_commands_on_cuda(dataset, tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO / "src"), os.environ.get("PYTHONPATH")]))}
    run = tmp_path / "run"
    train = [sys.executable, "-m", "kitseg.cli", "train", "--data", str(dataset), "--out", str(run),
             "--preset", "smoke", "--device", "cuda", "--no-progress"]
    proc = subprocess.run(train, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    provenance = read_metadata(run / "model.kseg")["provenance"]
    assert provenance["device"] == "cuda" and provenance["precision"].startswith("mixed")
    assert json.loads((run / "split.json").read_text())["validation"]

    out = tmp_path / "pred"
    predict = [sys.executable, "-m", "kitseg.cli", "predict", str(dataset / "case_00001"), "-o", str(out),
               "--weights", str(run / "model.kseg"), "--device", "cuda"]
    proc = subprocess.run(predict, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    pred = nib.load(str(out / "prediction_00001.nii.gz"))
    ct = nib.load(str(dataset / "case_00001" / "imaging.nii.gz"))
    assert pred.shape == ct.shape
    np.testing.assert_allclose(pred.affine, ct.affine)


def test_shipped_model_segments_alike_on_cuda_and_cpu(tmp_path):
    # Inference on CUDA runs in float16 (Segmenter._autocast); the CPU in float32. A voxel at the
    # 0.5 boundary may flip, nothing more.
    make_sample_case(seed=0).save_case_folder(tmp_path / "case_00000")
    volume = read_ct(tmp_path / "case_00000" / "imaging.nii.gz")
    results = {name: Segmenter(load_bundle(default_weights_path()), device=name, batch_size=8).segment(volume)
               for name in ("cuda", "cpu")}
    gpu, cpu = results["cuda"], results["cpu"]
    assert np.abs(gpu.y1 - cpu.y1).max() < 0.05
    assert np.mean(gpu.labels == cpu.labels) > 0.999
    for name, select in (("kidney", lambda labels: labels > 0), ("tumor", lambda labels: labels == 2)):
        a, b = select(gpu.labels), select(cpu.labels)
        assert b.sum() > 0, f"the sample CT's {name} is found on the CPU"
        dice = 2 * np.logical_and(a, b).sum() / (a.sum() + b.sum())
        assert dice > 0.99, f"{name}: Dice between the CUDA and CPU labels {dice:.4f}"
