"""Runs a restored model over a TFRecord split on any strategy, with test-time augmentation.

The host reads padded, masked evaluation batches (every record exactly once, static shapes);
only images and sex go to the replicas, ids and labels stay on the host, and padding rows are
dropped by their mask after the replicas answer.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import tensorflow as tf

from boneage_tpu.core.errors import Error
from boneage_tpu.data import augment, warp
from boneage_tpu.data import pipeline as data
from boneage_tpu.modeling import heads

TTA_MODES = ("none", "flip", "rotflip")
# What fills the corners a rotated view uncovers: black (the training augmentation's padding) or
# the film's own background (the median of the image's border pixels), which on a grey,
# low-contrast film is not black.
TTA_FILLS = ("black", "background")
# Deeplasia's test-time augmentation: these rotations, each with and without the mirror.
ROTFLIP_ANGLES_DEG = (-10.0, -5.0, 0.0, 5.0, 10.0)


class InferenceError(Error, ValueError):
    """Inference cannot run or its result is inconsistent; the message is one line."""


@dataclasses.dataclass
class SplitPredictions:
    """Per-record results of one pass over a split, in the reader's deterministic order."""

    ids: list[str]
    male: np.ndarray  # float64, 1 male / 0 female
    boneage: np.ndarray  # float64 months; schema.NO_LABEL (-1) where unlabeled
    predicted: np.ndarray  # float64 months
    spread: np.ndarray | None = None  # float64 months: per-image std of the bins head
    # float64 months [views, N]: each TTA view's own prediction (`tta_views` order); their mean
    # is `predicted` up to float32 rounding (`predicted` is averaged on the device).
    views: np.ndarray | None = None
    # float64 months [views, N]: each view's own spread (None without a spread); a TTA mode's
    # spread is the mean over its views, so a subset's can be recomputed from these.
    view_spreads: np.ndarray | None = None


def tta_views(tta: str) -> list[tuple[float, bool]]:
    """Returns the (rotation degrees, mirrored) views a TTA mode averages over."""
    if tta not in TTA_MODES:
        raise InferenceError(f"--tta must be one of {TTA_MODES}, got {tta!r}")
    if tta == "none":
        return [(0.0, False)]
    if tta == "flip":
        return [(0.0, False), (0.0, True)]
    return [(angle, flip) for angle in ROTFLIP_ANGLES_DEG for flip in (False, True)]


def border_median(images: tf.Tensor) -> tf.Tensor:
    """Returns each image's median border pixel [B, 1, 1, 1]: its film background, mostly."""
    border = tf.concat(
        [images[:, 0, :, :], images[:, -1, :, :], images[:, :, 0, :], images[:, :, -1, :]], axis=1
    )
    values = tf.sort(tf.reshape(border, [tf.shape(images)[0], -1]), axis=1)
    middle = values[:, values.shape[1] // 2]
    return tf.reshape(middle, [-1, 1, 1, 1])


def view_images(images: tf.Tensor, angle_deg: float, flip: bool, fill: str = "black") -> tf.Tensor:
    """Rotates (about the centre) and optionally mirrors float images [B,S,S,1].

    Uses the training augmentation's XLA-safe warp; the unrotated views are exact (a mirror is
    a reverse, the identity returns the input). The uncovered corners read `fill`: black, or
    the image's `border_median` (the warp of image - background, plus the background: the same
    bilinear samples inside, the background outside).
    """
    if fill not in TTA_FILLS:
        raise InferenceError(f"--tta_fill must be one of {TTA_FILLS}, got {fill!r}")
    if flip:
        images = tf.reverse(images, axis=[2])
    if angle_deg == 0.0:
        return images
    background = border_median(images) if fill == "background" else None
    if background is not None:
        images = images - background
    batch = tf.shape(images)[0]
    zeros = tf.zeros([batch], tf.float32)
    params = {
        "angle": tf.fill([batch], float(np.radians(angle_deg))),
        "shift_x": zeros,
        "shift_y": zeros,
        "zoom": tf.ones([batch], tf.float32),
        "shear": zeros,
        "flip": zeros,
    }
    _, height, width, _ = images.shape
    rotated = warp.warp_affine(images, augment.affine_matrices(params, height, width))
    return rotated if background is None else rotated + background


def tta_predict_fn(
    model: Any, tta: str, fill: str = "black"
) -> Callable[[tf.Tensor, tf.Tensor], tuple[tf.Tensor, tf.Tensor]]:
    """Returns fn(images uint8|float32 [B,S,S,1], male float32 [B]) -> (months, spread) [B].

    The result is the mean over the TTA views (`tta_views`): "flip" averages the image and its
    horizontal mirror (a mirrored left hand looks like a right hand: both are plausible
    inputs); "rotflip" also rotates by +-5 and +-10 degrees. `spread` is the bins head's
    per-image std in months (averaged over the views), zeros for a regression head.
    """
    views_fn = tta_views_fn(model, tta, fill)

    def run(images: tf.Tensor, male: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        months, spread, _, _ = views_fn(images, male)
        return months, spread

    return run


def tta_views_fn(
    model: Any, tta: str, fill: str = "black"
) -> Callable[[tf.Tensor, tf.Tensor], tuple[tf.Tensor, tf.Tensor, tf.Tensor, tf.Tensor]]:
    """Returns fn(images, male) -> (months [B], spread [B], views' months, views' spreads).

    `months` and `spread` are `tta_predict_fn`'s; the last two ([views, B] each) keep each
    view's own prediction and spread, so that a report can show which views help and a subset
    of the views (a narrower TTA mode) can be averaged on the host.
    """
    views = tta_views(tta)
    spread_model = heads.with_spread(model) if hasattr(model, "get_layer") else None

    def run(
        images: tf.Tensor, male: tf.Tensor
    ) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor, tf.Tensor]:
        images = tf.cast(images, tf.float32)
        male = tf.cast(male, tf.float32)
        months, spread = [], []
        for angle, flip in views:
            inputs = {"image": view_images(images, angle, flip, fill), "male": male}
            if spread_model is None:
                out = model(inputs, training=False)
                std = tf.zeros_like(tf.reshape(tf.cast(out, tf.float32), [-1]))
            else:
                out, std = spread_model(inputs, training=False)
            months.append(tf.reshape(tf.cast(out, tf.float32), [-1]))
            spread.append(tf.reshape(tf.cast(std, tf.float32), [-1]))
        mean = tf.add_n(months) / len(views)
        return mean, tf.add_n(spread) / len(views), tf.stack(months), tf.stack(spread)

    return run


def predict_dataset(
    model: Any,
    dataset: tf.data.Dataset,
    *,
    tta: str = "none",
    strategy: tf.distribute.Strategy | None = None,
    jit_compile: bool = False,
    tta_fill: str = "black",
) -> SplitPredictions:
    """Predicts every real (mask 1) row of an evaluation dataset.

    Args:
      model: a Keras model built under `strategy.scope()`.
      dataset: global batches {image, male, boneage, id, mask} with a static batch size that
        the number of replicas divides (`data.build_dataset(..., training=False)`).
      tta: none | flip | rotflip.
      strategy: where to run; default: the current (default) strategy.
      jit_compile: compile each replica's forward pass (TTA views included) with XLA.
      tta_fill: what the rotated views' uncovered corners read (`TTA_FILLS`).
    """
    strategy = strategy or tf.distribute.get_strategy()
    replicas = strategy.num_replicas_in_sync
    predict = tta_views_fn(model, tta, tta_fill)
    if jit_compile:
        predict = tf.function(predict, jit_compile=True)

    def predict_rows(images: tf.Tensor, male: tf.Tensor) -> tf.Tensor:
        """[replicas, 2 + 2 views, rows]: months, spread, each view's months and each view's
        spread of every replica's rows, on every replica.

        Each replica predicts its own slice into its row of a zero tensor (static shapes for
        XLA); one all-reduce (a sum) then gives every replica, and so every host, the whole
        batch: under multi-worker strategies a host holds only its own replicas' outputs,
        while every host reads (and masks) the whole batch.
        """
        context = tf.distribute.get_replica_context()
        months, spread, views, view_spreads = predict(images, male)
        own = tf.concat([tf.stack([months, spread]), views, view_spreads], axis=0)
        slot = tf.one_hot(context.replica_id_in_sync_group, replicas, dtype=own.dtype)
        return context.all_reduce(tf.distribute.ReduceOp.SUM, slot[:, None, None] * own[None])

    @tf.function
    def step(inputs: Mapping[str, Any]) -> Any:
        return strategy.run(predict_rows, args=(inputs["image"], inputs["male"]))

    has_spread = hasattr(model, "get_layer") and heads.logits_of(model) is not None
    ids: list[str] = []
    male, boneage, predicted, spread, views, view_spreads = [], [], [], [], [], []
    count = len(tta_views(tta))
    # Every host iterates the same global batches, so all run the same number of steps.
    for batch in dataset:
        size = int(batch["image"].shape[0])
        if size % replicas:
            raise InferenceError(
                f"evaluation batch of {size} does not split evenly over {replicas} replicas: "
                f"use a --batch_size that is a multiple of {replicas}"
            )
        per_replica = size // replicas

        def replica_slice(
            ctx: tf.distribute.experimental.ValueContext, batch=batch, per_replica=per_replica
        ):
            # Only the model inputs go to the device; strings cannot live on a TPU.
            start = ctx.replica_id_in_sync_group * per_replica
            return {k: batch[k][start : start + per_replica] for k in ("image", "male")}

        inputs = strategy.experimental_distribute_values_from_function(replica_slice)
        slots = np.asarray(strategy.experimental_local_results(step(inputs))[0], np.float32)
        rows = np.concatenate(slots, axis=1).astype(np.float64)
        months, stds = rows[0], rows[1]
        keep = np.asarray(batch["mask"]) > 0
        ids.extend(v.decode("utf-8") for v in np.asarray(batch["id"])[keep])
        male.append(np.asarray(batch["male"], np.float64)[keep])
        boneage.append(np.asarray(batch["boneage"], np.float64)[keep])
        predicted.append(months[keep])
        spread.append(stds[keep])
        views.append(rows[2 : 2 + count, keep])
        view_spreads.append(rows[2 + count :, keep])
    if not ids:
        raise InferenceError("the evaluation dataset yielded no records")
    return SplitPredictions(
        ids=ids,
        male=np.concatenate(male),
        boneage=np.concatenate(boneage),
        predicted=np.concatenate(predicted),
        spread=np.concatenate(spread) if has_spread else None,
        views=np.concatenate(views, axis=1),
        view_spreads=np.concatenate(view_spreads, axis=1) if has_spread else None,
    )


def predict_split(
    model: Any,
    data_dir: str,
    split: str,
    manifest: dict[str, Any],
    *,
    image_size: int,
    batch_size: int,
    tta: str = "none",
    strategy: tf.distribute.Strategy | None = None,
    jit_compile: bool = False,
    tta_fill: str = "black",
) -> SplitPredictions:
    """Predicts every record of a TFRecord split exactly once.

    Args:
      model: a Keras model built under `strategy.scope()`.
      data_dir: the converter's output folder (local or gs://).
      split: split name in the manifest.
      manifest: the folder's parsed manifest.
      image_size: the model's square input size.
      batch_size: global batch; must be a multiple of the strategy's replicas.
      tta: none | flip | rotflip.
      strategy: where to run; default: the current strategy.
      jit_compile: compile each replica's forward pass with XLA.
      tta_fill: what the rotated views' uncovered corners read (`TTA_FILLS`).
    """
    strategy = strategy or tf.distribute.get_strategy()
    replicas = strategy.num_replicas_in_sync
    if batch_size < 1 or batch_size % replicas:
        raise InferenceError(
            f"--batch_size {batch_size} is not a positive multiple of the {replicas} replicas: "
            f"use e.g. {replicas * max(1, batch_size // replicas)}"
        )
    dataset = data.build_dataset(
        data_dir,
        split,
        training=False,
        batch_size=batch_size,
        image_size=image_size,
        manifest=manifest,
        cache="no",  # one pass: caching would only cost RAM
    )
    return predict_dataset(
        model, dataset, tta=tta, strategy=strategy, jit_compile=jit_compile, tta_fill=tta_fill
    )


def average(runs: list[SplitPredictions]) -> SplitPredictions:
    """Averages the predictions of several models over the same records (an ensemble)."""
    first = runs[0]
    for other in runs[1:]:
        if other.ids != first.ids:
            raise InferenceError("ensemble members saw the records in different orders")
    spreads = [r.spread for r in runs]
    return dataclasses.replace(
        first,
        predicted=np.mean(np.stack([r.predicted for r in runs]), axis=0),
        # Members' mean spread; the members' disagreement is not added in.
        spread=None if any(v is None for v in spreads) else np.mean(np.stack(spreads), axis=0),
        views=None
        if any(r.views is None for r in runs)
        else np.mean(np.stack([r.views for r in runs]), axis=0),
        view_spreads=None
        if any(r.view_spreads is None for r in runs)
        else np.mean(np.stack([r.view_spreads for r in runs]), axis=0),
    )
