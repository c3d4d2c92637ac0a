"""Tests for boneage_tpu.inference.heatmap: maps, the hand mask and the shortcut check."""

from __future__ import annotations

import io

import keras
import numpy as np
import pytest
from PIL import Image

from boneage_tpu.core.config import BACKBONES
from boneage_tpu.inference import heatmap
from boneage_tpu.modeling import heads
from boneage_tpu.modeling import model as model_lib
from tests import helpers

SIZE = 32
POOL = 4  # analytic backbone: 32 px -> 8 x 8 cells


@keras.saving.register_keras_serializable(package="boneage_tests")
class QuadrantChannels(keras.layers.Layer):
    """[B, 8, 8, 1] -> [B, 8, 8, 4]: channel q carries the input inside quadrant q, else 0."""

    def call(self, x):
        cells = SIZE // POOL
        rows = np.arange(cells)[:, None] >= cells // 2  # bottom half
        cols = np.arange(cells)[None, :] >= cells // 2  # right half
        quadrant = 2 * rows + cols  # 0 top-left, 1 top-right, 2 bottom-left, 3 bottom-right
        onehot = (quadrant[..., None] == np.arange(4)).astype("float32")
        return x * keras.ops.convert_to_tensor(onehot[None])

    def compute_output_shape(self, shape):
        return (*shape[:-1], 4)


def analytic_model(informative: int = 2) -> keras.Model:
    """months = 10 * mean over the 8x8 cells of quadrant channel `informative` (+ 0 * male).

    The backbone (a nested model, as in the real network) outputs A = local means, one channel
    per quadrant. d(months)/dA_k is 10/64 for k = informative and 0 otherwise, so Grad-CAM is
    exactly 10/64 * A[..., informative]: all its mass in that quadrant.
    """
    pixels = keras.Input((SIZE, SIZE, 1))
    features = QuadrantChannels()(keras.layers.AveragePooling2D(POOL)(pixels))
    backbone = keras.Model(pixels, features, name="analytic_backbone")
    image = keras.Input((SIZE, SIZE, 1), name="image")
    male = keras.Input((), name="male")
    pooled = keras.layers.GlobalAveragePooling2D()(backbone(image))
    head = keras.layers.Dense(1, use_bias=False, name="head")
    months = keras.layers.Reshape(())(head(pooled))
    model = keras.Model({"image": image, "male": male}, months)
    weights = np.zeros((4, 1), np.float32)
    weights[informative] = 10.0
    head.set_weights([weights])
    return model


def _images(n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(20, 235, (n, SIZE, SIZE, 1)).astype(np.uint8)


def test_grad_cam_of_the_analytic_model_is_its_known_gradient():
    model = analytic_model(informative=2)
    images = _images(3)
    out = heatmap.map_fn(model)(images, np.zeros(3, np.float32))
    maps = out["map"].numpy()
    assert maps.shape == (3, SIZE // POOL, SIZE // POOL)
    assert np.all(np.isfinite(maps)) and np.all(maps.std(axis=(1, 2)) > 0)
    local_means = images[..., 0].astype(np.float32).reshape(3, 8, POOL, 8, POOL).mean((2, 4))
    expected = np.zeros_like(local_means)
    expected[:, 4:, :4] = 10.0 / 64.0 * local_means[:, 4:, :4]  # bottom-left only
    np.testing.assert_allclose(maps, expected, rtol=1e-5, atol=1e-6)
    assert "std" not in out
    np.testing.assert_allclose(out["months"].numpy(), 10 * local_means[:, 4:, :4].sum((1, 2)) / 64)


@pytest.mark.parametrize("informative", [0, 1, 2, 3])
def test_map_mass_concentrates_on_the_informative_quadrant(informative):
    """Upsampled to the image, >= 90 % of the mass is in the quadrant the label depends on
    (a transposed or flipped map would put it elsewhere)."""
    images = _images(4, seed=informative)
    maps = heatmap.map_fn(analytic_model(informative))(images, np.zeros(4, np.float32))["map"]
    full = heatmap.resize_maps(maps.numpy(), SIZE)
    half = SIZE // 2
    rows = slice(half, None) if informative >= 2 else slice(0, half)
    cols = slice(half, None) if informative % 2 else slice(0, half)
    share = full[:, rows, cols].sum((1, 2)) / full.sum((1, 2))
    assert np.all(share > 0.9), share


def test_feature_tensor_finds_the_backbone_whatever_its_name():
    model = analytic_model()
    assert tuple(heatmap.feature_tensor(model).shape) == (None, 8, 8, 4)
    flat_image = keras.Input((SIZE, SIZE, 1), name="image")
    male = keras.Input((), name="male")
    months = keras.layers.Reshape(())(keras.layers.Dense(1)(keras.layers.Flatten()(flat_image)))
    with pytest.raises(heatmap.HeatmapError, match="no convolutional feature map"):
        heatmap.map_fn(keras.Model({"image": flat_image, "male": male}, months))


@pytest.mark.parametrize("attention", [False, True])
def test_tiny_model_maps_with_and_without_attention(attention):
    keras.utils.set_random_seed(0)
    model = model_lib.build_model(
        *helpers.config_and_derived(
            backbone="tiny", image_size=64, dense_units=(8,), attention=attention, label_std=40.0
        )
    )
    assert heatmap.map_kind(model) == ("attention" if attention else "grad-cam")
    images = _images(2).repeat(2, axis=1).repeat(2, axis=2)
    out = heatmap.map_fn(model)(images, np.array([1.0, 0.0], np.float32))
    maps = out["map"].numpy()
    assert maps.shape == (2, 4, 4)  # the tiny backbone downsamples 16x
    assert np.all(np.isfinite(maps)) and np.all(maps >= 0) and np.all(maps.std(axis=(1, 2)) > 0)
    if attention:
        assert np.all(maps <= 1.0)  # a sigmoid mask
    predicted = model({"image": images.astype(np.float32), "male": np.array([1.0, 0.0])})
    np.testing.assert_allclose(out["months"].numpy(), np.asarray(predicted), rtol=1e-5)


def test_dict_outputs_with_an_uncertainty():
    """A head that also outputs a per-image std: months and std are both picked up."""
    base = analytic_model()
    std = keras.layers.Reshape(())(keras.layers.Dense(1)(keras.layers.Flatten()(base.inputs[0])))
    model = keras.Model(base.inputs, {"months": base.output, "std": std})
    out = heatmap.map_fn(model)(_images(2), np.zeros(2, np.float32))
    assert out["map"].shape == (2, 8, 8) and out["std"].shape == (2,)
    assert "± " in heatmap.title_text("x", 100.0, float(out["std"][0]))


@pytest.mark.parametrize("attention", [False, True])
def test_bins_head_gives_its_spread_with_the_map(attention):
    """A bins model (with input normalisation and a bias correction): the map pass returns
    the months of the model and the spread of `heads.with_spread`, shown in the title."""
    keras.utils.set_random_seed(0)
    model = model_lib.build_model(
        *helpers.config_and_derived(
            backbone="tiny", image_size=64, dense_units=(8,), attention=attention, head="bins",
            num_bins=16, input_norm="zscore", label_mean=100.0, label_std=40.0, bias_slope=1.1,
            bias_intercept=-3.0,
        )
    )  # fmt: skip
    images = _images(2).repeat(2, axis=1).repeat(2, axis=2)
    male = np.array([1.0, 0.0], np.float32)
    out = heatmap.map_fn(model)(images, male)
    maps = out["map"].numpy()
    assert maps.shape == (2, 4, 4) and np.all(np.isfinite(maps)) and np.all(maps >= 0)
    assert np.all(maps.std(axis=(1, 2)) > 0)
    months, spread = heads.with_spread(model)({"image": images.astype(np.float32), "male": male})
    np.testing.assert_allclose(out["months"].numpy(), np.asarray(months), rtol=1e-5)
    np.testing.assert_allclose(out["std"].numpy(), np.asarray(spread), rtol=1e-5)
    assert np.all(out["std"].numpy() > 0)
    title = heatmap.title_text("x", float(out["months"][0]), float(out["std"][0]))
    assert f"± {float(out['std'][0]):.1f} months" in title


@pytest.mark.slow
@pytest.mark.parametrize("backbone", [b for b in BACKBONES if b != "tiny"])
def test_grad_cam_on_every_other_backbone(backbone):
    size = model_lib.min_image_size(backbone)
    model = model_lib.build_model(
        *helpers.config_and_derived(backbone=backbone, image_size=size, dense_units=(4,))
    )
    features = heatmap.feature_tensor(model)
    maps = heatmap.map_fn(model)(np.full((1, size, size, 1), 128, np.uint8), np.ones(1))["map"]
    assert maps.shape == (1, *features.shape[1:3])
    assert np.all(np.isfinite(maps.numpy()))


def _scene() -> np.ndarray:
    """A dark frame with a bright 'hand' blob, a small marker and a bright top border strip."""
    image = np.full((128, 128), 15, np.uint8)
    yy, xx = np.mgrid[:128, :128]
    image[((yy - 80) / 35.0) ** 2 + ((xx - 64) / 25.0) ** 2 < 1] = 150
    image[60:70, 60:70] = 230  # a bone inside: part of the hand
    image[100:108, 8:14] = 240  # the marker
    image[0:10, :] = 200  # collimation border
    return image


def test_hand_mask_keeps_the_hand_and_drops_marker_and_border():
    mask = heatmap.hand_mask(_scene())
    assert mask.shape == (heatmap.MASK_SIZE, heatmap.MASK_SIZE)
    scale = heatmap.MASK_SIZE / 128
    assert mask[int(80 * scale), int(64 * scale)] and mask[int(65 * scale), int(65 * scale)]
    assert not mask[int(104 * scale), int(11 * scale)]  # marker
    assert not mask[: int(8 * scale)].any()  # border
    assert not mask[int(20 * scale), int(10 * scale)]  # background
    assert heatmap.hand_mask(np.zeros((128, 128), np.uint8)).sum() == 0


def test_outside_fraction_separates_hand_from_marker():
    mask = heatmap.hand_mask(_scene())
    on_hand = np.zeros((8, 8), np.float32)
    on_hand[5, 4] = 1.0  # the cell at (80, 64) px
    on_marker = np.zeros((8, 8), np.float32)
    on_marker[6, 0] = 1.0  # the cell at (104, 8) px
    assert heatmap.outside_fraction(on_hand, mask) < 0.1
    assert heatmap.outside_fraction(on_marker, mask) > 0.9
    assert np.isnan(heatmap.outside_fraction(np.zeros((8, 8)), mask))


def test_overlay_png_shows_image_and_map(tmp_path):
    image = _scene()[..., None]
    cam = np.zeros((8, 8), np.float32)
    cam[5, 4] = 1.0
    png = heatmap.overlay_png(image, cam, heatmap.title_text("case 1", 123.4))
    rgb = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"), np.int32)
    assert rgb.shape[:2] == (295, 320)  # _OVERLAY_INCHES at _OVERLAY_DPI
    assert len(np.unique(rgb.reshape(-1, 3), axis=0)) > 100  # image, colour map, text
    red = (rgb[..., 0] - rgb[..., 2] > 80).sum()  # the map's hot spot in jet red/orange
    assert red > 50
    assert "123.4 months" in heatmap.title_text("a", 123.4)


def test_write_overlays_names_repeated_ids_apart(tmp_path):
    model = analytic_model()
    paths = heatmap.write_overlays(
        model, _images(3), np.zeros(3, np.float32), ["a", "a", "b"], [1.0, 2.0, 3.0], str(tmp_path)
    )
    names = [p.rsplit("/", 1)[-1] for p in paths]
    # Repeated ids get distinct hashed names (never `a-2`, which another file may be called).
    assert len(set(names)) == 3 and names[2] == "b.png"
    assert all(n.startswith("a-") and len(n) == len("a-12345678.png") for n in names[:2])
    for path in paths:
        with Image.open(path) as image:
            assert image.format == "PNG"


def _disc_task(n: int, rng: np.random.Generator, size: int = 64):
    """Label = radius of a bright disc in the top-left quadrant; the other quadrants hold
    squares of random size and brightness that carry no label information."""
    images = rng.normal(40, 8, (n, size, size)).clip(0, 255)
    yy, xx = np.mgrid[:size, :size]
    radius = rng.uniform(3, 12, n)
    centre = rng.uniform(14, 18, (n, 2))
    half = size // 2
    for i in range(n):
        images[i][(yy - centre[i, 0]) ** 2 + (xx - centre[i, 1]) ** 2 < radius[i] ** 2] = 200
        for oy, ox in ((0, half), (half, 0), (half, half)):
            side = int(rng.uniform(4, 20))
            y0, x0 = oy + int(rng.uniform(2, 30 - side)), ox + int(rng.uniform(2, 30 - side))
            images[i, y0 : y0 + side, x0 : x0 + side] = rng.uniform(120, 230)
    months = (radius - 3) / 9 * 200
    return images[..., None].astype(np.float32), months.astype(np.float32)


@pytest.mark.slow
def test_trained_tiny_model_looks_at_the_informative_region():
    """The real tiny network, trained 300 steps: Grad-CAM puts its mass on the disc quadrant."""
    import tensorflow as tf

    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    model = model_lib.build_model(
        *helpers.config_and_derived(
            backbone="tiny", image_size=64, dense_units=(16,), use_sex=False, label_mean=100.0,
            label_std=60.0,
        )
    )  # fmt: skip
    optimizer = keras.optimizers.Adam(2e-3)

    @tf.function
    def step(images, months):
        with tf.GradientTape() as tape:
            inputs = {"image": images, "male": tf.zeros_like(months)}
            loss = tf.reduce_mean(tf.abs(model(inputs, training=True) - months))
        grads = tape.gradient(loss, model.trainable_variables)
        optimizer.apply_gradients(zip(grads, model.trainable_variables, strict=True))

    for _ in range(300):
        step(*_disc_task(32, rng))
    images, months = _disc_task(16, np.random.default_rng(1))
    out = heatmap.map_fn(model)(images, np.zeros(16, np.float32))
    assert np.mean(np.abs(out["months"].numpy() - months)) < 0.5 * months.std()  # it learned
    full = heatmap.resize_maps(out["map"].numpy(), 64)
    total = full.sum((1, 2))
    shares = [
        float(np.mean(full[:, rows, cols].sum((1, 2)) / total))
        for rows in (slice(0, 32), slice(32, 64))
        for cols in (slice(0, 32), slice(32, 64))
    ]
    # Measured 0.47 against 0.16-0.19 for the distractor quadrants (uniform: 0.25 each).
    assert shares[0] > 0.35 and shares[0] > 2 * max(shares[1:]), shares
