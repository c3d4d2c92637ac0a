"""The bone-age network: a keras.applications (or tiny) backbone, a sex branch and a dense head.

Inputs are a dict `{"image": [B, S, S, 1] 0..255 (float32 or uint8), "male": float32 [B]}`; the
output is bone age in months, float32 [B], also under mixed precision. Everything the model needs
to turn raw pixels into months lives inside it, so an exported model needs no side files:
grayscale -> 3 channels and the backbone's own input scaling at the bottom, and the train label
mean/std at the top (the head predicts a z-score, which keeps the last layer well scaled).
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import keras
import tensorflow as tf

from boneage_tpu.core.config import BACKBONES, NORMS, Derived, TrainConfig
from boneage_tpu.core.errors import ConfigError, Error
from boneage_tpu.modeling import backbones, heads

# name -> (keras.applications constructor, input scaling mode, smallest image size).
# Scaling modes: "tf" -> [-1, 1]; "caffe" -> BGR mean subtraction; "raw" -> the model
# rescales 0..255 itself (EfficientNetV2's include_preprocessing); "unit" -> [0, 1].
_APPLICATIONS: dict[str, tuple[str, str, int]] = {
    "xception": ("Xception", "tf", 71),
    "inception_v3": ("InceptionV3", "tf", 75),
    "vgg19": ("VGG19", "caffe", 32),
    "efficientnetv2_s": ("EfficientNetV2S", "raw", 32),
    "resnet50": ("ResNet50", "caffe", 32),
    # ConvNeXt, EfficientNet and MobileNetV3 normalise 0..255 inputs themselves.
    "convnext_tiny": ("ConvNeXtTiny", "raw", 32),
    "convnext_small": ("ConvNeXtSmall", "raw", 32),
    "efficientnet_b0": ("EfficientNetB0", "raw", 32),
    "mobilenet_v3_small": ("MobileNetV3Small", "raw", 32),
}
# Backbones built here (no ImageNet weights): CPU-sized networks trained from scratch.
_OWN_BACKBONES = ("tiny", "resnet_small")
PRECISIONS = {"fp32": "float32", "bf16": "mixed_bfloat16", "fp16": "mixed_float16"}
_CAFFE_BGR_MEAN = (103.939, 116.779, 123.68)
_TINY_MIN_SIZE = 16


class WeightsError(Error, ValueError):
    """Raised when the requested initial weights cannot be obtained or do not fit."""


@keras.saving.register_keras_serializable(package="boneage_tpu")
class GrayscaleToBackbone(keras.layers.Layer):
    """Casts 0..255 pixels to float, repeats 1 channel to 3 and applies the backbone's scaling."""

    def __init__(self, mode: str = "tf", **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if mode not in ("tf", "caffe", "raw", "unit"):
            raise ValueError(f"unknown scaling mode {mode!r}")
        self.mode = mode

    def call(self, images: Any) -> Any:
        x = keras.ops.cast(images, self.compute_dtype)
        if x.shape[-1] == 1:
            x = keras.ops.repeat(x, 3, axis=-1)
        if self.mode == "tf":
            return x / 127.5 - 1.0
        if self.mode == "caffe":
            # Gray has R = G = B, so the BGR channel flip is a no-op; only the means differ.
            return x - keras.ops.convert_to_tensor(_CAFFE_BGR_MEAN, self.compute_dtype)
        if self.mode == "unit":
            return x / 255.0
        return x

    def compute_output_shape(self, input_shape: Sequence[int | None]) -> tuple[int | None, ...]:
        return (*input_shape[:-1], 3)

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "mode": self.mode}


@keras.saving.register_keras_serializable(package="boneage_tpu")
class MaskedAveragePooling(keras.layers.Layer):
    """Pools features weighted by a spatial attention mask: sum(f * m) / sum(m)."""

    def call(self, inputs: Sequence[Any]) -> Any:
        features, mask = inputs
        mask = keras.ops.cast(mask, features.dtype)
        weighted = keras.ops.sum(features * mask, axis=(1, 2))
        # The epsilon only guards an all-zero sigmoid mask, which cannot occur in practice.
        return weighted / (keras.ops.sum(mask, axis=(1, 2)) + 1e-3)

    def compute_output_shape(self, input_shapes: Sequence[Sequence[int | None]]) -> tuple:
        return (input_shapes[0][0], input_shapes[0][-1])


@keras.saving.register_keras_serializable(package="boneage_tpu")
class ZScoreToMonths(keras.layers.Layer):
    """Maps the head's z-score [B, 1] to months [B] with the training label mean and std."""

    def __init__(self, label_mean: float = 0.0, label_std: float = 1.0, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.label_mean = float(label_mean)
        self.label_std = float(label_std)

    def call(self, z: Any) -> Any:
        z = keras.ops.cast(keras.ops.squeeze(z, axis=-1), self.compute_dtype)
        return z * self.label_std + self.label_mean

    def compute_output_shape(self, input_shape: Sequence[int | None]) -> tuple[int | None, ...]:
        return tuple(input_shape[:-1])

    def get_config(self) -> dict[str, Any]:
        return {
            **super().get_config(),
            "label_mean": self.label_mean,
            "label_std": self.label_std,
        }


@keras.saving.register_keras_serializable(package="boneage_tpu")
class ReplicaDropout(keras.layers.Dropout):
    """Dropout whose mask also depends on the replica: Keras' own Dropout draws the same mask
    on every replica (its seed state is one mirrored variable).

    The layer's seed state advances as in Keras (and is checkpointed like it); the replica id
    is folded into the drawn seed, so replicas differ and a resumed run continues the stream.
    """

    def call(self, inputs: Any, training: bool = False) -> Any:
        if not training or self.rate == 0:
            return inputs
        seed = tf.cast(self.seed_generator.next(), tf.int64)
        context = tf.distribute.get_replica_context()
        if context is not None and context.num_replicas_in_sync > 1:
            replica = tf.cast(context.replica_id_in_sync_group, tf.int64)
            seed = tf.random.experimental.stateless_fold_in(seed, replica)
        shape = tf.shape(inputs) if self.noise_shape is None else self.noise_shape
        keep = tf.random.stateless_uniform(shape, seed=seed) >= self.rate
        scale = tf.cast(1.0 / (1.0 - self.rate), inputs.dtype)
        return tf.where(keep, inputs * scale, tf.zeros_like(inputs))


@contextlib.contextmanager
def precision_policy(precision: str) -> Iterator[None]:
    """Sets Keras' global dtype policy for `precision` (fp32|bf16|fp16) and restores it after."""
    if precision not in PRECISIONS:
        raise ConfigError(f"precision must be one of {sorted(PRECISIONS)}, got {precision!r}")
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy(PRECISIONS[precision])
    try:
        yield
    finally:
        keras.config.set_dtype_policy(previous)


def min_image_size(backbone: str) -> int:
    """Returns the smallest input size `backbone` accepts."""
    if backbone == "tiny":
        return _TINY_MIN_SIZE
    if backbone == "resnet_small":
        return backbones.resnet_small_min_size()
    if backbone not in _APPLICATIONS:
        raise ConfigError(f"unknown backbone {backbone!r}; choose one of {', '.join(BACKBONES)}")
    return _APPLICATIONS[backbone][2]


def _norm_layer(norm: str, channels: int, name: str) -> keras.layers.Layer | None:
    if norm == "batch":
        # momentum 0.9 (Keras: 0.99): the moving statistics settle within the few hundred
        # steps of a CPU quickstart, so mid-run validation is meaningful too.
        return keras.layers.BatchNormalization(momentum=0.9, name=name)
    if norm == "group":
        return keras.layers.GroupNormalization(groups=min(8, channels), name=name)
    return None


def tiny_backbone(image_size: int, norm: str = "batch") -> keras.Model:
    """Returns a small, CPU-fast CNN (16x downsampling, 128 channels) for tests and quickstarts.

    Args:
      image_size: square input size (3-channel input, already scaled to [0, 1]).
      norm: "batch", "group" or "none" (no normalisation: replica-count independent maths).
    """
    if norm not in NORMS:
        raise ConfigError(f"norm must be one of {NORMS}, got {norm!r}")
    inputs = keras.Input((image_size, image_size, 3), name="pixels")
    x = inputs
    # Stride-2 convs shrink early so most compute runs at low resolution: fast on 2 CPU cores.
    stages = ((16, 2), (32, 1), (32, 2), (64, 1), (64, 2), (128, 1), (128, 2))
    for i, (filters, stride) in enumerate(stages):
        x = keras.layers.Conv2D(
            filters, 3, strides=stride, padding="same", use_bias=norm == "none", name=f"conv{i}"
        )(x)
        layer = _norm_layer(norm, filters, f"norm{i}")
        if layer is not None:
            x = layer(x)
        x = keras.layers.ReLU(name=f"relu{i}")(x)
    return keras.Model(inputs, x, name="tiny")


@contextlib.contextmanager
def _local_weights(path: str) -> Iterator[str]:
    """Yields a local path for a weights file; gs:// files go through a temp copy (h5py reads
    only local files), removed afterwards."""
    if not tf.io.gfile.exists(path):
        raise WeightsError(
            f"--weights {path}: file not found (use imagenet, none or a weights file)"
        )
    if "://" not in path:
        yield path
        return
    fd, local = tempfile.mkstemp(suffix=os.path.splitext(path)[1] or ".h5")
    os.close(fd)
    try:
        tf.io.gfile.copy(path, local, overwrite=True)
        yield local
    finally:
        os.remove(local)


def _application_backbone(backbone: str, image_size: int, weights: str) -> keras.Model:
    ctor_name, _, _ = _APPLICATIONS[backbone]
    ctor: Callable[..., keras.Model] = getattr(keras.applications, ctor_name)
    kwargs: dict[str, Any] = {"include_top": False, "input_shape": (image_size, image_size, 3)}
    if backbone in ("efficientnetv2_s", "convnext_tiny", "convnext_small", "mobilenet_v3_small"):
        kwargs["include_preprocessing"] = True
    if weights == "none":
        return ctor(weights=None, **kwargs)
    if weights == "imagenet":
        try:
            return ctor(weights="imagenet", **kwargs)
        except Exception as err:  # keras.utils.get_file raises a plain Exception when offline.
            reason = str(err).splitlines()[0] if str(err) else type(err).__name__
            raise WeightsError(
                f"--weights imagenet: could not download the {backbone} ImageNet weights "
                f"({reason}); offline, use --weights none or --weights PATH to a weights file"
            ) from err
    with _local_weights(weights) as local:
        try:
            return ctor(weights=local, **kwargs)
        except (ValueError, OSError) as err:
            raise WeightsError(f"--weights {weights}: does not fit {backbone}: {err}") from err


def _build_backbone(backbone: str, image_size: int, weights: str, norm: str) -> keras.Model:
    if backbone not in _OWN_BACKBONES:
        return _application_backbone(backbone, image_size, weights)
    if weights == "imagenet":
        raise WeightsError(
            f"the {backbone} backbone has no ImageNet weights: use --weights none or PATH"
        )
    if backbone == "tiny":
        model = tiny_backbone(image_size, norm)
    else:
        model = backbones.resnet_small(image_size)
    if weights != "none":
        with _local_weights(weights) as local:
            try:
                with warnings.catch_warnings():
                    # Keras only warns when parts of the file do not match and keeps those
                    # layers random: a silent partial load, so the warning becomes the error.
                    warnings.simplefilter("error", UserWarning)
                    model.load_weights(local)
            except (ValueError, OSError, UserWarning) as err:
                raise WeightsError(
                    f"--weights {weights}: does not fit the {backbone} backbone: {err}"
                ) from err
    return model


def build_model(
    config: TrainConfig,
    derived: Derived,
    *,
    weights: str = "none",
    precision: str = "fp32",
) -> keras.Model:
    """Builds the bone-age model.

    Args:
      config: the run's settings: `config.model` (backbone, use_sex, sex_units, dense_units,
        dropout, attention, norm, input_norm: per-image intensity normalisation before the
        backbone, `backbones.NormalizeIntensity`; head and num_bins: regression of one
        z-score, or a softmax over age bins whose expectation is the age, see `heads`) and
        `config.data.image_size`.
      derived: the label stats (label_mean, label_std: the head predicts z-scores) and the
        fitted bias correction (bias_slope, bias_intercept; the identity adds no layer).
        Required: a model built without its run's stats would silently output z-scores.
      weights: "none" (the default: callers that restore a checkpoint or an export need no
        initial weights, and downloading ImageNet's would be wasted or fail offline),
        "imagenet" (downloads; needs internet) or a path (local or gs://) to a backbone
        weights file as keras.applications accepts (e.g. the `*_notop.h5` file).
      precision: "fp32", "bf16" or "fp16" (Keras mixed precision; the output stays float32).

    Returns:
      A functional keras.Model named `boneage_<backbone>`.
    """
    if config.model.backbone not in BACKBONES:
        raise ConfigError(
            f"unknown backbone {config.model.backbone!r}; choose one of {', '.join(BACKBONES)}"
        )
    smallest = min_image_size(config.model.backbone)
    if config.data.image_size < smallest:
        raise ConfigError(
            f"--image_size {config.data.image_size} is too small for {config.model.backbone} (min {smallest})"
        )
    if derived.label_std <= 0:
        raise ConfigError(f"label_std must be > 0, got {derived.label_std}")
    mode = (
        "unit"
        if config.model.backbone in _OWN_BACKBONES
        else _APPLICATIONS[config.model.backbone][1]
    )
    with precision_policy(precision):
        image = keras.Input((config.data.image_size, config.data.image_size, 1), name="image")
        male = keras.Input((), name="male")
        x = image
        if config.model.input_norm != "none":
            # float32: the image statistics need more than bf16's 8 bits of mantissa.
            x = backbones.NormalizeIntensity(
                config.model.input_norm, dtype="float32", name="input_norm"
            )(x)
        x = GrayscaleToBackbone(mode, name="to_backbone_input")(x)
        features = _build_backbone(
            config.model.backbone, config.data.image_size, weights, config.model.norm
        )(x)
        if config.model.attention:
            a = keras.layers.Conv2D(64, 1, activation="relu", name="attention_conv1")(features)
            a = keras.layers.Conv2D(16, 1, activation="relu", name="attention_conv2")(a)
            mask = keras.layers.Conv2D(1, 1, activation="sigmoid", name="attention_mask")(a)
            x = MaskedAveragePooling(name="attention_pool")([features, mask])
        else:
            x = keras.layers.GlobalAveragePooling2D(name="pool")(features)
        if config.model.use_sex:
            s = keras.layers.Reshape((1,), name="male_column")(male)
            s = keras.layers.Dense(config.model.sex_units, activation="relu", name="sex_dense")(s)
            x = keras.layers.Concatenate(name="image_and_sex")([x, s])
        for i, units in enumerate(tuple(config.model.dense_units)):
            x = keras.layers.Dense(units, activation="relu", name=f"dense{i}")(x)
            if config.model.dropout > 0:
                x = ReplicaDropout(config.model.dropout, name=f"dropout{i}")(x)
        # float32 at the top: z-scores and months need more precision than bf16's 8 bits.
        if config.model.head == "bins":
            logits = keras.layers.Dense(
                config.model.num_bins, dtype="float32", name=heads.LOGITS_LAYER
            )(x)
            months = heads.BinsToMonths(
                config.model.num_bins,
                derived.label_mean,
                derived.label_std,
                dtype="float32",
                name="months",
            )(logits)
        else:
            z = keras.layers.Dense(1, dtype="float32", name="zscore")(x)
            months = ZScoreToMonths(
                derived.label_mean, derived.label_std, dtype="float32", name="months"
            )(z)
        correction = (derived.bias_slope, derived.bias_intercept)
        if correction != (1.0, 0.0):
            months = heads.LinearCorrection(*correction, dtype="float32", name="corrected")(months)
        return keras.Model(
            {"image": image, "male": male}, months, name=f"boneage_{config.model.backbone}"
        )
