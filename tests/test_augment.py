"""Tests of the on-device augmentation: XLA compilation, exact geometry, ranges, seeding."""

from __future__ import annotations

import math

import numpy as np
import pytest
import tensorflow as tf

from boneage_tpu.core.errors import UsageError
from boneage_tpu.data import augment, warp

NEUTRAL = {
    "angle": 0.0,
    "shift_x": 0.0,
    "shift_y": 0.0,
    "zoom": 1.0,
    "shear": 0.0,
    "flip": 0.0,
    "brightness": 0.0,
    "contrast": 1.0,
    "gamma": 1.0,
}


def _params(batch: int = 1, **values: float) -> dict[str, tf.Tensor]:
    merged = NEUTRAL | values
    return {k: tf.fill([batch], tf.constant(v, tf.float32)) for k, v in merged.items()}


def _warp(image: np.ndarray, **values: float) -> np.ndarray:
    """Warps one [H, W] uint8 image with the given parameters (others neutral)."""
    height, width = image.shape
    matrices = augment.affine_matrices(_params(**values), height, width)
    return warp.warp_affine(image[None, :, :, None], matrices).numpy()[0, :, :, 0]


def _pattern(height: int, width: int) -> np.ndarray:
    """An image with no symmetry: every pixel value distinct (1..H*W, within uint8)."""
    return np.arange(1, height * width + 1, dtype=np.uint8).reshape(height, width)


def test_augment_batch_compiles_with_xla_on_cpu():
    images = tf.constant(np.random.default_rng(0).integers(0, 256, (3, 24, 20, 1)), tf.uint8)
    fn = tf.function(augment.augment_batch, jit_compile=True)
    out = fn(images, tf.constant([1, 2], tf.int64))
    assert out.dtype == tf.float32 and out.shape == (3, 24, 20, 1)
    assert float(tf.reduce_min(out)) >= 0.0 and float(tf.reduce_max(out)) <= 255.0
    # Same seed, same draws (XLA and eager derive different streams from one seed: TF's
    # stateless kernels differ by backend, so only XLA-vs-XLA is compared).
    np.testing.assert_array_equal(fn(images, tf.constant([1, 2], tf.int64)).numpy(), out.numpy())
    assert np.abs(out.numpy() - augment.to_float(images).numpy()).mean() > 1.0


def test_identity_matrix_returns_the_image_exactly():
    images = np.random.default_rng(1).integers(0, 256, (2, 7, 9, 3)).astype(np.uint8)
    identity = tf.constant([[[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]] * 2)
    out = warp.warp_affine(tf.constant(images), identity)
    np.testing.assert_array_equal(out.numpy(), images.astype(np.float32))
    composed = augment.affine_matrices(_params(batch=2), 7, 9)
    np.testing.assert_allclose(composed.numpy(), identity.numpy(), atol=1e-6)


def test_disabled_config_is_the_float_conversion_exactly():
    images = tf.constant(np.random.default_rng(2).integers(0, 256, (2, 5, 6, 1)), tf.uint8)
    out = augment.augment_batch(images, tf.constant([3, 4]), augment.AugmentConfig.none())
    np.testing.assert_array_equal(out.numpy(), augment.to_float(images).numpy())
    assert augment.to_float(images).dtype == tf.float32


@pytest.mark.parametrize("degrees, k", [(90.0, 1), (-90.0, -1), (180.0, 2)])
def test_rotation_matches_numpy_rot90(degrees, k):
    image = _pattern(9, 9)
    out = _warp(image, angle=math.radians(degrees))
    # Positive angles turn the content counter-clockwise on screen, like np.rot90.
    np.testing.assert_allclose(out, np.rot90(image, k).astype(np.float32), atol=1e-3)


def test_horizontal_flip_matches_fliplr_exactly():
    image = _pattern(6, 11)
    np.testing.assert_array_equal(_warp(image, flip=1.0), np.fliplr(image).astype(np.float32))


def test_integer_shift_moves_content_and_fills_with_zero():
    image = _pattern(8, 10)
    out = _warp(image, shift_x=0.2, shift_y=-0.25)  # +2 columns (right), -2 rows (up)
    expected = np.zeros_like(image, dtype=np.float32)
    expected[:-2, 2:] = image[2:, :-2]
    np.testing.assert_allclose(out, expected, atol=1e-4)


def test_zoom_scales_about_the_centre():
    matrices = augment.affine_matrices(_params(zoom=2.0), 11, 11).numpy()[0]
    centre, corner = np.array([5.0, 5.0, 1.0]), np.array([0.0, 0.0, 1.0])
    np.testing.assert_allclose(matrices @ centre, [5.0, 5.0], atol=1e-5)
    # Zoom 2 enlarges: the output corner samples the input halfway to the centre.
    np.testing.assert_allclose(matrices @ corner, [2.5, 2.5], atol=1e-5)


def test_shear_maps_rows_sideways():
    matrices = augment.affine_matrices(_params(shear=0.5), 11, 11).numpy()[0]
    # A point 4 rows below the centre samples 2 columns to its left (x_in = x - k * y).
    np.testing.assert_allclose(matrices @ np.array([5.0, 9.0, 1.0]), [3.0, 9.0], atol=1e-5)


def test_sampled_parameters_stay_within_and_span_the_configured_ranges():
    config = augment.AugmentConfig()
    params = {
        k: v.numpy() for k, v in augment.sample_params(tf.constant([7, 8]), 4096, config).items()
    }
    bounds = {
        "angle": (-math.radians(20.0), math.radians(20.0)),
        "shift_x": (-0.2, 0.2),
        "shift_y": (-0.2, 0.2),
        "zoom": (0.8, 1.2),
        "shear": (-0.2, 0.2),
        "brightness": (-0.1, 0.1),
        "contrast": (0.8, 1.2),
        "gamma": (0.8, 1.25),
    }
    for name, (low, high) in bounds.items():
        values = params[name]
        assert values.min() >= low and values.max() <= high, name
        span = high - low
        assert values.min() < low + 0.01 * span and values.max() > high - 0.01 * span, name
    assert set(np.unique(params["flip"])) == {0.0, 1.0}
    assert 0.45 < params["flip"].mean() < 0.55
    neutral = augment.sample_params(tf.constant([7, 8]), 16, augment.AugmentConfig.none())
    for name, value in NEUTRAL.items():
        np.testing.assert_allclose(neutral[name].numpy(), value, atol=1e-7, err_msg=name)


def test_intensity_jitter_follows_gamma_contrast_and_brightness():
    images = tf.constant([[[[0.0], [255.0]], [[63.75], [127.5]]]])  # one 2x2 image
    bright = augment.adjust_intensity(images, _params(brightness=0.1)).numpy().ravel()
    np.testing.assert_allclose(bright, [25.5, 255.0, 89.25, 153.0], atol=0.01)
    gamma = augment.adjust_intensity(images, _params(gamma=2.0)).numpy().ravel()
    np.testing.assert_allclose(gamma, [0.0, 255.0, 15.9375, 63.75], atol=0.01)
    flat = augment.adjust_intensity(images, _params(contrast=0.0)).numpy().ravel()
    np.testing.assert_allclose(flat, [111.5625] * 4, atol=0.01)  # every pixel -> the mean


def test_strong_augmentation_output_is_clipped_to_the_uint8_range():
    config = augment.AugmentConfig(brightness=0.9, contrast=(0.1, 4.0), gamma=(0.2, 5.0))
    images = tf.constant(np.random.default_rng(3).integers(0, 256, (8, 16, 16, 1)), tf.uint8)
    out = augment.augment_batch(images, tf.constant([5, 6]), config).numpy()
    assert out.min() >= 0.0 and out.max() <= 255.0
    assert out.min() == 0.0 and out.max() == 255.0  # the extremes really were reached


def test_replica_streams_differ_and_are_reproducible():
    images = tf.constant(np.random.default_rng(4).integers(0, 256, (4, 16, 16, 1)), tf.uint8)

    @tf.function(jit_compile=True)
    def step(global_seed_step: tf.Tensor, replica: tf.Tensor) -> tf.Tensor:
        seed = augment.replica_seed(11, global_seed_step, replica)
        return augment.augment_batch(images, seed)

    def run(step_value: int, replica: int) -> np.ndarray:
        return step(tf.constant(step_value, tf.int64), tf.constant(replica, tf.int32)).numpy()

    replica0, replica1 = run(3, 0), run(3, 1)
    np.testing.assert_array_equal(run(3, 0), replica0)
    assert np.abs(replica0 - replica1).mean() > 1.0
    assert np.abs(run(4, 0) - replica0).mean() > 1.0
    seeds = {
        tuple(augment.replica_seed(g, tf.constant(s), tf.constant(r)).numpy())
        for g in (0, 1)
        for s in range(4)
        for r in range(8)
    }
    assert len(seeds) == 2 * 4 * 8


def test_batch_images_get_different_transforms():
    image = np.tile(_pattern(12, 12)[None, :, :, None], (4, 1, 1, 1))
    out = augment.augment_batch(tf.constant(image), tf.constant([9, 9])).numpy()
    assert all(np.abs(out[0] - out[i]).mean() > 1.0 for i in range(1, 4))


@pytest.mark.parametrize(
    "kwargs", [{"rotation_deg": -1.0}, {"zoom": (1.2, 0.8)}, {"gamma": (0.0, 1.0)}]
)
def test_invalid_config_is_rejected(kwargs):
    with pytest.raises(UsageError, match=r"^--aug_\w+ must be "):
        augment.AugmentConfig(**kwargs)


STRONG = augment.AugmentConfig(rotation_deg=40.0, shift=0.3, zoom=(0.6, 1.5), shear=0.4)


@pytest.mark.parametrize("config", [augment.AugmentConfig(), STRONG], ids=["default", "strong"])
@pytest.mark.parametrize(("height", "width", "channels"), [(32, 32, 1), (40, 27, 1), (17, 50, 3)])
def test_matmul_warp_equals_the_gather_warp(config, height, width, channels):
    rng = np.random.default_rng(height * width)
    images = tf.constant(rng.integers(0, 256, (5, height, width, channels)).astype(np.uint8))
    params = augment.sample_params(tf.constant([height, width], tf.int64), 5, config)
    matrices = augment.affine_matrices(params, height, width)
    stretch = augment.max_stretch(config)

    def both(images, matrices):
        gather = warp.warp_affine(images, matrices)
        matmul = warp.warp_affine(images, matrices, "matmul", stretch)
        return gather, matmul

    gather, matmul = both(images, matrices)
    assert float(tf.reduce_mean(tf.abs(gather - augment.to_float(images)))) > 10.0  # really warped
    np.testing.assert_allclose(matmul.numpy(), gather.numpy(), atol=1e-4, rtol=0)
    # XLA computes the matrices' sin/cos slightly differently from eager mode, so each mode
    # compares with itself.
    compiled = tf.function(both, jit_compile=True)
    gather_xla, matmul_xla = compiled(images, matrices)
    np.testing.assert_allclose(matmul_xla.numpy(), gather_xla.numpy(), atol=1e-4, rtol=0)


def test_matmul_warp_gathers_only_whole_rows_under_xla():
    images = tf.zeros([2, 48, 40, 1], tf.uint8)
    matrices = augment.affine_matrices(_params(batch=2, angle=0.3), 48, 40)
    stretch = augment.max_stretch(augment.AugmentConfig())

    def slice_sizes(method: str) -> list[list[int]]:
        fn = tf.function(
            lambda i, m: warp.warp_affine(i, m, method, stretch if method == "matmul" else None),
            jit_compile=True,
        )
        text = fn.experimental_get_compiler_ir(images, matrices)(stage="hlo")
        return [
            [int(v) for v in line.split("slice_sizes={")[1].split("}")[0].split(",")]
            for line in text.splitlines()
            if " gather(" in line
        ]

    assert slice_sizes("gather") and all(max(s) == 1 for s in slice_sizes("gather"))
    # Gathers of row segments (two column blocks of the padded input), no single elements.
    matmul = slice_sizes("matmul")
    segment = 2 * warp.warp_geometry(48, 40, stretch).band
    assert segment >= 16 and matmul and all(max(s) == segment for s in matmul)


def test_matmul_identity_is_exact_and_bad_arguments_are_refused():
    images = np.random.default_rng(3).integers(0, 256, (2, 20, 18, 1)).astype(np.uint8)
    identity = tf.constant([[[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]] * 2)
    out = warp.warp_affine(tf.constant(images), identity, "matmul", 1.0)
    np.testing.assert_array_equal(out.numpy(), images.astype(np.float32))
    with pytest.raises(ValueError, match="needs stretch > 0"):
        warp.warp_affine(tf.constant(images), identity, "matmul")
    with pytest.raises(ValueError, match="'gather' or 'matmul'"):
        warp.warp_affine(tf.constant(images), identity, "nearest")


def test_max_stretch_bounds_the_drawn_matrices():
    for config in (augment.AugmentConfig(), STRONG):
        params = augment.sample_params(tf.constant([7, 7], tf.int64), 2000, config)
        linear = np.abs(augment.affine_matrices(params, 64, 64).numpy()[:, :, :2]).sum(axis=2)
        assert linear.max() <= augment.max_stretch(config) + 1e-6
        assert linear.max() > 0.7 * augment.max_stretch(config)  # and is not far too loose


def _random_warp_inputs(batch: int, size: int) -> tuple[tf.Tensor, tf.Tensor, float]:
    config = augment.AugmentConfig()
    rng = np.random.default_rng(batch * size)
    images = tf.constant(rng.integers(0, 256, (batch, size, size, 1)).astype(np.uint8))
    params = augment.sample_params(tf.constant([batch, size], tf.int64), batch, config)
    return images, augment.affine_matrices(params, size, size), augment.max_stretch(config)


def test_chunked_matmul_warp_equals_the_unchunked_one():
    images, matrices, stretch = _random_warp_inputs(7, 40)
    whole = warp.warp_affine(images, matrices, "matmul", stretch, chunk=7)
    # 3 does not divide 7 (the last chunk is padded); a dynamic batch takes the same loop.
    chunked = warp.warp_affine(images, matrices, "matmul", stretch, chunk=3)
    np.testing.assert_allclose(chunked.numpy(), whole.numpy(), atol=1e-4, rtol=0)
    dynamic = tf.function(
        lambda i, m: warp.warp_affine(i, m, "matmul", stretch, chunk=2),
        input_signature=[
            tf.TensorSpec([None, 40, 40, 1], tf.uint8),
            tf.TensorSpec([None, 2, 3], tf.float32),
        ],
        jit_compile=True,
    )
    compiled = dynamic(images, matrices).numpy()
    gather = tf.function(warp.warp_affine, jit_compile=True)(images, matrices).numpy()
    assert compiled.shape == (7, 40, 40, 1)
    np.testing.assert_allclose(compiled, gather, atol=1e-4, rtol=0)


def _compiled_peak_bytes(images: tf.Tensor, matrices: tf.Tensor, stretch: float, chunk: int) -> int:
    fn = tf.function(
        lambda i, m: warp.warp_affine(i, m, "matmul", stretch, chunk), jit_compile=True
    )
    fn(images, matrices)  # compiles first: only the run is measured
    tf.config.experimental.reset_memory_stats("CPU:0")
    before = tf.config.experimental.get_memory_info("CPU:0")["current"]
    fn(images, matrices).numpy()
    return tf.config.experimental.get_memory_info("CPU:0")["peak"] - before


@pytest.mark.slow
def test_matmul_warp_peak_memory_is_bounded_by_its_chunk_not_the_batch():
    size = 64
    small = _random_warp_inputs(4, size)
    large = _random_warp_inputs(32, size)
    stretch = small[2]
    per_image = warp.warp_transient_bytes(size, size, 1, "matmul", stretch)
    output = 32 * size * size * 4
    chunked_small = _compiled_peak_bytes(small[0], small[1], stretch, chunk=2)
    chunked_large = _compiled_peak_bytes(large[0], large[1], stretch, chunk=2)
    unchunked = _compiled_peak_bytes(large[0], large[1], stretch, chunk=32)
    # 8x the batch, same chunk: the peak grows by the output at most, not by 8x.
    assert chunked_large <= chunked_small + output
    # The estimate bounds what XLA really allocates, and is not far above it.
    assert 0.5 * 32 * per_image <= unchunked <= 32 * per_image + output
    assert unchunked > 4 * chunked_large
    # The default chunk keeps a recipe-sized batch within the budget.
    chunk = warp.warp_chunk(512, 512, 1, augment.max_stretch(augment.AugmentConfig()))
    assert 1 <= chunk < 32
    budget = warp.WARP_CHUNK_BYTES
    assert warp.warp_transient_bytes(512, 512, 1, "matmul", stretch, images=chunk) <= budget


def test_matmul_warp_multiplies_only_bfloat16_operands():
    # One-hots and 0..255 pixel values are exact in bfloat16, so a TPU's default matmul
    # precision (one bfloat16 pass for float32 operands) cannot change the result.
    images, matrices, stretch = _random_warp_inputs(2, 48)
    fn = tf.function(lambda i, m: warp.warp_affine(i, m, "matmul", stretch), jit_compile=True)
    text = fn.experimental_get_compiler_ir(images, matrices)(stage="hlo")
    dots = [line for line in text.splitlines() if " dot(" in line]
    assert len(dots) == 2
    assert all(line.count("bf16[") >= 3 for line in dots), dots
