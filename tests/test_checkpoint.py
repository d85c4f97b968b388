"""The .kseg checkpoint: round trip, and every way a file can be refused."""

from __future__ import annotations

import copy
import json
import os
import pickle
import shlex
import zipfile
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest
import torch

from kitseg.checkpoint import (
    CheckpointError,
    ModelBundle,
    load_bundle,
    make_tiny_bundle,
    read_metadata,
    save_bundle,
)
from kitseg.config import PreprocessingConfig
from kitseg.networks import predict_logits


@pytest.fixture(scope="module")
def tiny_bundle() -> ModelBundle:
    return make_tiny_bundle(seed=0)


@pytest.fixture()
def saved(tiny_bundle: ModelBundle, tmp_path: Path) -> Path:
    return save_bundle(tiny_bundle, tmp_path / "tiny.kseg")


def _rewrite(
    path: Path,
    meta: Callable[[dict[str, Any]], None] | None = None,
    arrays: Callable[[dict[str, np.ndarray]], None] | None = None,
) -> None:
    """Edit a .kseg in place (metadata and/or tensors) without updating the hashes."""
    with np.load(path, allow_pickle=False) as archive:
        entries = {key: archive[key] for key in archive.files}
    data = json.loads(entries["__metadata__"].tobytes())
    if meta:
        meta(data)
    if arrays:
        arrays(entries)
    entries["__metadata__"] = np.frombuffer(json.dumps(data).encode(), dtype=np.uint8)
    with open(path, "wb") as stream:
        np.savez(stream, **entries)


def test_round_trip_gives_identical_outputs(tiny_bundle: ModelBundle, saved: Path) -> None:
    loaded = load_bundle(saved)
    assert loaded.preprocessing == tiny_bundle.preprocessing
    assert loaded.label_map == tiny_bundle.label_map and loaded.mask == tiny_bundle.mask
    assert loaded.provenance == tiny_bundle.provenance
    assert loaded.stage1.architecture == "unet2d" and loaded.stage2.architecture == "unetpp2d"
    assert not loaded.stage1.module.training
    x1 = torch.randn(1, tiny_bundle.preprocessing.stage1_in_channels, 21, 30)
    x2 = torch.randn(1, 3, 21, 30)
    with torch.no_grad():
        torch.testing.assert_close(loaded.stage1.module(x1), tiny_bundle.stage1.module(x1), rtol=0, atol=0)
        torch.testing.assert_close(
            predict_logits(loaded.stage2.module(x2)), predict_logits(tiny_bundle.stage2.module(x2)), rtol=0, atol=0
        )


def test_checkpoints_are_deflated_and_stored_ones_still_load(tiny_bundle: ModelBundle, saved: Path) -> None:
    with zipfile.ZipFile(saved) as archive:
        assert {member.compress_type for member in archive.infolist()} == {zipfile.ZIP_DEFLATED}
    _rewrite(saved)  # the same entries stored uncompressed, as checkpoints were written before
    with zipfile.ZipFile(saved) as archive:
        assert {member.compress_type for member in archive.infolist()} == {zipfile.ZIP_STORED}
    x = torch.randn(1, tiny_bundle.preprocessing.stage1_in_channels, 21, 30)
    with torch.no_grad():
        torch.testing.assert_close(load_bundle(saved).stage1.module(x), tiny_bundle.stage1.module(x), rtol=0, atol=0)


def test_make_tiny_bundle_is_seeded_and_leaves_global_rng_alone() -> None:
    state = torch.random.get_rng_state()
    a, b, c = make_tiny_bundle(seed=3), make_tiny_bundle(seed=3), make_tiny_bundle(seed=4)
    assert torch.equal(torch.random.get_rng_state(), state)
    wa, wb, wc = (next(x.stage1.module.parameters()) for x in (a, b, c))
    assert torch.equal(wa, wb) and not torch.equal(wa, wc)
    custom = make_tiny_bundle(preprocessing=PreprocessingConfig(context_slices=0))
    assert custom.stage1.module.in_channels == 1


def test_read_metadata_is_json_with_stages(saved: Path) -> None:
    meta = read_metadata(saved)
    assert meta["format"] == "kitseg-checkpoint" and meta["schema_version"] == 1
    assert set(meta["stages"]) == {"1", "2"}
    assert meta["stages"]["2"]["kwargs"]["depth"] == 2
    assert meta["label_map"] == {"names": ["background", "kidney", "tumor"]}


def test_stage1_only_bundle_round_trips(tiny_bundle: ModelBundle, tmp_path: Path) -> None:
    t = tiny_bundle
    bundle = ModelBundle(t.preprocessing, t.label_map, t.mask, stage1=t.stage1, stage2=None, provenance={})
    loaded = load_bundle(save_bundle(bundle, tmp_path / "s1.kseg"))
    assert loaded.stage1 is not None and loaded.stage2 is None


def test_save_is_atomic_and_respects_overwrite(tiny_bundle: ModelBundle, saved: Path) -> None:
    with pytest.raises(FileExistsError):
        save_bundle(tiny_bundle, saved, overwrite=False)
    save_bundle(tiny_bundle, saved)  # overwrite=True is the default
    assert [p.name for p in saved.parent.iterdir()] == ["tiny.kseg"]  # no temp file left behind
    with pytest.raises(ValueError, match=r"\.kseg suffix"):
        save_bundle(tiny_bundle, saved.with_suffix(".pt"))


class _Payload:
    """Unpickling this runs a shell command that creates ``sentinel``."""

    def __init__(self, sentinel: Path) -> None:
        self.command = f"touch {shlex.quote(str(sentinel))}"

    def __reduce__(self):
        return (os.system, (self.command,))


@pytest.mark.parametrize("writer", ["torch.save", "pickle"])
def test_malicious_pickle_is_refused_without_running(tmp_path: Path, writer: str) -> None:
    sentinel = tmp_path / "pwned"
    path = tmp_path / "evil.kseg"
    if writer == "torch.save":
        torch.save({"state_dict": _Payload(sentinel)}, path)
    else:
        path.write_bytes(pickle.dumps(_Payload(sentinel)))
    for reader in (load_bundle, read_metadata):
        with pytest.raises(CheckpointError, match="pickled files are refused because they can run code"):
            reader(path)
    assert not sentinel.exists()
    # The payload is real: unpickling it does create the sentinel.
    if writer == "pickle":
        pickle.loads(path.read_bytes())
        assert sentinel.exists()


def test_not_a_checkpoint(tmp_path: Path) -> None:
    path = tmp_path / "notes.kseg"
    path.write_text("hello")
    with pytest.raises(CheckpointError, match=r"notes\.kseg: is not a kitseg checkpoint"):
        load_bundle(path)
    with pytest.raises(FileNotFoundError):
        load_bundle(tmp_path / "missing.kseg")


def test_tampered_weights_fail_the_hash(saved: Path) -> None:
    def bump(entries: dict[str, np.ndarray]) -> None:
        key = next(k for k in entries if k.startswith("stage2/") and k.endswith("weight"))
        entries[key] = entries[key] + np.float32(1e-3)

    _rewrite(saved, arrays=bump)
    read_metadata(saved)  # the metadata alone is still fine
    with pytest.raises(CheckpointError, match=r"tiny\.kseg: the weights of stage 2 do not match their sha256"):
        load_bundle(saved)


def test_unknown_architecture_lists_valid_ones(saved: Path) -> None:
    _rewrite(saved, meta=lambda m: m["stages"]["1"].update(architecture="resnet50"))
    with pytest.raises(CheckpointError, match=r"unknown network 'resnet50'; available: ensemble, unet2d, unetpp2d"):
        read_metadata(saved)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda m: m.pop("label_map"), r"field 'label_map' is missing"),
        (lambda m: m["stages"]["2"].pop("weights_sha256"), r"field 'stages\.2\.weights_sha256' is missing"),
        (lambda m: m["preprocessing"].update(context_slice=1), r"unknown field\(s\) context_slice"),
        (lambda m: m["preprocessing"].update(context_slices=2), r"stages\.1\.kwargs\.in_channels' is 3 but must be 5"),
        (lambda m: m["preprocessing"].update(stage2_context_slices=1),
         r"stages\.2\.kwargs\.in_channels' is 3 but must be 9"),
    ],
)
def test_missing_or_wrong_field_is_named(saved: Path, edit: Callable, message: str) -> None:
    _rewrite(saved, meta=edit)
    with pytest.raises(CheckpointError, match=message):
        load_bundle(saved)


@pytest.mark.parametrize(
    ("version", "message"), [(2, "newer kitseg"), (0, "reads version 1"), ("1", "reads version 1")]
)
def test_schema_version_mismatch(saved: Path, version: Any, message: str) -> None:
    _rewrite(saved, meta=lambda m: m.update(schema_version=version))
    with pytest.raises(CheckpointError, match=rf"unsupported schema_version .*{message}"):
        read_metadata(saved)


def test_state_dict_shape_mismatch_names_keys(saved: Path) -> None:
    # Same weights (hash still valid) but kwargs describing a wider network.
    _rewrite(saved, meta=lambda m: m["stages"]["1"]["kwargs"].update(base_channels=8))
    with pytest.raises(CheckpointError, match=r"stage 1 weights do not fit unet2d.*wrong shape: decoder\.0\.0\.weight"):
        load_bundle(saved)


def test_missing_stage_tensors_detected(saved: Path) -> None:
    _rewrite(saved, arrays=lambda e: [e.pop(k) for k in [k for k in e if k.startswith("stage2/")]])
    with pytest.raises(CheckpointError, match="stage 2 is declared in the metadata but the file has no stage2/"):
        read_metadata(saved)


def test_batch_norm_networks_round_trip(tmp_path):
    """0-d buffers (num_batches_tracked) keep their shape through the file."""
    from kitseg.checkpoint import ModelBundle, StageModel, load_bundle, save_bundle
    from kitseg.config import LabelMap, MaskConfig, PreprocessingConfig
    from kitseg.networks import build_network

    stage1 = build_network("unet2d", in_channels=3, num_classes=2, base_channels=4, depth=2, norm="batch")
    stage2 = build_network("unetpp2d", in_channels=3, num_classes=3, base_channels=4, depth=2, norm="batch")
    bundle = ModelBundle(PreprocessingConfig(), LabelMap(), MaskConfig(),
                         StageModel.from_module(stage1), StageModel.from_module(stage2))
    loaded = load_bundle(save_bundle(bundle, tmp_path / "bn.kseg"))
    state = loaded.stage1.module.state_dict()
    assert state["encoder.0.1.num_batches_tracked"].shape == ()
    for (name, a), b in zip(stage2.state_dict().items(), loaded.stage2.module.state_dict().values()):
        assert a.shape == b.shape, name
        torch.testing.assert_close(a, b)


def test_provenance_summary_follows_each_stage_to_its_training_run():
    from kitseg.checkpoint import provenance_summary

    def run(date, data, cases, **extra):
        return {"date": date, "data": data, "preset": "cpu", "train_cases": [f"case_{i:05d}" for i in range(cases)],
                "validation_cases": ["case_00099"], **extra}

    first = run("2026-11-29", "phantoms_v3", 120)
    second = run("2026-12-05", "data_mixr", 240, init_from={"file": "round3.kseg", "keep_stage1": True})
    # A stage-1-only run's file, then a run that kept its stage 1: combined, stage 2 an ensemble of two.
    combined = {"date": "2026-12-05", "combined_from": {
        "stage1": {"file": "best.kseg", "provenance": first},
        "stage2": [{"file": "a.kseg", "provenance": first}, {"file": "b.kseg", "provenance": {"combined_from": {
            "stage2": {"file": "model.kseg", "provenance": second}}}}],
    }}
    lines = provenance_summary({"stages": {"1": {}, "2": {}}, "provenance": combined})
    assert lines[0] == "stage 1: trained 2026-11-29 on phantoms_v3 (120 training, 1 validation cases; cpu preset)"
    assert lines[1] == ("stage 2: ensemble of 2: trained 2026-11-29 on phantoms_v3 (120 training, 1 validation cases; "
                        "cpu preset) | trained 2026-12-05 on data_mixr (240 training, 1 validation cases; cpu preset, "
                        "fine-tuned from round3.kseg)")
    assert lines[2] == "stages joined 2026-12-05"
    # One member of that ensemble taken (combine_stages.py FILE@1) beside a new run: two origins, not three.
    third = run("2026-12-06", "data_mixe", 480)
    picked = {"date": "2026-12-06", "combined_from": {"stage2": [
        {"file": "ens.kseg", "member": 1, "provenance": combined}, {"file": "c.kseg", "provenance": third}]}}
    members = provenance_summary({"stages": {"2": {}}, "provenance": picked})[0]
    assert members == ("stage 2: ensemble of 2: trained 2026-12-05 on data_mixr (240 training, 1 validation cases; "
                       "cpu preset, fine-tuned from round3.kseg) | trained 2026-12-06 on data_mixe (480 training, "
                       "1 validation cases; cpu preset)")
    kept = provenance_summary({"stages": {"1": {}, "2": {}}, "provenance": second})
    assert kept[0] == "stage 1: kept from round3.kseg (not trained in this run)" and kept[1].startswith("stage 2: trained")
    assert provenance_summary({"stages": {"1": {}}, "provenance": {}}) == ["stage 1: not recorded"]
    assert provenance_summary({"stages": {"2": {}}, "provenance": {"note": "random"}}) == ["stage 2: random"]


def test_stage_lineage_keeps_only_the_history_of_the_stage_taken():
    """combine_stages.py cites a source cut to the stage it took, so a file built from files built
    from files does not carry every ancestor twice; the summary read from the cut is unchanged."""
    from kitseg.checkpoint import provenance_summary, stage_lineage

    def run(data):
        return {"date": "2026-12-05", "data": data, "preset": "cpu", "train_cases": ["case_00000"],
                "validation_cases": ["case_00001"]}

    older = {"date": "2026-12-04", "combined_from": {"stage1": {"file": "s1.kseg", "provenance": run("stage-1 data")},
                                                    "stage2": {"file": "s2.kseg", "provenance": run("stage-2 data")}}}
    newer = {"date": "2026-12-05", "combined_from": {
        "stage1": {"file": "older.kseg", "provenance": older},
        "stage2": [{"file": "older.kseg", "member": 0, "provenance": older},
                   {"file": "model.kseg", "provenance": run("new data")}]}}

    before = copy.deepcopy(newer)
    cut = stage_lineage(newer, "stage2")
    assert set(cut["combined_from"]) == {"stage2"}
    assert [set(e["provenance"].get("combined_from", {})) for e in cut["combined_from"]["stage2"]] == [{"stage2"}, set()]
    assert cut["combined_from"]["stage2"][0]["member"] == 0 and cut["date"] == "2026-12-05"
    assert "stage-1 data" not in str(cut) and "stage-2 data" in str(cut)
    assert "stage-2 data" not in str(stage_lineage(newer, "stage1"))
    full = provenance_summary({"stages": {"2": {}}, "provenance": newer})
    assert provenance_summary({"stages": {"2": {}}, "provenance": cut}) == full
    assert stage_lineage(run("x"), "stage1") == run("x")  # a training run's record has nothing to cut
    assert newer == before  # the input is left as it was


def test_the_model_summary_reads_what_loading_reads_and_names_what_it_cannot():
    from kitseg.checkpoint import model_summary

    summary = model_summary({"preprocessing": {"slice_spacing_mm": 5.0, "inplane_spacing_mm": 2.0},
                             "mask": {"threshold": 0.5, "radius": 20.0, "radius_unit": "mm"}})
    assert summary["mask"] == "y1 >= 0.5 dilated by 20 mm"  # as kits-seg predict says the rule
    assert summary["preprocessing"].startswith("5 mm slices, 2 mm in-plane, window -200..400 HU")
    broken = model_summary({"preprocessing": {"hu_min": "x"}, "mask": {"radius": -1}})  # no traceback: words
    assert broken["preprocessing"].startswith("unreadable (") and "radius must be" in broken["mask"]
