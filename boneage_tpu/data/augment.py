"""XLA-safe on-device augmentation: one random affine per image + photometric jitter.

Runs inside the replica step on the accelerator, from the uint8 batches the host sends to
float32 in 0..255. Keras' RandomRotation/Zoom/Shear/Translation lower to
ImageProjectiveTransformV3, which has no XLA kernel (a TPU runs only XLA), so the geometry is
one composed 2x3 matrix per image applied by our own bilinear warp: per-pixel gathers on CPU
and GPU, row gathers + one-hot matmuls on TPU (`warp_affine`). Randomness is
stateless (`tf.random.stateless_*`) and keyed by (global seed, step, replica id): a run is
reproducible and every replica draws different transforms. TF's stateless kernels derive
different streams under XLA and without it, so reproducibility holds per execution mode.

Coordinates: x is the column, y the row (pointing down), both in pixels, about the centre of
the pixel grid. A matrix maps an OUTPUT pixel (x, y, 1) to the INPUT point it samples.
"""

from __future__ import annotations

import math

import tensorflow as tf

from boneage_tpu.core.config import AugmentConfig
from boneage_tpu.data.warp import warp_affine, warp_chunk, warp_transient_bytes

# Column order of the per-image uniform draws in `sample_params`.
_PARAM_NAMES = ("angle", "shift_x", "shift_y", "zoom", "shear", "flip", "brightness")
_PARAM_NAMES += ("contrast", "gamma")


def to_float(images: tf.Tensor) -> tf.Tensor:
    """Converts uint8 images to float32 in 0..255 (the no-augmentation path: eval, serving)."""
    return tf.cast(images, tf.float32)


def replica_seed(global_seed: int, step: tf.Tensor, replica_id: tf.Tensor) -> tf.Tensor:
    """Returns the stateless seed (int32 [2]) of one replica at one step.

    Args:
      global_seed: the run's seed.
      step: the training step counter (integer tensor).
      replica_id: `tf.distribute.get_replica_context().replica_id_in_sync_group`.
    """
    base = tf.constant([int(global_seed), 0x5EED], tf.int64)
    seed = tf.random.experimental.stateless_fold_in(base, tf.cast(step, tf.int64))
    return tf.random.experimental.stateless_fold_in(seed, tf.cast(replica_id, tf.int64))


def sample_params(seed: tf.Tensor, batch_size: int, config: AugmentConfig) -> dict[str, tf.Tensor]:
    """Draws per-image augmentation parameters (float32 [B] each) from a stateless seed.

    Returns a dict with `angle` (radians), `shift_x`/`shift_y` (fractions of width/height),
    `zoom`, `shear`, `flip` (0 or 1), `brightness` (fraction of 255), `contrast`, `gamma`.
    """
    u = tf.random.stateless_uniform([batch_size, len(_PARAM_NAMES)], seed=seed)
    col = dict(zip(_PARAM_NAMES, tf.unstack(u, axis=1), strict=True))

    def symmetric(name: str, limit: float) -> tf.Tensor:
        return (2.0 * col[name] - 1.0) * limit

    def between(name: str, bounds: tuple[float, float]) -> tf.Tensor:
        return bounds[0] + col[name] * (bounds[1] - bounds[0])

    flip = tf.cast(col["flip"] < 0.5, tf.float32) if config.flip else tf.zeros_like(col["flip"])
    return {
        "angle": symmetric("angle", math.radians(config.rotation_deg)),
        "shift_x": symmetric("shift_x", config.shift),
        "shift_y": symmetric("shift_y", config.shift),
        "zoom": between("zoom", config.zoom),
        "shear": symmetric("shear", config.shear),
        "flip": flip,
        "brightness": symmetric("brightness", config.brightness),
        "contrast": between("contrast", config.contrast),
        "gamma": between("gamma", config.gamma),
    }


def _matrix(rows: list[list[tf.Tensor | float]], like: tf.Tensor) -> tf.Tensor:
    """Stacks 3x3 entries (tensors [B] or Python floats) into a batch of matrices [B, 3, 3]."""
    entries = [
        e if isinstance(e, tf.Tensor) else tf.fill(tf.shape(like), e) for r in rows for e in r
    ]
    return tf.reshape(tf.stack(entries, axis=1), [-1, 3, 3])


def affine_matrices(params: dict[str, tf.Tensor], height: int, width: int) -> tf.Tensor:
    """Composes the parameters into one output->input matrix per image, float32 [B, 2, 3].

    The forward transform (input content -> output) is flip, then zoom, shear, rotation and
    shift, about the image centre; the warp needs its inverse, built here factor by factor.
    """
    angle = params["angle"]
    cos, sin = tf.cos(angle), tf.sin(angle)
    inv_zoom = 1.0 / params["zoom"]
    flip_sign = 1.0 - 2.0 * params["flip"]
    cx, cy = (width - 1) / 2.0, (height - 1) / 2.0
    tx, ty = params["shift_x"] * width, params["shift_y"] * height
    # Each factor is the inverse of the forward step; applied right to left on output points.
    uncentre_shift = _matrix([[1.0, 0.0, -cx - tx], [0.0, 1.0, -cy - ty], [0.0, 0.0, 1.0]], angle)
    unrotate = _matrix([[cos, -sin, 0.0], [sin, cos, 0.0], [0.0, 0.0, 1.0]], angle)
    unshear = _matrix([[1.0, -params["shear"], 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]], angle)
    unzoom_flip = _matrix(
        [[flip_sign * inv_zoom, 0.0, 0.0], [0.0, inv_zoom, 0.0], [0.0, 0.0, 1.0]], angle
    )
    recentre = _matrix([[1.0, 0.0, cx], [0.0, 1.0, cy], [0.0, 0.0, 1.0]], angle)
    m = recentre @ unzoom_flip @ unshear @ unrotate @ uncentre_shift
    return m[:, :2, :]


def max_stretch(config: AugmentConfig) -> float:
    """Returns a bound on |m[r, 0]| + |m[r, 1]| of every matrix `config` can draw.

    That sum is how many input pixels one output pixel step can move along a row or a column;
    the matmul warp sizes its input windows with it.
    """
    angle = min(math.radians(config.rotation_deg), math.pi / 4)
    return (1.0 + config.shear) * (math.cos(angle) + math.sin(angle)) / config.zoom[0]


def batch_transient_bytes(
    height: int, width: int, channels: int, method: str, config: AugmentConfig, batch: int
) -> int:
    """Returns the warp's estimated peak transients for one replica's batch (bytes).

    The whole batch for "gather"; one chunk (`warp_chunk`) for "matmul". 0 when `config`
    has no geometric transform (no warp runs).
    """
    if not config.geometric:
        return 0
    if method == "gather":
        return warp_transient_bytes(height, width, channels, "gather", images=batch)
    stretch = max_stretch(config)
    chunk = min(batch, warp_chunk(height, width, channels, stretch))
    return warp_transient_bytes(height, width, channels, "matmul", stretch, images=chunk)


def adjust_intensity(images: tf.Tensor, params: dict[str, tf.Tensor]) -> tf.Tensor:
    """Applies gamma, contrast (about the image mean) and brightness; float32 0..255 out.

    Args:
      images: [B, H, W, C] in 0..255, any real dtype.
      params: from `sample_params` (uses `gamma`, `contrast`, `brightness`).
    """

    def per_image(name: str) -> tf.Tensor:
        return tf.reshape(params[name], [-1, 1, 1, 1])

    # exp(g * log x) is twice as fast as tf.pow under XLA on CPU; the epsilon keeps log finite
    # at black pixels (they map to ~0.004 grey levels).
    x = tf.exp(per_image("gamma") * tf.math.log(tf.cast(images, tf.float32) / 255.0 + 1e-6))
    mean = tf.reduce_mean(x, axis=[1, 2, 3], keepdims=True)
    x = (x - mean) * per_image("contrast") + mean + per_image("brightness")
    return tf.clip_by_value(x, 0.0, 1.0) * 255.0


def augment_batch(
    images: tf.Tensor,
    seed: tf.Tensor,
    config: AugmentConfig | None = None,
    warp: str = "gather",
) -> tf.Tensor:
    """Randomly augments a batch on the device; XLA-compilable, stateless.

    Args:
      images: uint8 [B, H, W, C] with static H, W, C (B may be dynamic).
      seed: int32/int64 [2], e.g. `replica_seed(global_seed, step, replica_id)`.
      config: the ranges (None: the defaults); `AugmentConfig.none()` returns
        `to_float(images)` exactly.
      warp: `warp_affine`'s method: "gather" (CPU, GPU) or "matmul" (TPU).

    Returns:
      float32 [B, H, W, C] in 0..255.
    """
    config = config or AugmentConfig()
    if not (config.geometric or config.photometric):
        return to_float(images)
    _, height, width, _ = images.shape
    params = sample_params(seed, tf.shape(images)[0], config)
    # Warp first: gathering the 1-byte source pixels beat gathering jittered floats (~3.9k vs
    # ~2.9k img/s at 299 px on 2 CPU cores), and the warp's black fill then gets the same
    # jitter as the host's black padding.
    if config.geometric:
        matrices = affine_matrices(params, height, width)
        out = warp_affine(images, matrices, warp, max_stretch(config) if warp == "matmul" else None)
    else:
        out = images
    if config.photometric:
        return adjust_intensity(out, params)
    return to_float(out)
