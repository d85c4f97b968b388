"""Training both stages of the method, resumable, on one device or many (``torchrun``).

A run folder holds everything (``kits-seg train --data DIR --out RUN``)::

    RUN/config.json          the TrainConfig (a resumed run must match it)
    RUN/split.json           training and validation case names (and the --val-fraction that drew them)
    RUN/fold{k}/             stage-1 models for out-of-fold y1 (one per fold)
    RUN/oof_y1/NAME.npy      out-of-fold stage-1 predictions: what stage 2 learns from (float16;
                             since 2026-12-03 made on the slices of stage 2's training mask only, 0 elsewhere)
    RUN/val_y1/NAME.npy      the final stage 1's predictions of the validation cases (kept while that stage 1
                             and the case are unchanged: val_y1/sources.json)
    RUN/cache/               the prepared cases (``--cache`` puts them elsewhere; ``data.py``)
    RUN/stage1/, RUN/stage2/ state.pt (resume), last.kseg, best.kseg, log.csv, curves.png
    RUN/model.kseg           best stage 1 + best stage 2: the file `kits-seg predict` takes

Every piece checks for its own finished output and resumes from ``state.pt`` after an
interruption, so rerunning the same command continues where it stopped.
"""

from __future__ import annotations

import contextlib
import csv
import datetime
import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

import numpy as np
import torch
import torch.distributed as dist

from .. import __version__
from ..atomic import atomic_path
from ..checkpoint import ModelBundle, StageModel, module_weights_sha256, read_metadata, save_bundle
from ..config import KITS_LABELS, ConfigError
from ..device import get_device, mixed_precision_dtype, training_memory_format
from ..interrupt import raise_if_stop_requested
from ..io import CaseInput, InputError, name_a_few
from ..losses import deep_supervision_loss, stage1_loss
from ..metrics import dice
from ..morphology import bounding_box
from ..networks import build_network
from ..pipeline import Segmenter, make_mask, stage2_context_input, widen_stage2, widen_stage_channels
from ..preprocess import PreparedVolume
from .config import PRESETS, TrainConfig
from .data import (
    Stage1Sampler,
    Stage2Sampler,
    StageCase,
    augment_intensity,
    cache_folder,
    cache_stem,
    labelled_inputs,
    load_cases,
    mask_name,
    out_of_fold_split,
    phantom_draws,
    prepare_cases,
    preparation_workers,
    random_affine_grids,
    save_npy,
    settle_replaced_entries,
    source_keys,
    split_cases,
    training_mask,
    warp,
)
from .prefetch import Prefetcher, in_line

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------ distributed
@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def process_rank() -> int:
    """This process's number in a ``torchrun`` job (0 outside one), before the process group is joined."""
    return int(os.environ.get("RANK", "0") or 0)


def init_distributed(device_name: str) -> DistInfo:
    """Join the process group that ``torchrun`` describes in the environment (if any)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = device_name != "cpu" and torch.cuda.is_available()
    if not dist.is_initialized():
        # Rank 0 alone predicts out-of-fold y1 and validates; the others wait at a barrier meanwhile,
        # which on a large data set outlasts NCCL's 10-minute default and would abort the job.
        minutes = float(os.environ.get("KITSEG_DIST_TIMEOUT_MIN", "180"))
        dist.init_process_group(backend="nccl" if use_cuda else "gloo", timeout=datetime.timedelta(minutes=minutes))
    if use_cuda:
        torch.cuda.set_device(local)
    return DistInfo(rank, world, local)


def _barrier(info: DistInfo) -> None:
    if info.world_size > 1:
        dist.barrier()


# ------------------------------------------------------------------------------ one network
@dataclass
class StageTask:
    """What differs between stage 1 and stage 2 in the loop."""

    name: str
    architecture: str
    kwargs: dict
    batch_size: int
    steps: int
    # draw_batch(batch, rng): the arrays of one batch (numpy, CPU; may run in a background thread).
    draw_batch: Callable[[int, np.random.Generator], tuple[np.ndarray, ...]]
    # make_batch(tensors, rng, device): moves them to the device and augments them, the generator
    # continuing where draw_batch left it; returns the network input and the loss of its output.
    make_batch: Callable[[tuple[torch.Tensor, ...], np.random.Generator, torch.device], tuple[torch.Tensor, Callable]]
    validate: Callable[[torch.nn.Module], dict[str, float]] | None
    key_metric: str | None


def _atomic_torch_save(obj: dict, path: Path) -> None:
    try:
        with atomic_path(path) as tmp:
            torch.save(obj, tmp)
    except RuntimeError as exc:  # torch reports a full disk as a RuntimeError without the path
        raise OSError(f"{path}: cannot be written ({exc})") from exc


def _write_json_atomic(path: Path, data: dict) -> None:
    """A run-folder record: a job killed mid-write must not leave half a JSON file to trip the resume."""
    with atomic_path(path) as tmp:
        Path(tmp).write_text(json.dumps(data, indent=2))


def _read_run_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except ValueError as exc:
        raise ConfigError(f"{path}: not readable as JSON ({exc}); restore it or use a new --out folder") from None


def _bundle_for(config: TrainConfig, stage: str, module: torch.nn.Module, provenance: dict) -> ModelBundle:
    model = StageModel.from_module(module)
    return ModelBundle(
        preprocessing=config.preprocessing,
        label_map=KITS_LABELS,
        mask=config.mask,
        stage1=model if stage == "1" else None,
        stage2=model if stage == "2" else None,
        provenance=provenance,
    )


def precision_name(amp_dtype: torch.dtype | None) -> str:
    """``"float32"`` or e.g. ``"mixed bfloat16"``, as the provenance records it."""
    return "float32" if amp_dtype is None else f"mixed {str(amp_dtype).removeprefix('torch.')}"


def per_process_batch(batch_size: int, processes: int) -> int:
    """The samples each process draws per step: the batch shared out, at least one each."""
    return max(1, batch_size // processes)


def _say_batches_shared(config: TrainConfig, processes: int) -> None:
    """A batch the processes do not divide trains as another batch: said once, before the work."""
    for stage, batch in (("1", config.batch_size_stage1), ("2", config.batch_size_stage2)):
        each = per_process_batch(batch, processes)
        if each * processes != batch:
            log.warning("stage %s's batch of %d over %d processes trains as %d (%d each); a multiple of %d keeps "
                        "it (--set batch_size_stage%s=%d)", stage, batch, processes, each * processes, each,
                        processes, stage, max(processes, batch // processes * processes))


def train_network(
    task: StageTask, folder: Path, config: TrainConfig, device: torch.device, info: DistInfo, stage: str,
    provenance: dict, progress: bool = True, initial: dict[str, torch.Tensor] | None = None,
    prefetch: bool | None = None,
) -> torch.nn.Module:
    """Train one network (resuming from ``folder/state.pt``); returns the best (or last) module.

    ``initial``: starting weights (fine-tuning); a resumed run continues from its own state.
    ``prefetch``: draw batches ahead in a thread (default: on a GPU, where drawing them in line
    leaves it idle; on the CPU the thread would compete with the step for the same cores). The
    batches are the same either way (``prefetch.py``).
    """
    from tqdm import tqdm

    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(config.seed)
    memory_format = training_memory_format(device)
    module = build_network(task.architecture, **task.kwargs).to(device, memory_format=memory_format)
    if initial is not None:
        module.load_state_dict(initial)
    optimizer = torch.optim.Adam(module.parameters(), lr=config.learning_rate)
    if config.lr_schedule == "poly":
        decay = lambda step: max(0.0, 1.0 - step / task.steps) ** 0.9  # noqa: E731
    else:
        decay = lambda step: 1.0  # noqa: E731
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, decay)
    amp_dtype = mixed_precision_dtype(device) if config.amp else None
    log.info("%s: %s", task.name, precision_name(amp_dtype))
    scaler = torch.amp.GradScaler("cuda", enabled=amp_dtype == torch.float16)
    state_path = folder / "state.pt"
    step, best, best_loss = 0, -float("inf"), float("inf")
    if state_path.is_file():
        state = torch.load(state_path, map_location=device, weights_only=True)  # our own file; no code runs
        module.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        if state["scaler"] and scaler.is_enabled():  # a run begun without float16 saved no loss scale
            scaler.load_state_dict(state["scaler"])
        scheduler.load_state_dict(state["scheduler"])
        step, best = int(state["step"]), float(state["best"])
        best_loss = float(state.get("best_loss", float("inf")))  # absent in a state saved before 2026-12-07
        if state.get("finished"):
            log.info("%s: finished already (step %d)", folder, step)
            return _load_result(folder, module, device)
        saved_precision = state.get("precision", precision_name(amp_dtype))
        if saved_precision != precision_name(amp_dtype):  # resumed on another kind of device
            log.warning("%s: started in %s, resumed in %s", folder, saved_precision, precision_name(amp_dtype))
        saved_processes = int(state.get("processes", info.world_size))
        if saved_processes != info.world_size:  # each process draws batch / processes samples
            log.warning("%s: started with %d process(es), resumed with %d: the batches differ from then on",
                        folder, saved_processes, info.world_size)
        log.info("%s: resuming at step %d", folder, step)
    elif (folder / "last.kseg").is_file():
        log.warning("%s: holds checkpoints but no state.pt to resume from: this network is trained again from "
                    "step 0, and its best.kseg and last.kseg are replaced", folder)
    net = module
    if info.world_size > 1:
        net = torch.nn.parallel.DistributedDataParallel(module, device_ids=[info.local_rank] if device.type == "cuda" else None)
    per_rank_batch = per_process_batch(task.batch_size, info.world_size)
    log_path = folder / "log.csv"
    bar = tqdm(total=task.steps, initial=step, desc=task.name, disable=not (progress and info.is_main))
    losses: list[torch.Tensor] = []  # read back every few steps: reading waits for the GPU
    epoch_start = time.perf_counter()
    if prefetch is None:
        prefetch = device.type != "cpu"
    # Each (rank, step) draws its own batch: resuming reproduces the same sequence.
    batch_args = (task.draw_batch, config.seed, info.rank, step, task.steps, per_rank_batch)
    batches = Prefetcher(*batch_args, pin=device.type == "cuda") if prefetch else contextlib.nullcontext(in_line(*batch_args))
    with batches as steps_batches:
        for arrays, rng in steps_batches:
            raise_if_stop_requested()  # a Ctrl-C that landed in a finalizer was dropped there
            losses.append(_train_step(task, net, arrays, rng, device, memory_format, optimizer, scheduler, scaler, amp_dtype))
            step += 1
            bar.update(1)
            if step % 25 == 0:
                bar.set_postfix(loss=f"{float(torch.stack(losses[-25:]).mean()):.4f}")
            if step % config.steps_per_epoch == 0 or step == task.steps:
                mean_loss = float(torch.stack(losses).mean())
                if info.is_main:
                    metrics = task.validate(module) if task.validate else {}
                    score = metrics.get(task.key_metric, -mean_loss) if task.key_metric else -mean_loss
                    bundle = _bundle_for(config, stage, module, {**provenance, "step": step, **metrics})
                    save_bundle(bundle, folder / "last.kseg")
                    # A tie (validation Dice 0 early on, or 1 on a few easy cases) goes to the lower training loss.
                    if score > best or (score == best and mean_loss < best_loss):
                        best, best_loss = score, mean_loss
                        save_bundle(bundle, folder / "best.kseg")
                    _append_log(log_path, {"step": step, "train_loss": mean_loss, **metrics,
                                           "seconds": round(time.perf_counter() - epoch_start, 2)})
                    _atomic_torch_save(
                        {"model": module.state_dict(), "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(),
                         "scheduler": scheduler.state_dict(), "precision": precision_name(amp_dtype),
                         "processes": info.world_size, "step": step, "best": best, "best_loss": best_loss,
                         "finished": step >= task.steps},
                        state_path,
                    )
                    _plot_curves(log_path, folder / "curves.png")
                    bar.write(f"{task.name} step {step}: loss {mean_loss:.4f} " + " ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
                losses = []
                epoch_start = time.perf_counter()
                _barrier(info)
    bar.close()
    return _load_result(folder, module, device)


def _train_step(task: StageTask, net: torch.nn.Module, arrays: tuple, rng: np.random.Generator, device: torch.device,
                memory_format, optimizer, scheduler, scaler, amp_dtype) -> torch.Tensor:
    """One optimizer step on one batch; returns its loss, still on the device (reading it waits for the GPU)."""
    net.train()
    inputs, loss_fn = task.make_batch(arrays, rng, device)
    inputs = inputs.contiguous(memory_format=memory_format)
    with torch.autocast(device.type, dtype=amp_dtype) if amp_dtype is not None else contextlib.nullcontext():
        outputs = net(inputs)
    loss = loss_fn(outputs)
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()
    scheduler.step()
    return loss.detach().float()


def _load_result(folder: Path, module: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    from ..checkpoint import load_bundle

    best = folder / "best.kseg"
    if best.is_file():
        bundle = load_bundle(best)
        loaded = bundle.stage1 or bundle.stage2
        return loaded.module.to(device)
    return module


def _append_log(path: Path, row: dict) -> None:
    rows = []
    if path.is_file():
        with path.open(newline="") as fh:
            rows = [r for r in csv.DictReader(fh) if int(r["step"]) < row["step"]]  # drop rows a resume redoes
    rows.append({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})
    fields = list(dict.fromkeys(k for r in rows for k in r))
    with atomic_path(path) as tmp, tmp.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)


def _plot_curves(log_path: Path, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with log_path.open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    if not rows:
        return
    steps = [int(r["step"]) for r in rows]
    metrics = [k for k in rows[0] if k not in ("step", "train_loss", "seconds")]
    # The out-of-fold networks validate on nothing: their loss alone, not an empty Dice panel.
    fig, axes = plt.subplots(1, 2 if metrics else 1, figsize=(10 if metrics else 5.5, 3.6), squeeze=False)
    ax_loss = axes[0, 0]
    ax_loss.plot(steps, [float(r["train_loss"]) for r in rows], marker="o")
    ax_loss.set(xlabel="step", ylabel="training loss", title="loss")
    ax_loss.set_yscale("log")
    if metrics:
        ax_val = axes[0, 1]
        for m in metrics:
            ax_val.plot(steps, [float(r[m]) if r.get(m) not in (None, "") else np.nan for r in rows], marker="o",
                        label=m)
        ax_val.set(xlabel="step", ylabel="validation", title="validation Dice", ylim=(0, 1))
        ax_val.legend(loc="lower right")
    fig.suptitle(log_path.parent.name)
    fig.tight_layout()
    with atomic_path(png, ".png") as tmp:
        fig.savefig(tmp, dpi=90)
    plt.close(fig)


# ------------------------------------------------------------------------------ the two stages
def _prepared(case: StageCase, config: TrainConfig) -> PreparedVolume:
    return PreparedVolume(image=case.image, grid=None, volume=None, config=config.preprocessing)


def stage1_y1(segmenter: Segmenter, cases: list[StageCase], config: TrainConfig) -> dict[str, np.ndarray]:
    """Each case's stage-1 probabilities on the stage grid, whole volume (the pair of :func:`stage2_dice`)."""
    return {c.name: segmenter.stage1(_prepared(c, config)) for c in cases}


def predict_y1(module: torch.nn.Module, cases: list[StageCase], config: TrainConfig, device: torch.device,
               mask_slices_only: bool = False) -> dict[str, np.ndarray]:
    """Stage-1 probabilities on the stage grid, with the inference code itself.

    ``mask_slices_only``: only over the slice range of the mask stage 2 trains in
    (:func:`training_mask`); zero elsewhere, where stage 2's input is masked out. Each slice is
    predicted whole, with its neighbours, as at inference, so in that range y1 is what a full
    pass gives (cropping in-plane too would be 3.6x faster but changed y1 >= 0.5 on 1-2.5% of
    the mask: stage 1 sees across the whole slice).
    """
    task_bundle = ModelBundle(config.preprocessing, KITS_LABELS, config.mask, StageModel.from_module(module), None)
    segmenter = Segmenter(task_bundle, device=device, batch_size=16)
    if not mask_slices_only:
        return stage1_y1(segmenter, cases, config)
    context = config.preprocessing.context_slices
    y1s = {}
    for case in cases:
        y1 = np.zeros(case.image.shape, np.float32)
        box = bounding_box(training_mask(case, config.mask))
        if box is not None:
            # The neighbours of the box's end slices come along, so those slices see what they would in a full pass.
            outer = slice(max(0, box[0].start - context), min(case.image.shape[0], box[0].stop + context))
            slab = PreparedVolume(image=case.image[outer], grid=None, volume=None, config=config.preprocessing)
            y1[box[0]] = segmenter.stage1(slab)[box[0].start - outer.start: box[0].stop - outer.start]
        y1s[case.name] = y1
    return y1s


def foreground_dice(y1: dict[str, np.ndarray], cases: list[StageCase]) -> float:
    """Mean Dice of ``y1 >= 0.5`` against each case's kidney-or-tumor labels."""
    return float(np.mean([dice(y1[c.name] >= 0.5, c.labels > 0) for c in cases]))


def stage1_task(train: list[StageCase], val: list[StageCase], config: TrainConfig, steps: int, name: str, device) -> StageTask:
    sampler = Stage1Sampler(train, config.preprocessing.context_slices, config.crop_stage1, config.foreground_fraction)
    kwargs = stage1_network_kwargs(config)
    noise_sigma = config.augment_noise_sigma()

    def make_batch(arrays, rng, device):
        x, y = (a.to(device, non_blocking=True) for a in arrays)
        if config.augment:
            grid = random_affine_grids(x.shape[0], x.shape[-2:], rng, device)
            x = augment_intensity(warp(x, grid, "bilinear", fill=-1.0), rng, noise_sigma)
            y = warp(y[:, None].float(), grid, "nearest")[:, 0].long()
        return x, lambda out: stage1_loss(out, y)

    def validate(module):
        if not val:
            return {}
        return {"val_foreground_dice": foreground_dice(predict_y1(module, val, config, device), val)}

    return StageTask(name, config.stage1_architecture, kwargs, config.batch_size_stage1, steps, sampler.sample, make_batch, validate,
                     "val_foreground_dice" if val else None)


def stage1_network_kwargs(config: TrainConfig) -> dict:
    return {"in_channels": config.preprocessing.stage1_in_channels, "num_classes": 2, **config.stage1_kwargs}


def stage2_network_kwargs(config: TrainConfig) -> dict:
    return {"in_channels": config.preprocessing.stage2_in_channels, "num_classes": len(KITS_LABELS.names),
            "deep_supervision": True, **config.stage2_kwargs}


def check_networks(config: TrainConfig) -> None:
    """Both networks can be built from the recipe, so that a wrong ``--set`` on them fails at once
    with its reason, not after a run folder and a cache are made."""
    stages = (("stage 1", config.stage1_architecture, stage1_network_kwargs(config)),
              ("stage 2", config.stage2_architecture, stage2_network_kwargs(config)))
    for stage, architecture, kwargs in stages:
        try:
            build_network(architecture, **kwargs)
        except ValueError as exc:
            raise ConfigError(f"{stage}: {exc}") from None


def stage2_dice(segmenter: Segmenter, cases: list[StageCase], y1: dict[str, np.ndarray],
                config: TrainConfig) -> list[tuple[float, float]]:
    """(kidney, tumor) Dice of each case on the stage grid, stage 2 reading ``y1[case]`` and its mask."""
    scores = []
    for c in cases:
        mask = make_mask(y1[c.name], config.mask.threshold, config.mask.radius, config.mask.dilation_spacing(c.spacing))
        labels = np.argmax(segmenter.stage2(_prepared(c, config), y1[c.name], mask), axis=0)
        scores.append((dice(labels > 0, c.labels > 0), dice(labels == 2, c.labels == 2)))
    return scores


def stage2_task(train: list[StageCase], val: list[StageCase], oof_y1: dict, val_y1: dict, config: TrainConfig, device) -> StageTask:
    context = config.preprocessing.stage2_context_slices
    sampler = Stage2Sampler(train, oof_y1, config.mask, config.crop_stage2, config.tumor_fraction, context,
                            tumor_contrast=config.hu_to_units(config.stage2_tumor_contrast_hu),
                            tumor_sampling=config.tumor_sampling)
    kwargs = stage2_network_kwargs(config)
    class_weights = None if config.stage2_tumor_weight == 1 else (1.0, 1.0, config.stage2_tumor_weight)
    noise_sigma = config.augment_noise_sigma()

    def make_batch(arrays, rng, device):
        # image, y1, mask: (B, K, H, W), the sampled slice and its neighbours; labels: (B, H, W).
        image, y1, mask, labels = (a.to(device, non_blocking=True) for a in arrays)
        if config.augment:
            grid = random_affine_grids(image.shape[0], image.shape[-2:], rng, device)
            image = augment_intensity(warp(image, grid, "bilinear", fill=-1.0), rng, noise_sigma)
            y1 = warp(y1, grid, "bilinear").clamp(0, 1)
            mask = warp(mask, grid, "nearest")
            labels = warp(labels[:, None].float(), grid, "nearest")[:, 0].long()
        x = stage2_context_input(image, y1, mask)
        centre_mask = mask[:, context]
        return x, lambda out: deep_supervision_loss(out, labels, centre_mask, dice_weight=config.stage2_dice_weight,
                                                    dice_per_image=config.stage2_dice_per_image,
                                                    class_weights=class_weights,
                                                    hard_fraction=config.stage2_hard_fraction)

    def validate(module):
        if not val:
            return {}
        bundle = ModelBundle(config.preprocessing, KITS_LABELS, config.mask, None, StageModel.from_module(module))
        scores = stage2_dice(Segmenter(bundle, device=device, batch_size=16), val, val_y1, config)
        k, t = (float(np.mean(column)) for column in zip(*scores))
        return {"val_kidney_dice": k, "val_tumor_dice": t, "val_composite_dice": (k + t) / 2}

    return StageTask("stage 2", config.stage2_architecture, kwargs, config.batch_size_stage2, config.stage2_steps,
                     sampler.sample, make_batch, validate, "val_composite_dice" if val else None)


def check_run_folder_outside(run_dir: Path, data_dir: Path) -> None:
    """Refuse a run folder that is the data folder or lies within it: its files would mix with the cases."""
    data, run = Path(data_dir).resolve(), Path(run_dir).resolve()
    if run == data or data in run.parents:
        raise ConfigError(f"{run_dir}: lies within the data folder {data_dir}; the run's files would be written "
                          "among the cases: choose an --out folder outside it")


def run_case_names(run_dir: Path, config: TrainConfig) -> set[str] | None:
    """The cases of a run begun in ``run_dir`` (None if it has no split yet); refuses another recipe."""
    if (run_dir / "config.json").is_file():
        _check_config(run_dir, config)  # only compares: the run's record exists
    split_path = run_dir / "split.json"
    if not split_path.is_file():
        return None
    return _split_cases(_read_run_json(split_path))


def _split_cases(split: dict) -> set[str]:
    """Every case of a run's split, training and validation."""
    return set(split["train"]) | set(split["validation"])


def check_val_cases(val_cases: list[str] | None, inputs: list[CaseInput], data_dir: Path) -> None:
    """Refuse --val-cases that name no labelled case of the data folder."""
    unknown = sorted(set(val_cases or ()) - {c.name for c in inputs})
    if unknown:
        raise ConfigError(f"validation case(s) not in {data_dir}: {', '.join(unknown)}")


def _new_split(by_name: dict[str, StageCase], val_cases: list[str] | None, val_fraction: float, config: TrainConfig,
               data_dir: Path) -> tuple[dict[str, list], list[list[StageCase]]]:
    """A new run's train / validation split and its out-of-fold folds; refused if stage 2's
    out-of-fold y1 cannot be made from it."""
    split = _split_names(list(by_name), val_cases, val_fraction, config.seed)
    if not split["train"]:
        raise ConfigError(f"{data_dir}: no case is left to train on ({len(split['validation'])} for validation)")
    return split, _check_oof_folds([by_name[n] for n in split["train"]], config, data_dir,
                                  len(split["validation"]))


def _split_names(names: list[str], val_cases: list[str] | None, val_fraction: float, seed: int) -> dict[str, list]:
    """A new run's split of case names (what split.json keeps): the given validation cases, or a
    reproducible share of them."""
    if val_cases is not None:
        return {"train": sorted(set(names) - set(val_cases)), "validation": sorted(val_cases)}
    train, validation = split_cases(names, val_fraction, seed)
    return {"train": train, "validation": validation, "val_fraction": val_fraction}


def _check_oof_folds(train_cases: list[StageCase], config: TrainConfig, data_dir: Path,
                     n_validation: int) -> list[list[StageCase]]:
    """The out-of-fold split of the training cases; an error if a fold would be empty or all of them."""
    folds = out_of_fold_split(train_cases, config.oof_folds)
    if any(not fold or len(fold) == len(train_cases) for fold in folds):
        _refuse_oof_folds(config, data_dir, len(train_cases), n_validation)
    return folds


def _refuse_oof_folds(config: TrainConfig, data_dir: Path, n_train: int, n_validation: int) -> NoReturn:
    raise ConfigError(f"{data_dir}: out-of-fold y1 needs training images of at least {config.oof_folds} patients "
                      f"(images of one mask count once); this split trains on {n_train} case(s) and validates on "
                      f"{n_validation}: add cases, or validate on fewer (a lower --val-fraction, or fewer "
                      "--val-cases)" + (", or fewer folds (--set oof_folds=2)" if config.oof_folds > 2 else ""))


def load_initial_weights(path: Path, config: TrainConfig, warn: bool = True) -> tuple[dict[str, dict], dict]:
    """Both stages' weights from a ``.kseg`` file to fine-tune, checked against the recipe
    (``warn``: say where its mask differs; one process of a distributed run says it).

    Returns the state dicts by stage ("1", "2") and a provenance record (file name and hashes).
    The file is read like any model file: arrays and JSON only, nothing unpickled.
    """
    from ..checkpoint import load_bundle

    bundle = load_bundle(path)
    from_context = bundle.preprocessing.stage2_context_slices
    to_context = config.preprocessing.stage2_context_slices
    if not bundle.preprocessing.matches_except_stage2_context(config.preprocessing):
        theirs, mine = bundle.preprocessing.to_dict(), config.preprocessing.to_dict()
        differ = [f"{k} {theirs.get(k)!r} (the recipe's: {mine.get(k)!r})" for k in sorted(set(theirs) | set(mine))
                  if k != "stage2_context_slices" and theirs.get(k) != mine.get(k)]
        presets = [name for name, recipe in PRESETS.items()
                   if recipe.preprocessing.matches_except_stage2_context(bundle.preprocessing)]
        hint = (f"its grid is the {presets[0]!r} preset's: fine-tune with --preset {presets[0]}" if presets
                else "fine-tune with a recipe on its grid (--set preprocessing=...)")
        raise ConfigError(f"{path}: was trained on another grid or intensity window than the {config.preset!r} "
                          f"recipe: {', '.join(differ)}; {hint}")
    if from_context > to_context:
        raise ConfigError(f"{path}: its stage 2 sees {from_context} neighbouring slice(s) on each side; the recipe "
                          f"gives it {to_context}: set stage2_context_slices to at least {from_context}")
    wanted = {"1": (config.stage1_architecture, config.stage1_kwargs), "2": (config.stage2_architecture, config.stage2_kwargs)}
    stages = {}
    for key, (architecture, kwargs) in wanted.items():
        stage = bundle.stage(key)
        if stage is None:
            raise ConfigError(f"{path}: holds no stage {key} network; fine-tuning needs both stages")
        if stage.architecture == "ensemble":
            # One network is trained: start from the ensemble's first member (README, Fine-tuning).
            stage = stage.members[0]
            log.info("%s: stage %s is an ensemble; fine-tuning starts from its first member", path, key)
        wider = kwargs.get("base_channels", 0) > stage.kwargs.get("base_channels", 0)
        if key == "2" and stage.architecture == architecture and wider and all(
                stage.kwargs.get(k) == v for k, v in kwargs.items() if k != "base_channels"):
            # A wider recipe grows the given network: it starts from that network's output exactly.
            log.info("%s: stage 2 widened from %d to %d base channels (new channels start at zero weight out)",
                     path, stage.kwargs["base_channels"], kwargs["base_channels"])
            stage = widen_stage_channels(stage, kwargs["base_channels"])
        if stage.architecture != architecture or any(stage.kwargs.get(k) != v for k, v in kwargs.items()):
            raise ConfigError(f"{path}: stage {key} is {stage.architecture} {stage.kwargs}, but the recipe builds "
                              f"{architecture} {kwargs}")
        stages[key] = stage
    if to_context != from_context:
        stages["2"] = widen_stage2(stages["2"], from_context, to_context)
        log.info("%s: stage 2 widened from %d to %d neighbouring slices (new inputs start at zero weight)",
                 path, from_context, to_context)
    if warn and bundle.mask != config.mask:
        # The mask is the recipe's, in training and in the new model file: said, so that a user
        # fine-tuning the shipped model (20 mm) does not find its results read in another mask.
        radius = f"--radius {bundle.mask.radius:g}" + (" --radius-mm" if bundle.mask.radius_unit == "mm" else "")
        log.warning("%s reads stage 2 inside %s; the model this run makes will use the recipe's %s (to keep the "
                    "former: --set 'mask=%s' here, or kits-seg predict %s)", path, bundle.mask.describe(),
                    config.mask.describe(), json.dumps(bundle.mask.to_dict(), separators=(",", ":")), radius)
    states = {key: stage.module.state_dict() for key, stage in stages.items()}
    meta = read_metadata(path)
    record = {"file": Path(path).name, **{f"stage{k}_sha256": meta["stages"][k]["weights_sha256"] for k in ("1", "2")}}
    return states, record


def _starting_weights(init_from: Path | None, keep_stage1: bool, config: TrainConfig,
                      warn: bool) -> tuple[dict[str, dict], dict | None]:
    """The weights a run starts from (``--init-from``; none: from scratch) and their record
    (``init.json``), which a resumed or finished run must be given again."""
    if init_from is None:
        return {}, None
    states, record = load_initial_weights(Path(init_from), config, warn=warn)
    return states, ({**record, "keep_stage1": True} if keep_stage1 else record)


def _check_init(run_dir: Path, record: dict | None, finished: bool = False) -> None:
    """A run started from given weights must resume from the same ones (and one without, without);
    ``finished``: so must a finished run be given them, and nothing is written."""
    path = run_dir / "init.json"
    previous = _read_run_json(path) if path.is_file() else None
    started = finished or any((run_dir / d / "state.pt").is_file() for d in ("stage1", "stage2"))

    def hashes(r: dict | None) -> dict | None:  # the same weights may sit at another path now
        return {k: v for k, v in r.items() if k != "file"} if r else None

    if started and hashes(previous) != hashes(record):
        was = (f"--init-from {previous['file']}" + (" --keep-stage1" if previous.get("keep_stage1") else "")
               if previous else "no --init-from")
        raise ConfigError(f"{run_dir}: this run was started with {was}; resume it the same way or use a new --out folder")
    if finished:
        return
    if record is not None:
        _write_json_atomic(path, record)
    elif not started:
        path.unlink(missing_ok=True)  # a start from scratch after all: forget the earlier choice


def _say_split_kept(split: dict, val_cases: list[str] | None, val_fraction: float | None, run_dir: Path) -> None:
    """A --val-fraction given (None: not) other than the one the run's split was drawn with: the split stays, said."""
    made_with = split.get("val_fraction")
    if val_cases is None and None not in (made_with, val_fraction) and val_fraction != made_with:
        log.warning("%s: this run's split was drawn with --val-fraction %g, not %g; it is kept (a new --out folder "
                    "draws one with %g)", run_dir / "split.json", made_with, val_fraction, val_fraction)


def _check_split_still_fits(split: dict, names: set[str], val_cases: list[str] | None, data_dir: Path,
                            run_dir: Path, val_fraction: float | None = None) -> None:
    """A resumed run keeps its split: refuse what would change it, say what it leaves out."""
    _say_split_kept(split, val_cases, val_fraction, run_dir)
    missing = sorted(_split_cases(split) - names)
    if missing:
        raise ConfigError(f"{data_dir}: case(s) of this run's split ({run_dir / 'split.json'}) are gone: "
                          f"{name_a_few(missing)}; restore them or use a new --out folder")
    if val_cases is not None and sorted(val_cases) != sorted(split["validation"]):
        raise ConfigError(f"--val-cases differ from the validation cases this run began with ({run_dir / 'split.json'}); "
                          "resume without --val-cases or with the same ones, or use a new --out folder")
    added = sorted(names - _split_cases(split))
    if added:
        log.warning("%s: %d case(s) added since this run began are not used (its split is kept): %s", data_dir,
                    len(added), name_a_few(added))


def _check_config(run_dir: Path, config: TrainConfig) -> None:
    """Record the recipe in a new run folder; refuse to resume one made with another recipe."""
    path = run_dir / "config.json"
    current = json.loads(json.dumps(config.to_dict()))  # as it reads back from JSON (tuples -> lists)
    if path.is_file():
        # Read through the recipe class, so a field added since the run began compares at its default.
        try:
            previous = json.loads(json.dumps(TrainConfig.from_dict(_read_run_json(path)).to_dict()))
        except (ConfigError, TypeError, ValueError) as exc:  # written by an older version, or by hand
            raise ConfigError(f"{path}: {exc}; use a new --out folder") from None
        changed = sorted(k for k in set(previous) | set(current) if previous.get(k) != current.get(k))
        if changed:
            def values(k: str) -> str:  # short ones shown: repeating the run's value may be the fix
                was, now = (json.dumps(v, separators=(",", ":")) for v in (previous.get(k), current.get(k)))
                return f"{k} (the run's {was}, here {now})" if len(was) + len(now) < 80 else k

            raise ConfigError(f"{run_dir}: holds a run with another configuration (differs in: "
                              f"{', '.join(values(k) for k in changed)}); repeat the run's settings to resume it, "
                              "or use a new --out folder")
    else:
        run_dir.mkdir(parents=True, exist_ok=True)
        _write_json_atomic(path, current)


def _remove_leftover_temporaries(run_dir: Path) -> None:
    """Files a killed job was writing (``atomic_path``'s ``.NAME.*`` temporaries): never read, only in the way.

    Only in a run folder this tool made (it holds ``config.json``), and only in the folders the
    run alone writes: a cache may be shared with another run writing to it right now.
    """
    if not (run_dir / "config.json").is_file():
        return
    folders = [run_dir, *(d for d in run_dir.iterdir() if d.is_dir() and d.name != "cache")]
    for leftover in (f for folder in folders for f in folder.glob(".*.*")):
        if leftover.is_file() and leftover.suffix in (".tmp", ".npy", ".kseg", ".png"):  # atomic_path's suffixes
            log.info("removing %s, left by an interrupted write", leftover)
            leftover.unlink(missing_ok=True)


INVOCATIONS = "invocations.json"  # each command that trained the run, in order


def _record_invocation(run_dir: Path, entry: dict) -> list[dict]:
    """Add this command to the run's record of the commands that trained it; returns them all."""
    path = run_dir / INVOCATIONS
    history = _read_run_json(path) if path.is_file() else []
    history = [*(history if isinstance(history, list) else []), entry]
    _write_json_atomic(path, history)
    return history


TRAINED_ON = "trained_on.json"  # the prepared case (its files' stamp) each case of a finished run was read from


def _has_trained(run_dir: Path) -> bool:
    """The run folder holds a trained network (its state, or the model); out-of-fold y1 may be
    copied in before a run begins."""
    return (run_dir / "model.kseg").is_file() or any(run_dir.glob("*/state.pt"))


def _steps_logged(folder: Path) -> int:
    """The last step a network's ``log.csv`` records (0 if none): a stage whose steps are all
    logged has finished, and is not trained again."""
    try:
        with (folder / "log.csv").open(newline="") as fh:
            rows = list(csv.DictReader(fh))
        return int(rows[-1]["step"]) if rows else 0
    except (OSError, KeyError, ValueError):
        return 0


def _report_finished_run(run_dir: Path, data_dir: Path, config: TrainConfig, val_cases: list[str] | None,
                         cache: Path, val_fraction: float | None = None) -> None:
    """A finished run is not trained again: say so, and name what differs from what its model learnt from."""
    log.info("%s: finished already; its model is kept as it was (a new --out folder trains again)",
             run_dir / "model.kseg")
    split = _read_run_json(run_dir / "split.json")
    in_split = _split_cases(split)
    if val_cases is not None and sorted(val_cases) != sorted(split["validation"]):
        log.warning("%s: --val-cases differ from the validation cases this run was trained with", run_dir)
    _say_split_kept(split, val_cases, val_fraction, run_dir)
    try:
        inputs = [c for c in labelled_inputs(Path(data_dir)) if c.name in in_split]
    except InputError as exc:
        log.warning("the files this run was trained on cannot be compared: %s", exc)
        return
    gone = sorted(in_split - {c.name for c in inputs})
    path = run_dir / TRAINED_ON
    trained_on = _read_run_json(path) if path.is_file() else {}  # none: finished before the record was kept
    mapping = config.labels_mapped()
    changed = [c.name for c in inputs if c.name in trained_on
               and trained_on[c.name] != cache_stem(c, config.preprocessing, cache, mapping).name]
    if gone:
        log.warning("%s: %d case(s) of this run are not in it now: %s", data_dir, len(gone), name_a_few(gone))
    if changed:
        log.warning("%s: %d case(s) differ from the files this finished run's model learnt from (edited, or "
                    "another --data): %s; use a new --out folder to train on them", run_dir, len(changed),
                    name_a_few(changed))


OOF_SOURCES = "sources.json"  # in oof_y1/: the prepared case each y1 was predicted from
VAL_Y1_SOURCES = "sources.json"  # in val_y1/: the stage-1 weights and prepared case each y1 came from


def _forget_stale_oof_y1(oof_dir: Path, cases: list[StageCase], info: DistInfo) -> dict[str, str]:
    """Delete the out-of-fold y1 of cases whose CT or label file changed since (they are predicted again).

    Returns what ``oof_y1/sources.json`` records (case -> the prepared case its y1 came from), for
    the main process to add the y1 it predicts next; other processes get an empty record.
    """
    path = oof_dir / OOF_SOURCES
    sources = _read_run_json(path) if info.is_main and path.is_file() else {}
    stale = [c for c in cases if c.cache_stem is not None and sources.get(c.name, c.cache_stem.name) != c.cache_stem.name]
    for case in stale:
        (oof_dir / f"{case.name}.npy").unlink(missing_ok=True)
        sources.pop(case.name)
    if stale:
        log.info("%s: y1 of %d case(s) whose files changed will be predicted again", oof_dir, len(stale))
        _write_json_atomic(path, sources)
    _barrier(info)
    return sources


def _validation_y1(stage1: torch.nn.Module, cases: list[StageCase], val_dir: Path, config: TrainConfig,
                   device: torch.device) -> dict[str, np.ndarray]:
    """The final stage 1's y1 of the validation cases, on disk and mapped as the training cases' y1.

    A y1 already in ``val_dir`` is kept when ``sources.json`` says it came from these very
    stage-1 weights, this prepared case and this kind of device (CUDA predicts in float16): a
    resumed run, or a fine-tuning run that keeps its stage 1 (``--keep-stage1``, with ``val_y1/``
    copied from an earlier run with that stage 1), does not predict them all again (minutes on a
    CPU). Float32, so validation scores as before.
    """
    sources_path = val_dir / VAL_Y1_SOURCES
    sources = {}
    if cases and sources_path.is_file():
        try:
            sources = json.loads(sources_path.read_text())
        except ValueError as exc:
            log.warning("%s: not readable as JSON (%s); the validation y1 are predicted again", sources_path, exc)
        if not isinstance(sources, dict):
            sources = {}
    weights = module_weights_sha256(stage1) if cases else ""
    val_y1, kept = {}, 0
    for case in cases:
        raise_if_stop_requested()  # minutes of prediction on a CPU: a dropped Ctrl-C is not left waiting
        path = val_dir / f"{case.name}.npy"
        source = None
        if case.cache_stem is not None:
            source = {"stage1_sha256": weights, "case": case.cache_stem.name, "device": device.type}
        if source is not None and path.is_file() and sources.get(case.name) == source:
            kept += 1
        else:
            # A record never outlives the file it describes: dropped before the file is replaced.
            if sources.pop(case.name, None) is not None:
                _write_json_atomic(sources_path, sources)
            save_npy(path, predict_y1(stage1, [case], config, device)[case.name])
            if source is not None:
                sources[case.name] = source
                _write_json_atomic(sources_path, sources)
        val_y1[case.name] = np.load(path, mmap_mode="r")
    if kept:
        log.info("%s: kept the y1 of %d validation case(s), made by this stage 1", val_dir, kept)
    return val_y1


DEFAULT_VAL_FRACTION = 0.2


def train(
    data_dir: Path,
    run_dir: Path,
    config: TrainConfig,
    *,
    device: str = "auto",
    val_fraction: float | None = None,
    val_cases: list[str] | None = None,
    cache_dir: Path | None = None,
    progress: bool = True,
    command: str = "",
    init_from: Path | None = None,
    keep_stage1: bool = False,
) -> Path:
    """Train stage 1 (with out-of-fold twins) and stage 2; returns ``RUN/model.kseg``.

    ``init_from``: a ``.kseg`` model whose two networks are the starting point of the final
    stage 1 and stage 2 (fine-tuning, e.g. the shipped model on a user's own cases). The
    out-of-fold stage-1 models still start from scratch: the given weights may have seen the
    training cases, and their y1 would then be better than stage 1's on new cases.
    ``keep_stage1``: the given model's stage 1 *is* the run's final stage 1 (a run that trains
    stage 2 only, against the stage 1 it will be used with).
    """
    if keep_stage1 and init_from is None:
        raise ConfigError("keeping stage 1 (--keep-stage1) needs the model to keep it from (--init-from)")
    if Path(run_dir).exists() and not Path(run_dir).is_dir():
        raise ConfigError(f"{run_dir}: is a file; --out takes a run folder")
    check_run_folder_outside(run_dir, data_dir)
    check_networks(config)
    run_dir = Path(run_dir)
    model_path = run_dir / "model.kseg"
    if model_path.is_file() and (run_dir / "split.json").is_file():  # finished: its model stays as it was trained
        # Another recipe, or other starting weights, is another run, as for a run in progress.
        _check_config(run_dir, config)
        if process_rank() == 0:
            _check_init(run_dir, _starting_weights(init_from, keep_stage1, config, warn=False)[1], finished=True)
            _report_finished_run(run_dir, data_dir, config, val_cases, cache_folder(run_dir, cache_dir), val_fraction)
        return model_path
    made_run_dir = not run_dir.exists()
    draw_fraction = DEFAULT_VAL_FRACTION if val_fraction is None else val_fraction  # None: not given
    info = init_distributed(device)
    torch_device = torch.device(f"cuda:{info.local_rank}") if info.world_size > 1 and device != "cpu" and torch.cuda.is_available() else get_device(device)
    initial, init_record = _starting_weights(init_from, keep_stage1, config, warn=info.is_main)
    inputs = labelled_inputs(Path(data_dir))  # a wrong --data fails here, before a run folder is made
    split_path = run_dir / "split.json"
    if not split_path.is_file():  # so does a wrong --val-cases
        check_val_cases(val_cases, inputs, data_dir)
    new_run = not (run_dir / "config.json").is_file()
    if new_run:  # too few masks to train on for the folds: said before hours of preparation
        split = _split_names([c.name for c in inputs], val_cases, draw_fraction, config.seed)
        if len({mask_name(n) for n in split["train"]}) < config.oof_folds:  # an upper bound on the patients
            _refuse_oof_folds(config, data_dir, len(split["train"]), len(split["validation"]))
    if not split_path.is_file() and _has_trained(run_dir):
        raise ConfigError(f"{split_path}: is missing, but this run has trained already: which cases it trained and "
                          "validated on is no longer known; restore split.json, or use a new --out folder")
    if info.is_main:
        _remove_leftover_temporaries(run_dir)
        _check_config(run_dir, config)
        _check_init(run_dir, init_record)
        _say_batches_shared(config, info.world_size)
    _barrier(info)
    cache = cache_folder(run_dir, cache_dir)
    mapping = config.labels_mapped()
    split = _read_run_json(split_path) if split_path.is_file() else None
    if split is not None:
        _check_split_still_fits(split, {c.name for c in inputs}, val_cases, data_dir, run_dir, val_fraction)
        in_split = _split_cases(split)
        inputs = [c for c in inputs if c.name in in_split]  # cases added since are not used, nor prepared
    try:
        workers = preparation_workers(info.world_size)
        if info.world_size > 1:  # the processes of a run prepare their shares, then each maps them all
            prepare_cases(Path(data_dir), config.preprocessing, cache, progress and info.is_main, workers,
                          share=(info.rank, info.world_size), inputs=inputs, mapping=mapping)
            _barrier(info)
        cases = load_cases(Path(data_dir), config.preprocessing, cache, progress and info.is_main, workers,
                           inputs=inputs, mapping=mapping)
        if info.is_main:  # every case prepared and mapped: what they replace goes, or is named
            settle_replaced_entries(inputs, config.preprocessing, cache, mapping, prune=cache_dir is None)
        by_name = {c.name: c for c in cases}
        if split is not None:
            folds = _check_oof_folds([by_name[n] for n in split["train"]], config, data_dir, len(split["validation"]))
        else:
            split, folds = _new_split(by_name, val_cases, draw_fraction, config, data_dir)
    except (ConfigError, InputError):
        if new_run:  # by any process: the case refused may be in another's share of the preparation
            # This call began the run: its records go, so that the corrected command (--map-labels,
            # another --set oof_folds, --seed, split) starts afresh; the prepared cases stay for it.
            for name in ("config.json", "init.json"):
                (run_dir / name).unlink(missing_ok=True)
            if made_run_dir and info.is_main and run_dir.is_dir() and not any(run_dir.iterdir()):
                run_dir.rmdir()  # nothing else in it (a shared --cache elsewhere): no empty folder left
        raise
    if info.is_main and not split_path.is_file():
        _write_json_atomic(split_path, split)
    train_cases = [by_name[n] for n in split["train"]]
    val_set = [by_name[n] for n in split["validation"]]
    seen = {key: c.name for c in train_cases for key in source_keys(c)}
    for case in val_set:
        shared = next((key for key in source_keys(case) if key in seen), None)
        if shared is not None:
            how = "is named as another image of" if shared.startswith("name:") else "has the same label map as"
            log.warning("validation case %s %s training case %s: its Dice will be optimistic",
                        case.name, how, seen[shared])
    provenance = {
        "kitseg_version": __version__, "preset": config.preset, "data": str(data_dir), "command": command,
        "train_cases": split["train"], "validation_cases": split["validation"],
        "date": time.strftime("%Y-%m-%d"), "processes": info.world_size, "device": torch_device.type,
        "precision": precision_name(mixed_precision_dtype(torch_device) if config.amp else None),
    }
    if init_record is not None:
        provenance["init_from"] = init_record
    draws = phantom_draws(inputs)  # the cases prepared: the split's
    if draws is not None:  # synthetic cases: how each was drawn, so the model says what it learnt from
        provenance["phantoms"] = draws
    if info.is_main:  # every command that trained this run: one that resumed it may differ in processes or device
        provenance["invocations"] = _record_invocation(
            run_dir, {k: provenance[k] for k in ("date", "command", "processes", "device", "precision")})

    # 1. Out-of-fold stage-1 predictions for stage 2's training (never the ground truth).
    oof_dir = run_dir / "oof_y1"
    oof_dir.mkdir(parents=True, exist_ok=True)
    oof_sources = _forget_stale_oof_y1(oof_dir, train_cases, info)
    for k, held_out in enumerate(folds):
        if all((oof_dir / f"{c.name}.npy").is_file() for c in held_out):
            continue
        rest = [c for c in train_cases if c not in held_out]
        steps = max(1, int(round(config.stage1_steps * config.oof_steps_fraction)))
        task = stage1_task(rest, [], config, steps, f"stage 1 fold {k + 1}/{config.oof_folds}", torch_device)
        fold_provenance = {**provenance, "train_cases": [c.name for c in rest], "validation_cases": [],
                           "out_of_fold_y1_of": [c.name for c in held_out]}
        module = train_network(task, run_dir / f"fold{k + 1}", config, torch_device, info, "1", fold_provenance,
                               progress)
        if info.is_main:
            for case in held_out:  # one at a time: half the training cases' y1 at once would fill the memory
                raise_if_stop_requested()
                # Done before an interruption, or copied in from a run with the same folds.
                if (oof_dir / f"{case.name}.npy").is_file():
                    continue
                y1 = predict_y1(module, [case], config, torch_device, mask_slices_only=True)[case.name]
                save_npy(oof_dir / f"{case.name}.npy", y1.astype(np.float16))
                if case.cache_stem is not None:  # in step with the files: an interruption loses no record
                    oof_sources[case.name] = case.cache_stem.name
                    _write_json_atomic(oof_dir / OOF_SOURCES, oof_sources)
        _barrier(info)
    oof_y1 = {c.name: np.load(oof_dir / f"{c.name}.npy", mmap_mode="r") for c in train_cases}  # mapped, as the cases

    # 2. Stage 1 on all training cases (or the given model's, kept).
    task1 = stage1_task(train_cases, val_set, config, config.stage1_steps, "stage 1", torch_device)
    if keep_stage1:
        stage1 = build_network(task1.architecture, **task1.kwargs)
        stage1.load_state_dict(initial["1"])
        stage1 = stage1.to(torch_device).eval()
        log.info("stage 1: kept from %s (not trained)", init_from)
    else:
        stage1 = train_network(task1, run_dir / "stage1", config, torch_device, info, "1", provenance, progress,
                               initial=initial.get("1"))

    # 3. Stage 2 on out-of-fold y1; validated through the real stage 1, as at inference.
    val_y1 = _validation_y1(stage1, val_set if info.is_main else [], run_dir / "val_y1", config, torch_device)
    task2 = stage2_task(train_cases, val_set, oof_y1, val_y1, config, torch_device)
    stage2_trains_now = _steps_logged(run_dir / "stage2") < config.stage2_steps
    stage2 = train_network(task2, run_dir / "stage2", config, torch_device, info, "2", provenance, progress,
                           initial=initial.get("2"))

    if info.is_main:
        metrics = {}
        if keep_stage1:
            metrics["stage1"] = {"val_foreground_dice": foreground_dice(val_y1, val_set)} if val_set else {}
        for stage_dir in ("stage2",) if keep_stage1 else ("stage1", "stage2"):
            # The network in the model is its best.kseg: its own record says which step and scores.
            kept = read_metadata(run_dir / stage_dir / "best.kseg")["provenance"]
            metrics[stage_dir] = {k: v for k, v in kept.items() if k.startswith("val_") or k == "step"}
        bundle = ModelBundle(
            preprocessing=config.preprocessing, label_map=KITS_LABELS, mask=config.mask,
            stage1=StageModel.from_module(stage1.cpu()),
            stage2=StageModel.from_module(stage2.cpu()),
            provenance={**provenance, "train_config": config.to_dict(), "final_validation": metrics},
        )
        # What stage 2 learnt and was validated on, before the model (written last, it marks the run
        # finished). A model written again from finished networks keeps the record of their training.
        if stage2_trains_now or not (run_dir / TRAINED_ON).is_file():
            _write_json_atomic(run_dir / TRAINED_ON,
                               {c.name: c.cache_stem.name for c in cases if c.cache_stem is not None})
        save_bundle(bundle, model_path)
        log.info("wrote %s", model_path)
    _barrier(info)
    return model_path
