"""Tests of boneage_tpu.modeling.model: backbones, preprocessing, heads, label scaling, export, weights."""

from __future__ import annotations

import keras
import numpy as np
import pytest
from keras.src.utils import file_utils

from boneage_tpu.core import config as config_lib
from boneage_tpu.core.errors import UsageError
from boneage_tpu.modeling import model as model_lib
from tests import helpers


def _inputs(batch: int, size: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "image": rng.integers(0, 256, (batch, size, size, 1)).astype(np.uint8),
        "male": (np.arange(batch) % 2).astype(np.float32),
    }


@pytest.mark.parametrize(
    ("backbone", "size"),
    [
        ("tiny", 32),
        ("vgg19", 32),
        ("resnet50", 32),
        ("efficientnetv2_s", 32),
        ("xception", 71),
        ("inception_v3", 75),
        ("convnext_tiny", 32),
        ("convnext_small", 32),
        ("efficientnet_b0", 32),
        ("mobilenet_v3_small", 32),
        ("resnet_small", 32),
    ],
)
def test_every_backbone_builds_and_runs_one_forward_pass(backbone: str, size: int) -> None:
    model = model_lib.build_model(
        *helpers.config_and_derived(
            backbone=backbone, image_size=size, label_mean=100.0, label_std=40.0
        ),
        weights="none",
    )
    months = model(_inputs(2, size), training=False)
    assert months.shape == (2,)
    assert months.dtype == "float32"
    assert np.all(np.isfinite(np.asarray(months)))
    assert model.name == f"boneage_{backbone}"


def test_backbone_list_is_complete() -> None:
    assert set(model_lib.BACKBONES) == {
        "xception",
        "inception_v3",
        "vgg19",
        "efficientnetv2_s",
        "resnet50",
        "convnext_tiny",
        "convnext_small",
        "efficientnet_b0",
        "mobilenet_v3_small",
        "resnet_small",
        "tiny",
    }


def test_output_is_months_from_the_stored_label_stats() -> None:
    model = model_lib.build_model(
        *helpers.config_and_derived(
            backbone="tiny", image_size=32, dense_units=(8,), label_mean=120.0, label_std=40.0
        )
    )
    zscore = model.get_layer("zscore")
    zscore.kernel.assign(np.zeros(zscore.kernel.shape, np.float32))
    zscore.bias.assign(np.zeros(1, np.float32))
    np.testing.assert_allclose(model(_inputs(3, 32)), [120.0] * 3)
    zscore.bias.assign(np.full(1, 1.5, np.float32))
    np.testing.assert_allclose(model(_inputs(3, 32)), [180.0] * 3, rtol=1e-6)


def test_uint8_and_float_images_give_the_same_months() -> None:
    model = model_lib.build_model(
        *helpers.config_and_derived(backbone="tiny", image_size=32, dense_units=(8,))
    )
    x = _inputs(2, 32)
    as_float = {"image": x["image"].astype(np.float32), "male": x["male"]}
    np.testing.assert_allclose(model(x), model(as_float), rtol=1e-6)


@pytest.mark.parametrize(
    ("mode", "expected"),
    [
        ("tf", (-1.0, 1.0)),
        ("unit", (0.0, 1.0)),
        ("raw", (0.0, 255.0)),
        ("caffe", (-103.939, 151.061)),
    ],
)
def test_grayscale_to_backbone_scaling(mode: str, expected: tuple[float, float]) -> None:
    layer = model_lib.GrayscaleToBackbone(mode)
    images = np.array([0, 255], np.uint8).reshape(2, 1, 1, 1)
    out = np.asarray(layer(images))
    assert out.shape == (2, 1, 1, 3)
    np.testing.assert_allclose(out[:, 0, 0, 0], expected, rtol=1e-5)
    if mode == "caffe":  # BGR means differ per channel
        np.testing.assert_allclose(out[0, 0, 0], [-103.939, -116.779, -123.68], rtol=1e-5)
    else:
        assert np.all(out[..., 0] == out[..., 2])


def test_masked_average_pooling_weights_features_by_the_mask() -> None:
    features = np.arange(8, dtype=np.float32).reshape(1, 2, 2, 2)
    uniform = np.ones((1, 2, 2, 1), np.float32)
    np.testing.assert_allclose(
        model_lib.MaskedAveragePooling()([features, uniform]),
        features.mean(axis=(1, 2)),
        rtol=1e-3,
    )
    one_spot = np.zeros((1, 2, 2, 1), np.float32)
    one_spot[0, 1, 1, 0] = 1.0
    np.testing.assert_allclose(
        model_lib.MaskedAveragePooling()([features, one_spot]), features[:, 1, 1], rtol=1e-2
    )


def test_attention_head_is_built_when_asked() -> None:
    plain = model_lib.build_model(*helpers.config_and_derived(backbone="tiny", image_size=32))
    attn = model_lib.build_model(
        *helpers.config_and_derived(backbone="tiny", image_size=32, attention=True)
    )
    names = {layer.name for layer in attn.layers}
    assert {"attention_mask", "attention_pool"} <= names
    assert "attention_mask" not in {layer.name for layer in plain.layers}
    assert attn(_inputs(2, 32)).shape == (2,)


def test_sex_input_is_used_only_with_use_sex() -> None:
    x = _inputs(2, 32)
    x["image"][1] = x["image"][0]
    with_sex = model_lib.build_model(
        *helpers.config_and_derived(backbone="tiny", image_size=32, dense_units=(8,), dropout=0)
    )
    without = model_lib.build_model(
        *helpers.config_and_derived(
            backbone="tiny", image_size=32, dense_units=(8,), dropout=0, use_sex=False
        )
    )
    out_with = np.asarray(with_sex(x))
    out_without = np.asarray(without(x))
    assert abs(out_with[0] - out_with[1]) > 1e-6  # same image, different sex
    assert out_without[0] == pytest.approx(out_without[1], abs=1e-6)
    assert "sex_dense" in {layer.name for layer in with_sex.layers}
    assert "sex_dense" not in {layer.name for layer in without.layers}


def test_dense_units_and_dropout_are_configurable() -> None:
    model = model_lib.build_model(
        *helpers.config_and_derived(
            backbone="tiny", image_size=32, dense_units=(24, 12, 6), dropout=0.5
        )
    )
    dense = [model.get_layer(f"dense{i}").units for i in range(3)]
    assert dense == [24, 12, 6]
    assert model.get_layer("dropout2").rate == 0.5


def test_tiny_norm_options() -> None:
    none = model_lib.build_model(
        *helpers.config_and_derived(backbone="tiny", image_size=32, norm="none")
    )
    batch = model_lib.build_model(
        *helpers.config_and_derived(backbone="tiny", image_size=32, norm="batch")
    )
    group = model_lib.build_model(
        *helpers.config_and_derived(backbone="tiny", image_size=32, norm="group")
    )

    def layer_types(model: keras.Model) -> set[str]:
        return {type(layer).__name__ for layer in model.get_layer("tiny").layers}

    assert "BatchNormalization" not in layer_types(none)
    assert "GroupNormalization" not in layer_types(none)
    assert "BatchNormalization" in layer_types(batch)
    assert "GroupNormalization" in layer_types(group)


def test_mixed_precision_keeps_a_float32_output_and_restores_the_policy() -> None:
    before = keras.config.dtype_policy().name
    model = model_lib.build_model(
        *helpers.config_and_derived(backbone="tiny", image_size=32), precision="bf16"
    )
    assert keras.config.dtype_policy().name == before
    assert model.get_layer("tiny").get_layer("conv0").compute_dtype == "bfloat16"
    assert model.get_layer("months").compute_dtype == "float32"
    assert model(_inputs(2, 32)).dtype == "float32"


def test_keras_export_round_trip(tmp_path) -> None:
    model = model_lib.build_model(
        *helpers.config_and_derived(
            backbone="tiny", image_size=32, attention=True, label_mean=90.0, label_std=30.0
        )
    )
    path = tmp_path / "model.keras"
    model.save(path)
    loaded = keras.models.load_model(path)
    x = _inputs(3, 32)
    np.testing.assert_allclose(model(x), loaded(x), rtol=1e-5)
    assert loaded.get_layer("months").label_mean == 90.0


def test_build_model_uses_the_config() -> None:
    model = model_lib.build_model(
        *helpers.config_and_derived(
            backbone="tiny", image_size=32, dense_units=(16,), label_mean=50.0, label_std=10.0
        )
    )
    assert model.get_layer("months").label_std == 10.0
    assert model.get_layer("dense0").units == 16
    assert model.input["image"].shape == (None, 32, 32, 1)


def test_too_small_image_and_unknown_backbone_read_well() -> None:
    with pytest.raises(ValueError, match="too small for xception .min 71"):
        model_lib.build_model(*helpers.config_and_derived(backbone="xception", image_size=64))
    with pytest.raises(UsageError, match="--backbone must be one of .*, got 'resnet18'"):
        config_lib.TrainConfig.from_flags(backbone="resnet18", image_size=64)
    # A config built around the flags' check (Python callers) meets build_model's own.
    config = config_lib.TrainConfig(model=config_lib.ModelConfig(backbone="resnet18"))
    with pytest.raises(ValueError, match="unknown backbone 'resnet18'; choose one of"):
        model_lib.build_model(config, config_lib.Derived())


def test_offline_imagenet_fails_with_one_clear_line(monkeypatch) -> None:
    def offline(*args, **kwargs):
        raise Exception(  # what keras.utils.get_file raises without a network
            "URL fetch failure on https://storage.googleapis.com/x.h5: None -- "
            "[Errno -2] Name or service not known"
        )

    monkeypatch.setattr(file_utils, "get_file", offline)
    with pytest.raises(model_lib.WeightsError) as info:
        model_lib.build_model(
            *helpers.config_and_derived(backbone="vgg19", image_size=32), weights="imagenet"
        )
    message = str(info.value)
    assert "\n" not in message
    assert "could not download the vgg19 ImageNet weights" in message
    assert "--weights none" in message and "--weights PATH" in message


def test_tiny_has_no_imagenet_weights() -> None:
    with pytest.raises(model_lib.WeightsError, match="tiny backbone has no ImageNet weights"):
        model_lib.build_model(
            *helpers.config_and_derived(backbone="tiny", image_size=32), weights="imagenet"
        )


def test_weights_path_loads_backbone_weights(tmp_path) -> None:
    source = model_lib.build_model(*helpers.config_and_derived(backbone="tiny", image_size=32))
    path = tmp_path / "tiny.weights.h5"
    source.get_layer("tiny").save_weights(path)
    keras.utils.set_random_seed(123)  # a different initialisation
    loaded = model_lib.build_model(
        *helpers.config_and_derived(backbone="tiny", image_size=32), weights=str(path)
    )
    for a, b in zip(
        source.get_layer("tiny").get_weights(), loaded.get_layer("tiny").get_weights(), strict=True
    ):
        np.testing.assert_array_equal(a, b)


def test_missing_weights_file_reads_well(tmp_path) -> None:
    missing = tmp_path / "nope.h5"
    with pytest.raises(model_lib.WeightsError, match="nope.h5: file not found"):
        model_lib.build_model(
            *helpers.config_and_derived(backbone="tiny", image_size=32), weights=str(missing)
        )


def test_weights_of_another_network_read_well(tmp_path) -> None:
    path = tmp_path / "nonorm.weights.h5"
    model_lib.tiny_backbone(32, norm="none").save_weights(path)
    with pytest.raises(model_lib.WeightsError, match="does not fit the tiny backbone"):
        model_lib.build_model(
            *helpers.config_and_derived(backbone="tiny", image_size=32), weights=str(path)
        )
