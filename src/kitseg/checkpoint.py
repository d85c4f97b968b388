"""The ``.kseg`` checkpoint: the weights of both stages plus everything needed to use them.

File format (``schema_version`` 1)
----------------------------------
A ``.kseg`` file is a NumPy ``.npz`` zip archive (deflated since 2026-12-06; stored before,
and read either way), read with ``allow_pickle=False`` so that loading one can never execute
code. Its entries are:

* ``stage1/<state-dict key>``, ``stage2/<state-dict key>`` -- the tensors of each stage's
  ``state_dict()`` (parameters and buffers) in their own dtype, except bfloat16 (which NumPy
  lacks), stored as float32;
* ``__metadata__`` -- a uint8 array holding UTF-8 JSON::

    {"format": "kitseg-checkpoint", "schema_version": 1, "kitseg_version": "...",
     "preprocessing": PreprocessingConfig.to_dict(), "label_map": LabelMap.to_dict(),
     "mask": MaskConfig.to_dict(),
     "stages": {"1": {"architecture": "unet2d", "kwargs": {...}, "weights_sha256": "..."},
                "2": {...}},
     "provenance": {...free JSON: training data, command, date, metrics...}}

Either stage may be absent (a stage-1-only file is valid; full prediction needs both).
``weights_sha256`` hashes, for each stored key in sorted order, the key, dtype, shape and raw
little-endian bytes (:func:`weights_sha256`), so corruption or tampering is detected before the
network is built.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
import re
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch
from torch import nn

from kitseg.atomic import atomic_path
from kitseg.config import ConfigError, LabelMap, MaskConfig, PreprocessingConfig
from kitseg.networks import UNet2D, UNetPlusPlus2D, available_networks, build_network, network_name
from kitseg.networks.ensemble import normalised_mix

logger = logging.getLogger(__name__)

FORMAT_NAME = "kitseg-checkpoint"
SCHEMA_VERSION = 1
SUFFIX = ".kseg"
METADATA_KEY = "__metadata__"
STAGE_KEYS: tuple[str, ...] = ("1", "2")
_REQUIRED_FIELDS = (
    "format", "schema_version", "kitseg_version", "preprocessing", "label_map", "mask", "stages", "provenance",
)
_STAGE_FIELDS = ("architecture", "kwargs", "weights_sha256")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


class CheckpointError(ValueError):
    """A file is not a valid, compatible kitseg checkpoint; the message names the file and the problem."""


@dataclass(frozen=True, eq=False)
class StageModel:
    """One stage's network and how to rebuild it: ``build_network(architecture, **kwargs)``."""

    architecture: str
    kwargs: dict[str, Any]
    module: nn.Module

    @classmethod
    def from_module(cls, module: nn.Module) -> "StageModel":
        """Wrap a registered network, taking its architecture name and ``init_kwargs``."""
        return cls(network_name(module), dict(module.init_kwargs), module)

    @property
    def members(self) -> list["StageModel"]:
        """The networks this stage averages: an ensemble's members, else the stage itself."""
        if self.architecture != "ensemble":
            return [self]
        return [StageModel(spec["architecture"], spec["kwargs"], module)
                for spec, module in zip(self.kwargs["members"], self.module.members)]


@dataclass(frozen=True, eq=False)
class ModelBundle:
    """Everything a prediction needs: both stages and the settings they were trained with."""

    preprocessing: PreprocessingConfig
    label_map: LabelMap
    mask: MaskConfig
    stage1: StageModel | None
    stage2: StageModel | None
    provenance: dict[str, Any] = field(default_factory=dict)

    def stage(self, key: str) -> StageModel | None:
        """The stage ``"1"`` or ``"2"``."""
        return {"1": self.stage1, "2": self.stage2}[key]


def _kitseg_version() -> str:
    import kitseg  # the package __init__ defines __version__ (setup.cfg reads it)

    return str(getattr(kitseg, "__version__", "unknown"))


def _to_numpy(tensor: torch.Tensor) -> np.ndarray:
    tensor = tensor.detach().cpu()
    if tensor.dtype == torch.bfloat16:
        tensor = tensor.float()  # NumPy has no bfloat16; float32 holds it exactly
    # np.array, not np.ascontiguousarray: the latter turns 0-d tensors (BatchNorm's
    # num_batches_tracked) into shape (1,).
    return np.array(tensor.numpy(), order="C", copy=True)


def weights_sha256(arrays: Mapping[str, np.ndarray]) -> str:
    """SHA-256 over ``key|dtype|shape`` and the raw bytes of each array, keys in sorted order."""
    digest = hashlib.sha256()
    for key in sorted(arrays):
        array = np.ascontiguousarray(arrays[key])
        array = array.astype(array.dtype.newbyteorder("<"), copy=False)  # hash is endian-independent
        digest.update(f"{key}|{array.dtype.str}|{array.shape}\n".encode())
        digest.update(array.tobytes())
    return digest.hexdigest()


def _module_arrays(module: nn.Module) -> dict[str, np.ndarray]:
    """A network's state as the arrays a ``.kseg`` stores and hashes."""
    return {name: _to_numpy(tensor) for name, tensor in module.state_dict().items()}


def module_weights_sha256(module: nn.Module) -> str:
    """:func:`weights_sha256` of a network's state: what a saved stage of it records."""
    return weights_sha256(_module_arrays(module))


# --------------------------------------------------------------------------------------- validation


def _fail(path: str | os.PathLike, problem: str) -> CheckpointError:
    return CheckpointError(f"{os.fspath(path)}: {problem}")


def _validate_metadata(meta: Any, path: str | os.PathLike) -> tuple[PreprocessingConfig, LabelMap, MaskConfig]:
    """Check the metadata's structure and the stages' compatibility; return the parsed configs."""
    if not isinstance(meta, dict):
        raise _fail(path, f"metadata must be a JSON object, got {type(meta).__name__}")
    for name in ("format", "schema_version"):
        if name not in meta:
            raise _fail(path, f"metadata field {name!r} is missing")
    if meta["format"] != FORMAT_NAME:
        raise _fail(path, f"metadata field 'format' must be {FORMAT_NAME!r}, got {meta['format']!r}")
    version = meta["schema_version"]
    if version != SCHEMA_VERSION or isinstance(version, bool):
        newer = isinstance(version, int) and not isinstance(version, bool) and version > SCHEMA_VERSION
        hint = " (written by a newer kitseg; upgrade kitseg)" if newer else ""
        raise _fail(path, f"unsupported schema_version {version!r}; this kitseg reads version {SCHEMA_VERSION}{hint}")
    for name in _REQUIRED_FIELDS:
        if name not in meta:
            raise _fail(path, f"metadata field {name!r} is missing")
    unknown = sorted(set(meta) - set(_REQUIRED_FIELDS))
    if unknown:
        raise _fail(path, f"unknown metadata field(s) {', '.join(map(repr, unknown))}")
    if not isinstance(meta["provenance"], dict):
        raise _fail(path, "metadata field 'provenance' must be a JSON object")
    try:
        preprocessing = PreprocessingConfig.from_dict(meta["preprocessing"])
        label_map = LabelMap.from_dict(meta["label_map"])
        mask = MaskConfig.from_dict(meta["mask"])
    except (ConfigError, TypeError) as error:
        raise _fail(path, f"invalid metadata: {error}") from None

    stages = meta["stages"]
    if not isinstance(stages, dict):
        raise _fail(path, "metadata field 'stages' must be a JSON object")
    unknown = sorted(set(stages) - set(STAGE_KEYS))
    if unknown:
        raise _fail(path, f"unknown stage(s) {', '.join(map(repr, unknown))} in 'stages'; valid: '1', '2'")
    for key, stage in stages.items():
        where = f"stages.{key}"
        if not isinstance(stage, dict):
            raise _fail(path, f"metadata field {where!r} must be a JSON object")
        for name in _STAGE_FIELDS:
            if name not in stage:
                raise _fail(path, f"metadata field '{where}.{name}' is missing")
        if stage["architecture"] not in available_networks():
            raise _fail(
                path,
                f"'{where}.architecture' names unknown network {stage['architecture']!r}; "
                f"available: {', '.join(available_networks())}",
            )
        if not isinstance(stage["kwargs"], dict):
            raise _fail(path, f"metadata field '{where}.kwargs' must be a JSON object")
        if not (isinstance(stage["weights_sha256"], str) and _SHA256.match(stage["weights_sha256"])):
            raise _fail(path, f"metadata field '{where}.weights_sha256' must be 64 lowercase hex digits")
        _check_stage_compatibility(key, stage["kwargs"], preprocessing, label_map, path)
    return preprocessing, label_map, mask


def _check_stage_compatibility(
    key: str, kwargs: dict[str, Any], preprocessing: PreprocessingConfig, label_map: LabelMap, path: str | os.PathLike
) -> None:
    """The channel counts the two-stage method implies (DEVELOPERS.md), before building anything."""
    if key == "1":
        expected = {"in_channels": preprocessing.stage1_in_channels, "num_classes": 2}
        why = {"in_channels": "2 * preprocessing.context_slices + 1", "num_classes": "background + foreground"}
    else:
        expected = {"in_channels": preprocessing.stage2_in_channels, "num_classes": len(label_map.names)}
        why = {"in_channels": "3 * (2 * preprocessing.stage2_context_slices + 1): mask * (y1*I, I, (1-y1)*I) per slice",
               "num_classes": "the label map"}
    members = kwargs.get("members")
    if isinstance(members, list):  # an ensemble: every member must fit the stage
        for member in members:
            if isinstance(member, dict) and isinstance(member.get("kwargs"), dict):
                _check_stage_compatibility(key, member["kwargs"], preprocessing, label_map, path)
    for name, value in expected.items():
        if name in kwargs and kwargs[name] != value:
            raise _fail(
                path, f"'stages.{key}.kwargs.{name}' is {kwargs[name]!r} but must be {value} ({why[name]})"
            )


# --------------------------------------------------------------------------------------- reading


def _open_archive(path: str | os.PathLike) -> np.lib.npyio.NpzFile:
    """Open a ``.kseg`` archive without unpickling anything; refuse anything else with a clear error."""
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(f"{path}: is a folder; a model is one .kseg file")
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such checkpoint file")
    with open(path, "rb") as stream:
        head = stream.read(4)
    refusal = "pickled files are refused because they can run code"
    if head[:1] == b"\x80":  # pickle protocol >= 2 opcode: a legacy torch.save or a raw pickle
        raise _fail(path, f"is not a kitseg checkpoint ({SUFFIX}) but a pickle; {refusal}")
    if head != b"PK\x03\x04":
        raise _fail(path, f"is not a kitseg checkpoint ({SUFFIX}): not a zip archive")
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    except zipfile.BadZipFile as error:
        raise _fail(path, f"is not a kitseg checkpoint ({SUFFIX}): corrupt archive ({error})") from None
    if any(name.endswith("data.pkl") for name in names):  # the torch.save zip layout
        raise _fail(path, f"is not a kitseg checkpoint ({SUFFIX}) but a PyTorch torch.save file; {refusal}")
    if f"{METADATA_KEY}.npy" not in names:
        raise _fail(path, f"is not a kitseg checkpoint ({SUFFIX}): no {METADATA_KEY} entry")
    return np.load(path, allow_pickle=False)


def _read_array(archive: np.lib.npyio.NpzFile, key: str, path: str | os.PathLike) -> np.ndarray:
    try:
        array = archive[key]
    except ValueError as error:  # object arrays need pickle, which allow_pickle=False refuses
        raise _fail(path, f"entry {key!r} cannot be read without unpickling ({error}); refused") from None
    except Exception as error:  # corrupt zip member, bad .npy header...
        raise _fail(path, f"entry {key!r} is unreadable: {error}") from None
    if not isinstance(array, np.ndarray):
        raise _fail(path, f"entry {key!r} is not a NumPy array")
    return array


def _metadata_from_archive(archive: np.lib.npyio.NpzFile, path: str | os.PathLike) -> dict[str, Any]:
    raw = _read_array(archive, METADATA_KEY, path)
    if raw.dtype != np.uint8 or raw.ndim != 1:
        raise _fail(path, f"{METADATA_KEY} must be a 1-D uint8 array of UTF-8 JSON")
    try:
        meta = json.loads(raw.tobytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise _fail(path, f"{METADATA_KEY} is not valid UTF-8 JSON ({error})") from None
    _validate_metadata(meta, path)
    # Each declared stage must have tensors, and no tensors may belong to an undeclared stage.
    prefixes = {name.split("/", 1)[0] for name in archive.files if name != METADATA_KEY}
    for key in meta["stages"]:
        if f"stage{key}" not in prefixes:
            raise _fail(path, f"stage {key} is declared in the metadata but the file has no stage{key}/ tensors")
    extra = sorted(prefixes - {f"stage{key}" for key in meta["stages"]})
    if extra:
        raise _fail(path, f"entries {', '.join(extra)} are not declared in the metadata's 'stages'")
    return meta


def read_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The validated metadata of a ``.kseg`` file, without reading the weights or building networks.

    Raises:
        FileNotFoundError: no file at ``path``.
        CheckpointError: not a kseg file, unsupported schema, or a missing/invalid field.
    """
    with _open_archive(path) as archive:
        return _metadata_from_archive(archive, path)


def model_summary(meta: Mapping[str, Any]) -> dict[str, str]:
    """What a model is, in words, from a file's metadata: ``{"stages", "preprocessing", "mask",
    "version"}`` (``kits-seg info`` and the plugin show them; :func:`provenance_summary` says where
    the weights came from). Read as loading reads them, defaults filled in; a part that does not
    read is shown as such (loading the file then says why)."""
    stages = meta.get("stages", {})
    stage_text = ", ".join(f"{k}: {v.get('architecture')}" for k, v in sorted(stages.items())) or "none"
    try:
        pre = PreprocessingConfig.from_dict(meta.get("preprocessing") or {})
        norm = (f"window {pre.hu_min:g}..{pre.hu_max:g} HU" if pre.normalization == "window" else pre.normalization)
        grid = f"{pre.slice_spacing_mm:g} mm slices, " + (f"{pre.inplane_spacing_mm:g} mm in-plane"
                                                          if pre.inplane_spacing_mm else "native in-plane")
        preprocessing = f"{grid}, {norm}, ±{pre.context_slices} context slice(s)"
    except (ConfigError, TypeError, ValueError) as error:
        preprocessing = f"unreadable ({error})"
    try:
        mask = MaskConfig.from_dict(meta.get("mask") or {}).describe()
    except (ConfigError, TypeError, ValueError) as error:
        mask = f"unreadable ({error})"
    return {"stages": stage_text, "preprocessing": preprocessing, "mask": mask,
            "version": f"kitseg {meta.get('kitseg_version')}, schema {meta.get('schema_version')}"}


def provenance_summary(meta: Mapping[str, Any]) -> list[str]:
    """One line per stage saying where its weights came from, read from a file's provenance.

    Files made by ``scripts/combine_stages.py`` nest their sources' provenance; this follows each
    stage down to the training run that made it (every member, for an ensemble), so a reader
    sees "trained on what, when" without the full record (``kits-seg info --json``).
    """
    provenance = meta.get("provenance") or {}
    lines = []
    for number in sorted(meta.get("stages", {})):
        origins = _stage_origins(provenance, f"stage{number}")
        weighted = _mix_label(meta["stages"][number])
        joined = origins[0] if len(origins) == 1 else f"ensemble of {len(origins)}{weighted}: " + " | ".join(origins)
        lines.append(f"stage {number}: {joined}")
    if "combined_from" in provenance and provenance.get("date"):
        lines.append(f"stages joined {provenance['date']}")
    return lines


def _mix_label(stage: Any) -> str:
    """The words for an ensemble whose members count differently (' weighted 2:1:1'), else ''."""
    kwargs = stage.get("kwargs") if isinstance(stage, dict) else None
    mix = kwargs.get("mix") if isinstance(kwargs, dict) else None
    members = kwargs.get("members") if isinstance(kwargs, dict) else None
    if mix is None or not isinstance(members, list):
        return ""
    try:
        normalised_mix(mix, len(members))
    except ValueError:
        return ""  # a malformed mix: loading the file names the problem
    return " weighted " + ":".join(f"{float(v):g}" for v in mix)


def stage_lineage(provenance: Mapping[str, Any], stage: str) -> dict[str, Any]:
    """``provenance`` with every nested ``combined_from`` cut to ``stage`` ("stage1"/"stage2").

    A file made by ``scripts/combine_stages.py`` cites its sources with their provenance; a source
    cited for one stage needs only that stage's history. Citing the whole of it for each stage
    taken doubled the record with every round (round 11's file: 1.6 MB of metadata, nearly all
    two copies of round 10's).
    """
    combined = provenance.get("combined_from")
    if not isinstance(combined, Mapping) or stage not in combined:
        return dict(provenance)
    entries = combined[stage]

    def cut(entry: Mapping[str, Any]) -> dict[str, Any]:
        return {**entry, "provenance": stage_lineage(entry.get("provenance") or {}, stage)}

    kept = [cut(e) for e in entries] if isinstance(entries, list) else cut(entries)
    return {**provenance, "combined_from": {stage: kept}}


def _stage_origins(provenance: Mapping[str, Any], stage: str) -> list[str]:
    combined = provenance.get("combined_from")
    if isinstance(combined, Mapping) and stage in combined:
        entries = combined[stage] if isinstance(combined[stage], list) else [combined[stage]]
        origins = []
        for entry in entries:
            found = _stage_origins(entry.get("provenance") or {}, stage)
            member = entry.get("member")  # FILE@K took one member of that file's ensemble: only its origin
            if isinstance(member, int) and len(found) > 1 and 0 <= member < len(found):
                found = [found[member]]
            origins += found
        return origins
    init_from = provenance.get("init_from") or {}
    if stage == "stage1" and init_from.get("keep_stage1"):
        return [f"kept from {init_from.get('file', 'another model')} (not trained in this run)"]
    if "train_cases" not in provenance:
        return [str(provenance.get("note", "not recorded"))]  # e.g. make_tiny_bundle's
    train, val = len(provenance.get("train_cases") or []), len(provenance.get("validation_cases") or [])
    started = f", fine-tuned from {init_from['file']}" if init_from.get("file") else ""
    return [f"trained {provenance.get('date', '?')} on {provenance.get('data', '?')} ({train} training, {val} validation "
            f"cases; {provenance.get('preset', '?')} preset{started})"]


def _load_stage(
    archive: np.lib.npyio.NpzFile, key: str, stage: dict[str, Any], path: str | os.PathLike, device: torch.device
) -> StageModel:
    prefix = f"stage{key}/"
    arrays = {
        name[len(prefix) :]: _read_array(archive, name, path) for name in archive.files if name.startswith(prefix)
    }
    if weights_sha256(arrays) != stage["weights_sha256"]:
        raise _fail(
            path, f"the weights of stage {key} do not match their sha256 (the file is corrupted or was modified)"
        )
    try:
        module = build_network(stage["architecture"], **stage["kwargs"])
    except ValueError as error:
        raise _fail(path, f"'stages.{key}.kwargs' cannot build the network: {error}") from None

    expected = module.state_dict()
    missing = sorted(set(expected) - set(arrays))
    unexpected = sorted(set(arrays) - set(expected))
    wrong_shape = sorted(k for k in set(expected) & set(arrays) if tuple(expected[k].shape) != arrays[k].shape)
    problems = []
    for label, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong_shape)):
        if keys:
            shown = ", ".join(keys[:3]) + (f" (+{len(keys) - 3} more)" if len(keys) > 3 else "")
            problems.append(f"{label}: {shown}")
    if problems:
        fit = f"{stage['architecture']} {stage['kwargs']}"
        raise _fail(path, f"stage {key} weights do not fit {fit}: {'; '.join(problems)}")
    # np.load gives read-only views of the archive's bytes; torch wants writable memory.
    state = {name: torch.from_numpy(np.array(array)) for name, array in arrays.items()}
    module.load_state_dict(state, strict=True)
    module.to(device).eval()
    return StageModel(stage["architecture"], dict(stage["kwargs"]), module)


def load_bundle(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> ModelBundle:
    """Load a ``.kseg`` file: validate it, verify the weights' hashes, build and fill the networks.

    The networks are moved to ``map_location`` and put in eval mode.

    Raises:
        FileNotFoundError: no file at ``path``.
        CheckpointError: any problem with the file; the message names the file and the problem.
    """
    device = torch.device(map_location)
    with _open_archive(path) as archive:
        meta = _metadata_from_archive(archive, path)
        preprocessing, label_map, mask = _validate_metadata(meta, path)
        stages = {key: _load_stage(archive, key, stage, path, device) for key, stage in meta["stages"].items()}
    logger.info("Loaded checkpoint %s (stages: %s)", os.fspath(path), ", ".join(sorted(stages)) or "none")
    return ModelBundle(
        preprocessing=preprocessing,
        label_map=label_map,
        mask=mask,
        stage1=stages.get("1"),
        stage2=stages.get("2"),
        provenance=meta["provenance"],
    )


# --------------------------------------------------------------------------------------- writing


def _stage_arrays(stage: StageModel, key: str) -> dict[str, np.ndarray]:
    try:
        registered = network_name(stage.module)
    except ValueError as error:
        raise ValueError(f"stage {key}: {error}") from None
    if registered != stage.architecture:
        raise ValueError(f"stage {key}: architecture {stage.architecture!r} but the module is a {registered!r}")
    init_kwargs = getattr(stage.module, "init_kwargs", None)
    if init_kwargs is not None and dict(init_kwargs) != dict(stage.kwargs):
        raise ValueError(f"stage {key}: kwargs {stage.kwargs} differ from the module's init_kwargs {init_kwargs}")
    return _module_arrays(stage.module)


def save_bundle(bundle: ModelBundle, path: str | os.PathLike, overwrite: bool = True) -> Path:
    """Write ``bundle`` to ``path`` (which must end in ``.kseg``) atomically.

    The archive is written to a temporary file in the same folder, flushed to disk and then
    renamed over ``path``, so a crash never leaves a half-written checkpoint behind.

    Raises:
        FileExistsError: ``path`` exists and ``overwrite`` is False.
        ValueError: a wrong suffix, a stage whose module is not the registered architecture,
            or metadata that is not JSON-able or fails validation.
    """
    path = Path(path)
    if path.suffix != SUFFIX:
        raise ValueError(f"{path}: a kitseg checkpoint must have the {SUFFIX} suffix")
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; pass overwrite=True to replace it")

    arrays: dict[str, np.ndarray] = {}
    stages_meta: dict[str, Any] = {}
    for key in STAGE_KEYS:
        stage = bundle.stage(key)
        if stage is None:
            continue
        stage_arrays = _stage_arrays(stage, key)
        stages_meta[key] = {
            "architecture": stage.architecture,
            "kwargs": copy.deepcopy(dict(stage.kwargs)),
            "weights_sha256": weights_sha256(stage_arrays),
        }
        arrays.update({f"stage{key}/{name}": array for name, array in stage_arrays.items()})
    meta = {
        "format": FORMAT_NAME,
        "schema_version": SCHEMA_VERSION,
        "kitseg_version": _kitseg_version(),
        "preprocessing": bundle.preprocessing.to_dict(),
        "label_map": bundle.label_map.to_dict(),
        "mask": bundle.mask.to_dict(),
        "stages": stages_meta,
        "provenance": bundle.provenance,
    }
    try:
        text = json.dumps(meta, allow_nan=False, sort_keys=True)
    except (TypeError, ValueError) as error:
        raise ValueError(f"{path}: the checkpoint metadata is not JSON-able: {error}") from None
    _validate_metadata(json.loads(text), path)  # never write a file load_bundle would refuse
    arrays[METADATA_KEY] = np.frombuffer(text.encode("utf-8"), dtype=np.uint8)

    with atomic_path(path) as tmp, open(tmp, "wb") as stream:
        # Deflated: float32 weights shrink by about 8%, which keeps a shipped model of three stage-2
        # networks under 20 MB; inflating costs that model 0.08 s more to load (0.195 s against 0.120 s,
        # 2 AMD EPYC cores). Stored (older) archives load the same.
        np.savez_compressed(stream, **arrays)
    logger.info("Saved checkpoint %s (stages: %s)", path, ", ".join(stages_meta) or "none")
    return path


# --------------------------------------------------------------------------------------- test helper


def make_tiny_bundle(seed: int = 0, preprocessing: PreprocessingConfig | None = None) -> ModelBundle:
    """A tiny, randomly initialised two-stage bundle (base_channels=4, depth=2) for tests and demos.

    The weights are deterministic for a given ``seed`` and the global RNG is left untouched.
    Its predictions are meaningless.
    """
    preprocessing = preprocessing or PreprocessingConfig()
    label_map = LabelMap()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        stage1 = UNet2D(preprocessing.stage1_in_channels, 2, base_channels=4, depth=2)
        stage2 = UNetPlusPlus2D(preprocessing.stage2_in_channels, len(label_map.names), base_channels=4, depth=2,
                                deep_supervision=True)
    return ModelBundle(
        preprocessing=preprocessing,
        label_map=label_map,
        mask=MaskConfig(),
        stage1=StageModel.from_module(stage1.eval()),
        stage2=StageModel.from_module(stage2.eval()),
        provenance={"note": "tiny random weights for tests; predictions are meaningless", "seed": seed},
    )
