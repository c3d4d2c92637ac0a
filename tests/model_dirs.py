"""Model directories for evaluate/predict tests, laid out as the trainer writes them."""

from __future__ import annotations

import dataclasses
import pathlib

import keras
import numpy as np
import tensorflow as tf

from boneage_tpu.core import config as config_lib
from boneage_tpu.core import model_dir as model_dir_lib
from boneage_tpu.modeling import model as model_lib

BATCH = 4


@keras.saving.register_keras_serializable(package="boneage_tests")
class FixedPixelWeights(keras.layers.Layer):
    """months = 100 + sum(image * W) with a fixed random W: the output depends on flips."""

    def __init__(self, size: int = 32, seed: int = 0, **kwargs):
        super().__init__(**kwargs)
        self.size, self.seed = size, seed
        rng = np.random.default_rng(seed)
        init = rng.normal(0, 0.01, (size, size, 1)).astype("float32")
        self.w = self.add_weight(
            shape=(size, size, 1), initializer=keras.initializers.Constant(init), trainable=False
        )

    def call(self, image):
        return 100.0 + keras.ops.sum(keras.ops.cast(image, "float32") * self.w, axis=(1, 2, 3))

    def get_config(self):
        return {**super().get_config(), "size": self.size, "seed": self.seed}


def flip_sensitive_model(size: int = 32) -> keras.Model:
    image = keras.Input((size, size, 1), name="image")
    male = keras.Input((), name="male")
    months = FixedPixelWeights(size, name="pixels")(image)
    return keras.Model({"image": image, "male": male}, months)


def make_run(
    root: pathlib.Path, manifest: dict, *, seed: int = 0, steps=(1, 2), **overrides
) -> str:
    """Writes a model directory like the trainer's: config.json, derived.json, checkpoints, export.

    `overrides` are further TrainConfig flags (e.g. head="bins", data=PATH) or Derived fields
    (e.g. bias_slope, tta_corrections, val_split: a fitted correction, built into the model).
    """
    stats = manifest["label_stats"]
    fields = {f.name for f in dataclasses.fields(config_lib.Derived)}
    derived_values = {k: overrides.pop(k) for k in list(overrides) if k in fields}
    config = config_lib.TrainConfig.from_flags(
        **{
            "data": "toy",
            "model_dir": str(root),
            "backbone": "tiny",
            "image_size": 32,
            "dense_units": (8,),
            "batch_size": BATCH,
            "seed": seed,
            **overrides,
        }
    )
    derived = config_lib.Derived(
        label_mean=stats["mean_months"],
        label_std=stats["std_months"],
        data_image_size=manifest["image_size"],
        data_encoding=manifest["encoding"],
        schema_version=manifest["schema_version"],
        **derived_values,
    )
    model_dir_lib.save_config(config)
    model_dir_lib.save_derived(str(root), derived)
    keras.utils.set_random_seed(seed)
    model = model_lib.build_model(config, derived)
    step = tf.Variable(0, dtype=tf.int64)
    manager = tf.train.CheckpointManager(
        tf.train.Checkpoint(step=step, model=model),
        model_dir_lib.checkpoint_dir(str(root)),
        max_to_keep=5,
        checkpoint_name="ckpt",
    )
    dense = model.get_layer("age_logits" if config.model.head == "bins" else "zscore")
    for s in steps:
        step.assign(s)
        dense.kernel.assign(dense.kernel * 1.5)  # different weights at every step
        manager.save()
    (root / "export").mkdir()
    model.save(root / "export" / "model.keras")
    return str(root)
