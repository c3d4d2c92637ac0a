"""Exports a trained model: `export/model.keras` and a SavedModel serving encoded images.

Both exports are float32 and strategy-free: the trained weights are copied into a fresh fp32
model built outside any distribution scope, so a model trained in bf16 on a TPU serves on a CPU.
The SavedModel's `serving_default(image_bytes: string [None], male: float32 [None]) ->
{"boneage_months": float32 [None]}` decodes with `data.decode_image_bytes`, the same code as
the training input pipeline, so serving preprocessing equals training preprocessing. An empty
batch, a `male` of another length or outside 0..1 (NaN, 1e6) fails with an
InvalidArgumentError naming the problem.
"""

from __future__ import annotations

import keras
import tensorflow as tf

from boneage_tpu.core import config as config_lib
from boneage_tpu.core import model_dir as model_dir_lib
from boneage_tpu.data import pipeline as data
from boneage_tpu.modeling.model import build_model


def serving_model(
    trained: keras.Model, config: config_lib.TrainConfig, derived: config_lib.Derived
) -> keras.Model:
    """Returns an fp32 copy of `trained`, built outside any strategy scope."""
    model = build_model(config, derived, weights="none", precision="fp32")
    model.set_weights(trained.get_weights())
    return model


def export_saved_model(model: keras.Model, image_size: int, path: str) -> None:
    """Writes a SavedModel whose serving signature takes PNG/JPEG bytes and sex."""

    def serve(image_bytes: tf.Tensor, male: tf.Tensor) -> dict[str, tf.Tensor]:
        # Checked in the graph, so every client gets a clear error instead of a shape error
        # deep in map_fn (empty batch) or a confident nonsense age (male = NaN or 1e6).
        checks = [
            tf.debugging.assert_positive(
                tf.size(image_bytes), message="image_bytes is empty: give at least one image"
            ),
            tf.debugging.assert_equal(
                tf.size(male),
                tf.size(image_bytes),
                message="male must have one value per image in image_bytes",
            ),
            tf.debugging.Assert(
                tf.reduce_all(tf.math.is_finite(male) & (male >= 0.0) & (male <= 1.0)),
                ["male must be 0 (female) to 1 (male) for every image; got", male],
            ),
        ]
        with tf.control_dependencies(checks):
            image_bytes = tf.identity(image_bytes)
        images = tf.map_fn(
            lambda encoded: data.decode_image_bytes(encoded, image_size),
            image_bytes,
            fn_output_signature=tf.TensorSpec([image_size, image_size, 1], tf.uint8),
        )
        months = model({"image": tf.cast(images, tf.float32), "male": male}, training=False)
        return {"boneage_months": tf.reshape(tf.cast(months, tf.float32), [-1])}

    archive = keras.export.ExportArchive()
    archive.track(model)
    archive.add_endpoint(
        name="serving_default",
        fn=serve,
        input_signature=[
            tf.TensorSpec([None], tf.string, name="image_bytes"),
            tf.TensorSpec([None], tf.float32, name="male"),
        ],
    )
    archive.write_out(path, verbose=False)


def export_all(
    trained: keras.Model,
    config: config_lib.TrainConfig,
    derived: config_lib.Derived,
    model_dir: str,
) -> dict[str, str]:
    """Writes `export/model.keras` and `export/saved_model/` into `model_dir`.

    Args:
      trained: the trained model (any strategy, any precision).
      config: the run's settings (the exported copy is built from them).
      derived: the label stats and the bias correction the exported model applies.
      model_dir: the model directory (a non-chief worker's private folder for its copy).

    Returns:
      {"keras": path, "saved_model": path}.
    """
    tf.io.gfile.makedirs(model_dir_lib.export_dir(model_dir))
    model = serving_model(trained, config, derived)
    keras_path = model_dir_lib.keras_export_path(model_dir)
    saved_model_path = model_dir_lib.saved_model_path(model_dir)
    model.save(keras_path)
    if tf.io.gfile.exists(saved_model_path):
        # A resumed run re-exports; stale files from an older export must not mix in.
        tf.io.gfile.rmtree(saved_model_path)
    export_saved_model(model, config.data.image_size, saved_model_path)
    return {"keras": keras_path, "saved_model": saved_model_path}
