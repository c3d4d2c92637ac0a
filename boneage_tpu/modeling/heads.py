"""Output heads: z-score regression, or a softmax over age bins whose expectation is the age.

The "bins" head (label-distribution learning, as in DLDL-v2 and ianpan/bone-age's
classification models) predicts a distribution over K bin centres evenly spaced in z-score
units over [-Z, Z] (Z = `Z_RANGE` train-label standard deviations, about 0..260 months on
RSNA). The prediction is the distribution's mean; its standard deviation is a per-image
uncertainty. Training minimises the cross-entropy to a Gaussian around the true z-score plus
the ordinary loss on the expectation, so the mean stays calibrated.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import keras
import tensorflow as tf

LOGITS_LAYER = "age_logits"
Z_RANGE = 3.5
# Width of the Gaussian target in z units (0.15 std ~ 6 months on RSNA): about the spread of
# single readers, wider than a bin so neighbouring bins share the signal.
TARGET_SIGMA_Z = 0.15
# Slopes a bias correction may have; a trained model's are ~1.0-1.2 (regression to the mean).
SLOPE_RANGE = (0.5, 2.0)


def bin_centres(num_bins: int) -> tf.Tensor:
    """Returns the K bin centres in z-score units, float32 [K], evenly spaced over [-Z, Z]."""
    if num_bins < 2:
        raise ValueError(f"--num_bins must be >= 2, got {num_bins}")
    return tf.linspace(-Z_RANGE, Z_RANGE, num_bins)


def soft_targets(z: tf.Tensor, num_bins: int, sigma: float = TARGET_SIGMA_Z) -> tf.Tensor:
    """Returns Gaussian target distributions over the bins, float32 [B, K], rows sum to 1."""
    centres = bin_centres(num_bins)
    z = tf.clip_by_value(tf.cast(z, tf.float32), -Z_RANGE, Z_RANGE)
    logits = -0.5 * tf.square((centres[None, :] - z[:, None]) / sigma)
    return tf.nn.softmax(logits, axis=-1)


def bins_loss(logits: tf.Tensor, z_target: tf.Tensor) -> tf.Tensor:
    """Per-example cross-entropy between the predicted bins and the Gaussian target, [B]."""
    logits = tf.cast(logits, tf.float32)
    target = soft_targets(z_target, logits.shape[-1])
    return tf.nn.softmax_cross_entropy_with_logits(labels=target, logits=logits)


@keras.saving.register_keras_serializable(package="boneage_tpu")
class BinsToMonths(keras.layers.Layer):
    """Maps bin logits [B, K] to months [B] (the mean) or, with `spread=True`, to the std."""

    def __init__(
        self,
        num_bins: int = 64,
        label_mean: float = 0.0,
        label_std: float = 1.0,
        spread: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.num_bins = int(num_bins)
        self.label_mean = float(label_mean)
        self.label_std = float(label_std)
        self.spread = bool(spread)

    def call(self, logits: Any) -> Any:
        p = keras.ops.softmax(keras.ops.cast(logits, "float32"), axis=-1)
        centres = keras.ops.convert_to_tensor(bin_centres(self.num_bins))
        mean_z = keras.ops.sum(p * centres, axis=-1)
        if self.spread:
            var_z = keras.ops.sum(p * keras.ops.square(centres - mean_z[:, None]), axis=-1)
            return keras.ops.sqrt(keras.ops.maximum(var_z, 0.0)) * self.label_std
        return mean_z * self.label_std + self.label_mean

    def compute_output_shape(self, input_shape: Sequence[int | None]) -> tuple[int | None, ...]:
        return tuple(input_shape[:-1])

    def get_config(self) -> dict[str, Any]:
        return {
            **super().get_config(),
            "num_bins": self.num_bins,
            "label_mean": self.label_mean,
            "label_std": self.label_std,
            "spread": self.spread,
        }


def logits_of(model: keras.Model) -> Any | None:
    """Returns the bins head's logits tensor of a functional model, or None (regression)."""
    try:
        return model.get_layer(LOGITS_LAYER).output
    except ValueError:
        return None


def with_logits(model: keras.Model) -> keras.Model | None:
    """Returns a model sharing `model`'s weights that outputs (months, logits); None without bins."""
    logits = logits_of(model)
    if logits is None:
        return None
    return keras.Model(model.input, [model.output, logits], name=f"{model.name}_with_logits")


def with_spread(model: keras.Model) -> keras.Model | None:
    """Returns a model sharing `model`'s weights that outputs (months, std months); None without
    a bins head (regression models have no per-image spread)."""
    logits = logits_of(model)
    if logits is None:
        return None
    months_layer = model.get_layer("months")
    scale = months_layer.label_std
    # A fitted correction stretches the months, so it stretches their spread too.
    names = {layer.name for layer in model.layers}
    if "corrected" in names:
        scale *= abs(model.get_layer("corrected").slope)
    spread = BinsToMonths(
        months_layer.num_bins, 0.0, scale, spread=True, dtype="float32", name="spread_months"
    )(logits)
    return keras.Model(model.input, [model.output, spread], name=f"{model.name}_with_spread")


@keras.saving.register_keras_serializable(package="boneage_tpu")
class LinearCorrection(keras.layers.Layer):
    """Applies the fitted bias correction months' = slope * months + intercept (Deeplasia)."""

    def __init__(self, slope: float = 1.0, intercept: float = 0.0, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.slope = float(slope)
        self.intercept = float(intercept)

    def call(self, months: Any) -> Any:
        return keras.ops.cast(months, "float32") * self.slope + self.intercept

    def compute_output_shape(self, input_shape: Sequence[int | None]) -> tuple[int | None, ...]:
        return tuple(input_shape)

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "slope": self.slope, "intercept": self.intercept}


def fit_linear_correction(true: Sequence[float], predicted: Sequence[float]) -> tuple[float, float]:
    """Least-squares fit of true ~ slope * predicted + intercept; returns (slope, intercept).

    Regression to the mean shrinks predictions towards the training mean (young ages too
    old, old ages too young); the line undoes that on held-out predictions. Unlabeled rows
    (negative true values) are ignored. The identity (1, 0) is returned when there is too
    little to fit (fewer than 10 labeled rows, constant predictions) or the fitted slope is
    outside [SLOPE_RANGE]: such a line would not correct a bias but replace a model that has
    not learned.
    """
    import numpy as np

    y = np.asarray(true, np.float64)
    p = np.asarray(predicted, np.float64)
    keep = (y >= 0) & np.isfinite(p)
    y, p = y[keep], p[keep]
    if y.size < 10 or float(np.std(p)) < 1e-6:
        return 1.0, 0.0
    slope, intercept = np.polyfit(p, y, 1)
    if not SLOPE_RANGE[0] <= slope <= SLOPE_RANGE[1]:
        return 1.0, 0.0
    return float(slope), float(intercept)
