"""Resampling to the stage grid and back, and normalization."""

from __future__ import annotations

import numpy as np
import pytest

from kitseg.config import ConfigError, PreprocessingConfig
from kitseg.geometry import Volume
from kitseg.preprocess import StageGrid, normalize, prepare, resampling_matrix

from .conftest import make_affine


def test_resampling_matrix_rows_sum_to_one_and_keep_linear_ramps():
    for n_in, n_out in [(30, 10), (10, 30), (7, 7), (61, 13), (5, 1)]:
        w = resampling_matrix(n_in, n_out)
        assert w.shape == (n_out, n_in)
        np.testing.assert_allclose(w.sum(axis=1), 1.0, rtol=1e-6)
    # Upsampling a ramp by linear interpolation reproduces the ramp inside the covered extent.
    ramp = np.arange(10, dtype=np.float32)
    up = resampling_matrix(10, 20) @ ramp
    expected = (np.arange(20) + 0.5) * 0.5 - 0.5
    inside = (expected >= 0) & (expected <= 9)
    np.testing.assert_allclose(up[inside], expected[inside], atol=1e-5)


def test_downsampling_averages_thin_slices():
    # 1 mm slices -> 5 mm: a single bright thin slice spreads over the thick slice it falls in.
    w = resampling_matrix(50, 10)
    signal = np.zeros(50, np.float32)
    signal[22] = 1.0
    out = w @ signal
    assert out.argmax() == 4  # slice 22 lies in thick slice 4 (mm 20..25)
    assert 0 < out.max() < 0.5  # averaged, not sampled


def _volume(shape=(23, 20, 18), spacing=(1.25, 0.8, 0.8), orientation="kits") -> Volume:
    rng = np.random.default_rng(0)
    ct = rng.normal(40, 30, size=shape).astype(np.float32)
    return Volume.from_source_array(ct, make_affine(orientation, spacing))


def test_stage_grid_shape_spacing_and_extent():
    volume = _volume()
    config = PreprocessingConfig(slice_spacing_mm=5.0, inplane_spacing_mm=1.6)
    grid = StageGrid.for_volume(volume, config)
    assert grid.shape == (6, 10, 9)  # round(23*1.25/5)=6, round(20*0.8/1.6)=10, round(18*0.8/1.6)=9
    np.testing.assert_allclose(grid.spacing, (23 * 1.25 / 6, 1.6, 1.6))
    # Both grids cover the same extent: the outer voxel faces coincide in world space.
    def faces(affine, shape):
        corners = np.array([[-0.5] * 3 + [1], [n - 0.5 for n in shape] + [1]]).T
        return (affine @ corners)[:3]

    np.testing.assert_allclose(faces(grid.affine, grid.shape), faces(volume.affine, volume.shape), atol=1e-9)


def test_round_trip_of_smooth_field_is_close_and_shapes_exact():
    z, y, x = np.meshgrid(np.arange(23), np.arange(20), np.arange(18), indexing="ij")
    smooth = (0.02 * z + 0.03 * y - 0.01 * x).astype(np.float32)
    volume = Volume.from_source_array(smooth, make_affine("kits", (1.25, 0.8, 0.8)))
    grid = StageGrid.for_volume(volume, PreprocessingConfig(slice_spacing_mm=2.5))
    stage = grid.to_stage(volume.array)
    back = grid.to_source(stage)
    assert back.shape == volume.shape
    interior = (slice(4, -4), slice(None), slice(None))  # kernels are truncated at the ends
    # The anti-aliasing kernel sampled off-centre shifts a ramp by a few hundredths of a slice
    # (0.02 per slice here), so 1e-3 means: position kept within 5% of a slice.
    np.testing.assert_allclose(back[interior], smooth[interior], atol=1e-3)


def test_channels_are_carried_back():
    volume = _volume()
    grid = StageGrid.for_volume(volume, PreprocessingConfig(inplane_spacing_mm=1.6))
    probs = np.random.default_rng(0).random((3,) + grid.shape).astype(np.float16)
    back = grid.to_source(probs)
    assert back.shape == (3,) + volume.shape
    np.testing.assert_allclose(back[1], grid.to_source(probs[1]), atol=1e-6)


def test_source_box_covers_stage_box():
    volume = _volume()
    grid = StageGrid.for_volume(volume, PreprocessingConfig(inplane_spacing_mm=1.6))
    stage = np.zeros(grid.shape, np.float32)
    stage[2:4, 3:5, 4:6] = 1
    back = grid.to_source(stage)
    box = grid.source_box((slice(2, 4), slice(3, 5), slice(4, 6)))
    outside = back.copy()
    outside[box] = 0
    assert outside.max() == 0 and back[box].max() > 0


def test_normalization_window_and_zscore():
    hu = np.array([-1000.0, -200.0, 100.0, 400.0, 3000.0], np.float32)
    out = normalize(hu.copy(), PreprocessingConfig(normalization="window", hu_min=-200, hu_max=400))
    np.testing.assert_allclose(out, [-1, -1, 0, 1, 1])
    z = normalize(np.array([1.0, 2.0, 3.0], np.float32), PreprocessingConfig(normalization="zscore"))
    np.testing.assert_allclose(z, [-1.2247449, 0, 1.2247449], rtol=1e-6)


def test_prepare_from_any_orientation_gives_the_same_stage_image():
    kits = _volume(orientation="kits")
    # The same voxels stored RAS: reorient the internal array back into a RAS file.
    ras_array = kits.source.to_source(kits.array)
    ras_like = Volume.from_source_array(np.ascontiguousarray(ras_array.transpose(2, 1, 0)[::-1, ::-1, ::-1]),
                                        kits.source.affine @ _kits_to_ras(kits.shape))
    config = PreprocessingConfig()
    np.testing.assert_allclose(prepare(kits, config).image, prepare(ras_like, config).image, atol=1e-6)


def _kits_to_ras(shape):
    """Affine taking RAS-stored indices (x, y, z) to the KiTS-stored indices (z, y, x), flipped."""
    nz, ny, nx = shape
    m = np.zeros((4, 4))
    m[0, 2] = -1
    m[0, 3] = nz - 1
    m[1, 1] = -1
    m[1, 3] = ny - 1
    m[2, 0] = -1
    m[2, 3] = nx - 1
    m[3, 3] = 1
    return m


def test_config_validation_names_the_field():
    with pytest.raises(ConfigError, match="slice_spacing_mm"):
        PreprocessingConfig(slice_spacing_mm=0)
    with pytest.raises(ConfigError, match="unknown field.*spacing"):
        PreprocessingConfig.from_dict({"spacing": 3})
    assert PreprocessingConfig.from_dict(PreprocessingConfig().to_dict()) == PreprocessingConfig()


def test_only_stage2_context_may_differ_between_a_model_and_a_recipe():
    recipe = PreprocessingConfig(inplane_spacing_mm=2.0)
    assert recipe.matches_except_stage2_context(PreprocessingConfig(inplane_spacing_mm=2.0, stage2_context_slices=1))
    assert PreprocessingConfig(inplane_spacing_mm=2.0, stage2_context_slices=2).matches_except_stage2_context(recipe)
    for other in (PreprocessingConfig(inplane_spacing_mm=3.0), PreprocessingConfig(inplane_spacing_mm=2.0, hu_max=300.0),
                  PreprocessingConfig(inplane_spacing_mm=2.0, context_slices=2)):
        assert not recipe.matches_except_stage2_context(other)
        assert not other.matches_except_stage2_context(recipe)
