"""Backbones that learn radiographs from scratch on a CPU budget, and the intensity normaliser.

ImageNet weights cannot be downloaded everywhere (and a 2-core laptop cannot train Xception),
so the package ships a compact residual network (`resnet_small`) sized for 128-192 px
inputs: most of its compute runs at 1/4 to 1/16 of the input resolution, where the growth
plates and carpals are still a few pixels wide.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import keras

from boneage_tpu.core.config import INPUT_NORMS

# (filters, blocks, stride) per stage of `resnet_small`, after a stride-2 stem.
_RESNET_SMALL_STAGES = ((32, 1, 2), (64, 1, 2), (128, 2, 2), (192, 1, 2))
_RESNET_SMALL_MIN_SIZE = 32
# Target statistics of `NormalizeIntensity`: +-3 std of the film maps onto 0..255.
_NORM_CENTRE, _NORM_SCALE = 127.5, 42.5


@keras.saving.register_keras_serializable(package="boneage_tpu")
class NormalizeIntensity(keras.layers.Layer):
    """Per-image intensity normalisation of 0..255 grey images, back onto a 0..255-like scale.

    Real films differ in exposure and in the window their exporter chose; a per-image affine
    normalisation removes brightness and contrast (and any linear window) from what the
    network sees, so only anatomy is left to learn. Modes:
      - "zscore": (x - mean) / std over the image, then 127.5 + 42.5 z.
      - "percentile": the 1st..99th percentile range onto 0..255 (tf.sort: XLA-safe), clipped.
      - "none": identity.
    """

    def __init__(self, mode: str = "zscore", **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if mode not in INPUT_NORMS:
            raise ValueError(f"input_norm must be one of {INPUT_NORMS}, got {mode!r}")
        self.mode = mode

    def call(self, images: Any) -> Any:
        x = keras.ops.cast(images, "float32")
        if self.mode == "none":
            return keras.ops.cast(x, self.compute_dtype)
        if self.mode == "zscore":
            mean = keras.ops.mean(x, axis=(1, 2, 3), keepdims=True)
            std = keras.ops.std(x, axis=(1, 2, 3), keepdims=True)
            # The floor keeps a blank image finite (it stays blank: every pixel at the centre).
            x = (x - mean) / keras.ops.maximum(std, 1.0) * _NORM_SCALE + _NORM_CENTRE
        else:
            flat = keras.ops.sort(keras.ops.reshape(x, (keras.ops.shape(x)[0], -1)), axis=-1)
            count = flat.shape[-1]
            low = flat[:, int(0.01 * (count - 1))]
            high = flat[:, int(0.99 * (count - 1))]
            low = keras.ops.reshape(low, (-1, 1, 1, 1))
            high = keras.ops.reshape(high, (-1, 1, 1, 1))
            x = (x - low) / keras.ops.maximum(high - low, 1.0) * 255.0
            x = keras.ops.clip(x, 0.0, 255.0)
        return keras.ops.cast(x, self.compute_dtype)

    def compute_output_shape(self, input_shape: Sequence[int | None]) -> tuple[int | None, ...]:
        return tuple(input_shape)

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "mode": self.mode}


def _conv_bn(
    x: Any, filters: int, stride: int, name: str, relu: bool = True, fmt: str = "channels_last"
) -> Any:
    x = keras.layers.Conv2D(
        filters,
        3,
        strides=stride,
        padding="same",
        use_bias=False,
        data_format=fmt,
        name=f"{name}_conv",
    )(x)
    # momentum 0.9: the moving statistics settle within a short CPU run (see model.tiny).
    axis = 1 if fmt == "channels_first" else -1
    x = keras.layers.BatchNormalization(axis=axis, momentum=0.9, name=f"{name}_bn")(x)
    return keras.layers.ReLU(name=f"{name}_relu")(x) if relu else x


def _basic_block(x: Any, filters: int, stride: int, name: str, fmt: str = "channels_last") -> Any:
    shortcut = x
    axis = 1 if fmt == "channels_first" else -1
    if stride != 1 or x.shape[axis] != filters:
        shortcut = keras.layers.Conv2D(
            filters, 1, strides=stride, use_bias=False, data_format=fmt, name=f"{name}_proj"
        )(x)
        shortcut = keras.layers.BatchNormalization(axis=axis, momentum=0.9, name=f"{name}_proj_bn")(
            shortcut
        )
    y = _conv_bn(x, filters, stride, f"{name}_a", fmt=fmt)
    y = _conv_bn(y, filters, 1, f"{name}_b", relu=False, fmt=fmt)
    return keras.layers.ReLU(name=f"{name}_out")(
        keras.layers.Add(name=f"{name}_add")([y, shortcut])
    )


def resnet_small(image_size: int, data_format: str = "channels_last") -> keras.Model:
    """Returns a compact ResNet (basic blocks, batch norm; 32x downsampling, 192 channels).

    Args:
      image_size: square input size (3-channel input scaled to [0, 1]).
      data_format: channels_last (the model's) or channels_first (input [B, 3, S, S]; for
        `tools.benchmark_layout`, which measures whether the layout matters on a CPU).
    """
    shape = (3, image_size, image_size) if data_format == "channels_first" else None
    inputs = keras.Input(shape or (image_size, image_size, 3), name="pixels")
    x = _conv_bn(inputs, 32, 2, "stem1", fmt=data_format)
    x = _conv_bn(x, 32, 1, "stem2", fmt=data_format)
    for s, (filters, blocks, stride) in enumerate(_RESNET_SMALL_STAGES):
        for b in range(blocks):
            name = f"stage{s}_block{b}"
            x = _basic_block(x, filters, stride if b == 0 else 1, name, fmt=data_format)
    return keras.Model(inputs, x, name="resnet_small")


def resnet_small_min_size() -> int:
    """Returns the smallest input size `resnet_small` accepts."""
    return _RESNET_SMALL_MIN_SIZE
