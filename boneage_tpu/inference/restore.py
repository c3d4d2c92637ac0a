"""Finds and restores trained models in a model directory (checkpoints or the Keras export).

Shared by `boneage_tpu.evaluate` (including its continuous mode) and `boneage_tpu.predict`.
The directory layout is `boneage_tpu.core.model_dir`'s.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import tensorflow as tf

from boneage_tpu.core import config as config_lib
from boneage_tpu.core import model_dir as model_dir_lib
from boneage_tpu.core import schema
from boneage_tpu.core.model_dir import ModelDirError, list_checkpoints


@dataclasses.dataclass
class LoadedModel:
    """A restored model with what is needed to feed it and to name its results."""

    model: Any  # keras.Model: {"image": float32 [B,S,S,1] 0..255, "male": float32 [B]} -> [B]
    config: config_lib.TrainConfig
    derived: config_lib.Derived  # label stats, stored image format and the bias correction
    model_dir: str
    step: int | None  # training step of the weights; None for an export without DONE
    source: str  # checkpoint path or export path


def resolve_checkpoint(model_dir: str, checkpoint: str) -> tuple[str, int | None]:
    """Returns (path, step) for `checkpoint` = latest | export | STEP.

    Raises:
      ModelDirError: with one line naming what exists, when the checkpoint is not there.
    """
    if checkpoint == "export":
        path = model_dir_lib.keras_export_path(model_dir)
        if not tf.io.gfile.exists(path):
            raise ModelDirError(f"no Keras export {path}: has training finished?")
        done = model_dir_lib.read_done(model_dir)
        return path, (int(done["step"]) if done and "step" in done else None)
    checkpoints = list_checkpoints(model_dir)
    if not checkpoints:
        raise ModelDirError(
            f"no checkpoints in {model_dir_lib.checkpoint_dir(model_dir)}: is {model_dir} a training run's "
            "--model_dir, and has it saved a checkpoint yet?"
        )
    if checkpoint == "latest":
        step, path = checkpoints[-1]
        return path, step
    if not checkpoint.isdigit():
        raise ModelDirError(
            f"--checkpoint must be latest, export or a step number, got {checkpoint!r}"
        )
    for step, path in checkpoints:
        if step == int(checkpoint):
            return path, step
    steps = [s for s, _ in checkpoints]
    raise ModelDirError(f"no checkpoint at step {checkpoint} in {model_dir}; available: {steps}")


def check_data_compatible(
    derived: config_lib.Derived, manifest: Mapping[str, Any], model_dir: str = ""
) -> None:
    """Raises ModelDirError when the data was prepared differently from the model's training data.

    The model saw images stored at `data_image_size` px and then fitted to `image_size`; data
    stored at another size would be resampled differently, so its results would not be valid.
    Likewise hand-cropped images show the hand larger than uncropped ones: the data's crop
    (`boneage-make-tfrecords --crop`) must be the training data's.
    """
    version = manifest.get("schema_version")
    if derived.schema_version and version != derived.schema_version:
        raise ModelDirError(
            f"data has schema version {version} but {model_dir or 'the model'} was "
            f"trained on schema version {derived.schema_version}: reconvert the data"
        )
    size = manifest.get("image_size")
    if derived.data_image_size and size != derived.data_image_size:
        raise ModelDirError(
            f"data images are stored at {size} px but the model was trained on "
            f"{derived.data_image_size} px data: reconvert with "
            f"boneage-make-tfrecords --image_size {derived.data_image_size}"
        )
    crop = schema.manifest_crop(manifest)
    trained = (derived.data_crop, derived.data_crop_margin)
    if not schema.same_crop(crop, trained):
        raise ModelDirError(
            f"data was converted with {schema.crop_flags(*crop)} but "
            f"{model_dir or 'the model'} was trained on {schema.crop_flags(*trained)} data: "
            f"reconvert with boneage-make-tfrecords {schema.crop_flags(*trained)}"
        )


def load_model(
    model_dir: str, checkpoint: str = "latest", model: Any = None, precision: str = "fp32"
) -> LoadedModel:
    """Restores the model of `model_dir` at `checkpoint` (latest | export | STEP).

    Call it under `strategy.scope()` so the variables are placed for that strategy.

    Args:
      model_dir: the training run's folder (local or gs://).
      checkpoint: latest, export or a training step.
      model: a model built earlier from the same config.json to restore into (the continuous
        evaluator reuses one model instead of building one per checkpoint); None builds one.
      precision: fp32 | bf16 | fp16, the compute precision of a model built from a checkpoint
        (its variables stay float32, so any checkpoint restores); the Keras export keeps the
        fp32 it was saved with.
    """
    from boneage_tpu.modeling import model as model_lib  # Heavy (Keras); only needed here.

    config = model_dir_lib.load_config(model_dir)
    derived = model_dir_lib.load_derived(model_dir)
    path, step = resolve_checkpoint(model_dir, checkpoint)
    if checkpoint == "export":
        import keras

        try:
            model = keras.models.load_model(path)
        except (OSError, ValueError, TypeError) as e:
            raise ModelDirError(f"cannot load {path}: {str(e).splitlines()[0]}") from e
        return LoadedModel(model, config, derived, model_dir, step, path)
    if model is None:
        model = model_lib.build_model(config, derived, precision=precision)
    try:
        status = tf.train.Checkpoint(model=model).restore(path).expect_partial()
        status.assert_existing_objects_matched()
    except (AssertionError, ValueError) as e:
        raise ModelDirError(
            f"checkpoint {path} does not fit the model described by {model_dir}/config.json: "
            f"{str(e).splitlines()[0]}"
        ) from e
    return LoadedModel(model, config, derived, model_dir, step, path)


def model_image_size(loaded: LoadedModel) -> int:
    """Returns the square input size S the model expects (from the model, else config.json)."""
    for tensor in getattr(loaded.model, "inputs", None) or ():
        shape = tuple(tensor.shape)
        if len(shape) == 4 and shape[1] is not None:
            return int(shape[1])
    return int(loaded.config.data.image_size)


def baked_correction(model: Any) -> tuple[float, float]:
    """Returns the (slope, intercept) the model applies itself: its `corrected` layer's.

    A model built from a run's derived.json (checkpoints) or exported by it holds the plain
    predictions' line; other models hold none (the identity).
    """
    if not hasattr(model, "get_layer") or "corrected" not in {x.name for x in model.layers}:
        return (1.0, 0.0)
    layer = model.get_layer("corrected")
    return (float(layer.slope), float(layer.intercept))


def tta_corrected(loaded: LoadedModel, months: Any, tta: str) -> Any:
    """Returns TTA-mean predictions with the line fitted for `tta` in place of the plain one.

    The model applies the plain predictions' line to every view; a line fitted to plain
    predictions does not fit a TTA mean, so it is undone and the mode's own line (from
    derived.json; none when the run fitted none for the mode) applied instead.
    """
    if tta == "none":
        return months
    slope, intercept = baked_correction(loaded.model)
    raw = (months - intercept) / slope
    line = loaded.derived.correction(tta)
    return raw if line is None else line[0] * raw + line[1]


def tta_corrected_spread(loaded: LoadedModel, spread: Any, tta: str) -> Any:
    """Returns a TTA mean's spread scaled as `tta_corrected` scales its predictions.

    A line of slope a stretches the spread of the predictions by |a|: the plain line's is
    undone and the mode's applied.
    """
    if tta == "none":
        return spread
    slope, _ = baked_correction(loaded.model)
    line = loaded.derived.correction(tta)
    return spread / abs(slope) * (1.0 if line is None else abs(line[0]))
