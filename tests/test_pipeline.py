"""The two-stage pipeline, step by step and end to end, with a tiny random checkpoint."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from kitseg.geometry import Volume
from kitseg.pipeline import Segmentation, Segmenter, make_mask, stage2_input
from kitseg.preprocess import prepare



def test_stage2_input_formula_on_a_tiny_array():
    image = np.array([[2.0, -1.0], [0.5, 4.0]], np.float32)
    y1 = np.array([[0.25, 1.0], [0.0, 0.5]], np.float32)
    mask = np.array([[1, 1], [0, 1]], bool)
    i2 = stage2_input(image, y1, mask)
    assert i2.shape == (3, 2, 2)
    np.testing.assert_allclose(i2[0], [[0.5, -1.0], [0.0, 2.0]])  # y1 * I
    np.testing.assert_allclose(i2[1], [[2.0, -1.0], [0.0, 4.0]])  # I
    np.testing.assert_allclose(i2[2], [[1.5, 0.0], [0.0, 2.0]])  # (1 - y1) * I
    with pytest.raises(ValueError, match="one shape"):
        stage2_input(image, y1[:1], mask)


def test_make_mask_thresholds_then_dilates():
    y1 = np.zeros((9, 9, 9), np.float32)
    y1[4, 4, 4] = 0.6
    y1[0, 0, 0] = 0.4  # below threshold: ignored
    mask = make_mask(y1, threshold=0.5, radius=2)
    assert mask[4, 4, 4] and mask[4, 4, 6] and mask[4, 6, 4] and not mask[4, 6, 6]  # ball, not cube
    assert not mask[0, 0, 0]
    assert mask.sum() == 33  # voxels of a radius-2 ball
    with pytest.raises(ValueError, match="threshold"):
        make_mask(y1, threshold=1.5)


@pytest.fixture(scope="module")
def volume():
    from kitseg.phantom import make_synthetic_case

    case = make_synthetic_case(shape=(21, 40, 44), spacing=(2.5, 1.5, 1.5), seed=3)
    return Volume.from_source_array(case.ct, case.affine)


def test_steps_fill_outputs_and_keep_shapes(tiny_bundle, volume):
    segmenter = Segmenter(tiny_bundle, device="cpu", batch_size=4)
    prepared = segmenter.prepare(volume)
    zs = prepared.image.shape[0]
    assert zs == round(21 * 2.5 / 5.0)
    y1 = np.full(prepared.image.shape, -1.0, np.float32)
    progress = list(segmenter.iter_stage1(prepared, y1))
    assert [p.done for p in progress][-1] == zs and progress[0].slices == (0, 4)
    assert y1.min() >= 0 and y1.max() <= 1
    mask = np.zeros_like(y1, bool)
    mask[3:6, 10:20, 12:25] = True
    probs = segmenter.stage2(prepared, y1, mask)
    assert probs.shape == (3,) + prepared.image.shape
    np.testing.assert_allclose(probs.astype(np.float32).sum(axis=0), 1.0, atol=5e-3)
    assert np.all(probs[0][~mask] == 1)  # background outside the mask, as the method defines
    labels = segmenter.labels_on_source(prepared, probs)
    assert labels.shape == volume.shape and labels.dtype == np.uint8
    assert set(np.unique(labels)) <= {0, 1, 2}


def test_empty_mask_gives_background(tiny_bundle, volume):
    segmenter = Segmenter(tiny_bundle, device="cpu")
    prepared = segmenter.prepare(volume)
    y1 = segmenter.stage1(prepared)
    probs = segmenter.stage2(prepared, y1, np.zeros_like(y1, bool))
    assert np.all(segmenter.labels_on_source(prepared, probs) == 0)


def test_stopping_the_generator_keeps_finished_batches(tiny_bundle, volume):
    segmenter = Segmenter(tiny_bundle, device="cpu", batch_size=2)
    prepared = segmenter.prepare(volume)
    y1 = np.full(prepared.image.shape, -1.0, np.float32)
    steps = segmenter.iter_stage1(prepared, y1)
    first = next(steps)
    steps.close()
    start, stop = first.slices
    assert np.all(y1[start:stop] >= 0) and np.all(y1[stop:] == -1)


def test_segment_end_to_end_matches_steps(tiny_bundle, volume):
    segmenter = Segmenter(tiny_bundle, device="cpu")
    result = segmenter.segment(volume)
    assert isinstance(result, Segmentation)
    prepared = prepare(volume, tiny_bundle.preprocessing)
    y1 = segmenter.stage1(prepared)
    np.testing.assert_allclose(result.y1, y1, atol=1e-6)
    mask = make_mask(y1, tiny_bundle.mask.threshold, tiny_bundle.mask.radius)
    np.testing.assert_array_equal(result.mask, mask)
    labels = segmenter.labels_on_source(prepared, segmenter.stage2(prepared, y1, mask))
    np.testing.assert_array_equal(result.labels, labels)


def test_segmenter_needs_both_stages(tiny_bundle):
    segmenter = Segmenter(replace(tiny_bundle, stage2=None), device="cpu")
    with pytest.raises(ValueError, match="no stage 2"):
        segmenter.require_both_stages()


def test_pruned_stage2_uses_the_shallow_head(volume):
    import torch

    from kitseg.checkpoint import make_tiny_bundle

    pruned = Segmenter(make_tiny_bundle(seed=0), device="cpu", stage2_level=1)  # own copy: the level sticks
    prepared = pruned.prepare(volume)
    y1 = pruned.stage1(prepared)
    mask = np.ones_like(y1, bool)
    probs = pruned.stage2(prepared, y1, mask)
    x = torch.from_numpy(stage2_input(prepared.image, y1, mask))  # (Zs, 3, Ys, Xs)
    with torch.inference_mode():
        expected = torch.softmax(pruned.stage2_net(x, level=1)[0], dim=1).numpy().transpose(1, 0, 2, 3)
    np.testing.assert_allclose(probs.astype(np.float32), expected, atol=2e-3)
    with pytest.raises(ValueError):
        Segmenter(make_tiny_bundle(seed=0), device="cpu", stage2_level=9)


def test_stage2_neighbours_widened_network_predicts_as_before_then_uses_them(tiny_bundle, volume):
    import torch

    from kitseg.pipeline import stage2_context_input, widen_stage2

    plain = tiny_bundle.stage2
    wide = widen_stage2(plain, 0, 1)
    assert wide.kwargs == {**plain.kwargs, "in_channels": 9} and widen_stage2(plain, 0, 0) is plain
    net = wide.module
    wide_bundle = replace(tiny_bundle, preprocessing=replace(tiny_bundle.preprocessing, stage2_context_slices=1),
                          stage2=wide)
    before, after = Segmenter(tiny_bundle, device="cpu", batch_size=3), Segmenter(wide_bundle, device="cpu", batch_size=3)
    prepared = before.prepare(volume)
    y1 = before.stage1(prepared)
    mask = make_mask(y1, 0.5, 2) | (np.arange(y1.shape[0]) >= 2)[:, None, None]
    np.testing.assert_allclose(after.stage2(prepared, y1, mask).astype(np.float32),
                               before.stage2(prepared, y1, mask).astype(np.float32), atol=2e-3)
    # The input puts each slice's (y1*I, I, (1-y1)*I) slice by slice, the centre in channels 3..5.
    near = np.array([[0, 0, 1], [3, 4, 5]])
    x = stage2_context_input(prepared.image[near], y1[near], mask[near])
    assert x.shape == (2, 9) + prepared.image.shape[1:]
    np.testing.assert_array_equal(x[1, 3:6], stage2_input(prepared.image[4], y1[4], mask[4]))
    np.testing.assert_array_equal(x[0, 0:3], x[0, 3:6])  # the first slice's missing neighbour: itself
    # Once the neighbours' weights are not zero they change the output.
    first = next(p for p in net.parameters() if p.ndim == 4)
    with torch.no_grad():
        first[:, :3] = 0.5
    assert not np.allclose(after.stage2(prepared, y1, mask).astype(np.float32),
                           before.stage2(prepared, y1, mask).astype(np.float32), atol=1e-2)


def test_mirroring_averages_a_slice_and_its_mirror_image(tiny_bundle, volume):
    plain = Segmenter(tiny_bundle, device="cpu")
    mirrored = Segmenter(tiny_bundle, device="cpu", mirror=True)
    prepared = plain.prepare(volume)
    flipped = replace(prepared, image=np.ascontiguousarray(prepared.image[:, :, ::-1]))
    y1 = plain.stage1(prepared)
    y1_of_mirror_image = plain.stage1(flipped)[:, :, ::-1]
    np.testing.assert_allclose(mirrored.stage1(prepared), 0.5 * (y1 + y1_of_mirror_image), atol=1e-5)
    assert not np.allclose(y1, y1_of_mirror_image, atol=1e-3)  # the random network is not symmetric


def test_stage2_only_mirroring_leaves_stage1_as_it_is(tiny_bundle, volume):
    plain = Segmenter(tiny_bundle, device="cpu")
    stage2_only = Segmenter(tiny_bundle, device="cpu", mirror="stage2")
    both = Segmenter(tiny_bundle, device="cpu", mirror="both")
    prepared = plain.prepare(volume)
    y1 = plain.stage1(prepared)
    np.testing.assert_array_equal(stage2_only.stage1(prepared), y1)
    mask = make_mask(y1, 0.0, 0)  # every voxel: stage 2 runs on whole slices
    probs = plain.stage2(prepared, y1, mask).astype(np.float32)
    flipped = replace(prepared, image=np.ascontiguousarray(prepared.image[:, :, ::-1]))
    probs_of_mirror_image = plain.stage2(flipped, np.ascontiguousarray(y1[:, :, ::-1]), mask)[..., ::-1].astype(np.float32)
    expected = 0.5 * (probs + probs_of_mirror_image)
    np.testing.assert_allclose(stage2_only.stage2(prepared, y1, mask).astype(np.float32), expected, atol=2e-3)
    np.testing.assert_allclose(both.stage2(prepared, y1, mask).astype(np.float32), expected, atol=2e-3)
    assert not np.allclose(probs, probs_of_mirror_image, atol=1e-2)  # the random network is not symmetric
    assert Segmenter(tiny_bundle, device="cpu", mirror=True).mirror == "both"
    with pytest.raises(ValueError, match="mirror must be one of off, stage2, both"):
        Segmenter(tiny_bundle, device="cpu", mirror="stage1")


def test_a_ct_without_air_in_hu_is_named_in_a_warning(tiny_bundle, volume, tmp_path, caplog):
    import nibabel as nib

    from kitseg.io import read_ct
    from kitseg.pipeline import hu_warning

    assert hu_warning(volume) is None  # air at -1000: HU
    raw = np.asarray(volume.array, np.float32) + 1024  # a scanner's raw values, the intercept lost
    path = tmp_path / "raw.nii.gz"
    nib.save(nib.Nifti1Image(raw.astype(np.int16), volume.affine), str(path))
    with caplog.at_level("WARNING", logger="kitseg.pipeline"):
        Segmenter(tiny_bundle, device="cpu").prepare(read_ct(path))
    assert "raw.nii.gz: its lowest values are about" in caplog.text and "rescale intercept" in caplog.text


def test_tumor_slice_smoothing_decides_kidney_or_tumor_and_never_foreground(tiny_bundle, volume):
    from kitseg.pipeline import tumor_lead

    prepared = Segmenter(tiny_bundle, device="cpu").prepare(volume)
    probs = np.zeros((3,) + prepared.image.shape, np.float32)
    probs[0] = 1.0
    region = (slice(1, 9), slice(8, 30), slice(8, 30))
    probs[(slice(None),) + region] = np.array([0.1, 0.6, 0.3], np.float32)[:, None, None, None]
    probs[:, 4, 8:18, 8:30] = np.array([0.1, 0.35, 0.55], np.float32)[:, None, None]  # one slice's tumor call
    probs[:, 5:8, 20:30, 8:30] = np.array([0.1, 0.3, 0.6], np.float32)[:, None, None, None]  # a tumor through three
    lead = tumor_lead(probs, 0.25)
    assert lead[4, 10, 10] == pytest.approx(0.5 * 0.2 + 0.25 * (-0.3 - 0.3))  # outvoted by its neighbours
    assert lead[6, 25, 10] == pytest.approx(0.3) and lead[5, 25, 10] == pytest.approx(0.5 * 0.3 + 0.25 * (-0.3 + 0.3))
    np.testing.assert_allclose(tumor_lead(probs, 0.0), probs[2] - probs[1])
    # Only the foreground's box is computed: the same values, stored float16 or not.
    np.testing.assert_allclose(tumor_lead(probs, 0.25, region), lead, atol=1e-7)
    np.testing.assert_allclose(tumor_lead(probs.astype(np.float16), 0.25, region), lead, atol=2e-3)
    ends = np.zeros_like(probs)  # the volume's first and last slices count their own value twice
    ends[2, [0, -1]], ends[2, [1, -2]] = 0.8, 0.4
    assert tumor_lead(ends, 0.25)[0, 0, 0] == pytest.approx(0.75 * 0.8 + 0.25 * 0.4)
    assert tumor_lead(ends, 0.25)[-1, 0, 0] == pytest.approx(0.75 * 0.8 + 0.25 * 0.4)

    alone = Segmenter(tiny_bundle, device="cpu", tumor_slice_smoothing=0.0).labels_on_source(prepared, probs, None)
    smoothed = Segmenter(tiny_bundle, device="cpu", tumor_slice_smoothing=0.25).labels_on_source(prepared, probs, None)
    np.testing.assert_array_equal(alone > 0, smoothed > 0)  # the foreground is the argmax's either way
    flicker = prepared.grid.to_source(np.where(np.arange(probs.shape[1]) == 4, 1.0, 0.0)[:, None, None]
                                      * (probs[2] > probs[1])) > 0.9  # source voxels read from the one-slice call
    assert flicker.any() and (alone[flicker] == 2).all() and (smoothed[flicker] == 1).all()
    through_three = np.zeros(probs.shape[1:], np.float32)
    through_three[5:8, 20:30, 8:30] = 1.0
    body = prepared.grid.to_source(through_three) > 0.99
    assert body.any() and (smoothed[body] == 2).all()
    for bad in (0.5, -0.1, float("nan")):
        with pytest.raises(ValueError, match="tumor_slice_smoothing"):
            Segmenter(tiny_bundle, device="cpu", tumor_slice_smoothing=bad)

    # A lead map given by the caller (studies of other rules) decides kidney or tumor in the rule's place.
    segmenter = Segmenter(tiny_bundle, device="cpu", tumor_slice_smoothing=0.25)
    np.testing.assert_array_equal(segmenter.labels_on_source(prepared, probs, None, lead=lead), smoothed)
    np.testing.assert_array_equal(segmenter.labels_on_source(prepared, probs, None, lead=probs[2] - probs[1]), alone)
    all_tumor = segmenter.labels_on_source(prepared, probs, None, lead=np.ones(probs.shape[1:], np.float32))
    np.testing.assert_array_equal(all_tumor, np.where(smoothed > 0, 2, 0))
    with pytest.raises(ValueError, match="lead has shape"):
        segmenter.labels_on_source(prepared, probs, None, lead=lead[1:])
