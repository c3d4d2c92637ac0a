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

from boneage_tpu import data
from boneage_tpu.errors import Error

TTA_MODES = ("none", "flip")


class InferenceError(Error, ValueError):
    """Inference cannot run or its result is inconsistent; the message is one line."""


@dataclasses.dataclass
class SplitPredictions:
    """Per-record results of one pass over a split, in the reader's deterministic order."""

    ids: list[str]
    male: np.ndarray  # float64, 1 male / 0 female
    boneage: np.ndarray  # float64 months; schema.NO_LABEL (-1) where unlabeled
    predicted: np.ndarray  # float64 months


def tta_predict_fn(model: Any, tta: str) -> Callable[[tf.Tensor, tf.Tensor], tf.Tensor]:
    """Returns fn(images uint8|float32 [B,S,S,1], male float32 [B]) -> months float32 [B].

    With tta="flip" the result is the mean of the model's outputs on the image and on its
    horizontal mirror (a left hand mirrored looks like a right hand; both are plausible inputs).
    """
    if tta not in TTA_MODES:
        raise InferenceError(f"--tta must be one of {TTA_MODES}, got {tta!r}")

    def run(images: tf.Tensor, male: tf.Tensor) -> tf.Tensor:
        images = tf.cast(images, tf.float32)
        male = tf.cast(male, tf.float32)
        out = tf.reshape(
            tf.cast(model({"image": images, "male": male}, training=False), tf.float32), [-1]
        )
        if tta == "flip":
            mirrored = tf.reverse(images, axis=[2])
            out_flip = model({"image": mirrored, "male": male}, training=False)
            out = (out + tf.reshape(tf.cast(out_flip, tf.float32), [-1])) / 2.0
        return out

    return run


def predict_dataset(
    model: Any,
    dataset: tf.data.Dataset,
    *,
    tta: str = "none",
    strategy: tf.distribute.Strategy | None = None,
) -> SplitPredictions:
    """Predicts every real (mask 1) row of an evaluation dataset.

    Args:
      model: a Keras model built under `strategy.scope()`.
      dataset: global batches {image, male, boneage, id, mask} with a static batch size that
        the number of replicas divides (`data.build_dataset(..., training=False)`).
      tta: none | flip.
      strategy: where to run; default: the current (default) strategy.
    """
    strategy = strategy or tf.distribute.get_strategy()
    replicas = strategy.num_replicas_in_sync
    predict = tta_predict_fn(model, tta)

    @tf.function
    def step(inputs: Mapping[str, Any]) -> Any:
        return strategy.run(predict, args=(inputs["image"], inputs["male"]))

    ids: list[str] = []
    male, boneage, predicted = [], [], []
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
        outputs = strategy.experimental_local_results(step(inputs))
        months = np.concatenate([np.asarray(o, np.float32) for o in outputs]).astype(np.float64)
        keep = np.asarray(batch["mask"]) > 0
        ids.extend(v.decode("utf-8") for v in np.asarray(batch["id"])[keep])
        male.append(np.asarray(batch["male"], np.float64)[keep])
        boneage.append(np.asarray(batch["boneage"], np.float64)[keep])
        predicted.append(months[keep])
    if not ids:
        raise InferenceError("the evaluation dataset yielded no records")
    return SplitPredictions(
        ids=ids,
        male=np.concatenate(male),
        boneage=np.concatenate(boneage),
        predicted=np.concatenate(predicted),
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
) -> SplitPredictions:
    """Predicts every record of a TFRecord split exactly once.

    Args:
      model: a Keras model built under `strategy.scope()`.
      data_dir: the converter's output folder (local or gs://).
      split: split name in the manifest.
      manifest: the folder's parsed manifest.
      image_size: the model's square input size.
      batch_size: global batch; must be a multiple of the strategy's replicas.
      tta: none | flip.
      strategy: where to run; default: the current strategy.
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
    return predict_dataset(model, dataset, tta=tta, strategy=strategy)


def average(runs: list[SplitPredictions]) -> SplitPredictions:
    """Averages the predictions of several models over the same records (an ensemble)."""
    first = runs[0]
    for other in runs[1:]:
        if other.ids != first.ids:
            raise InferenceError("ensemble members saw the records in different orders")
    return dataclasses.replace(
        first, predicted=np.mean(np.stack([r.predicted for r in runs]), axis=0)
    )
