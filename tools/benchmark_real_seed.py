"""The seed's way of training, for `tools.benchmark_real --compare_seed` (one subprocess).

    python -m tools.benchmark_real_seed --flagfile F --data D --model_dir M \
        --train_csv CSV --val_csv CSV --curve curve.json --max_train_minutes M \
        [--eval_every N] [--seed 0] [any other training flag]

The training settings are those of `boneage_tpu.train` (`TrainConfig`, the same flags, the same
flagfile and overrides as the compared run); --data gives the label stats (its manifest) and
--model_dir receives the settings as config.json and derived.json. The CSVs have columns
path,boneage,male (the converter's train and val splits, pointing at the source images: with
`benchmark_real --seed_images`, the full-size PNGs). The model is
`boneage_tpu.modeling.model.build_model(config, derived)`, as the trainer builds it, so only the
training pipeline differs.

The input is the seed notebook's: tf_keras `ImageDataGenerator`
`.flow_from_dataframe(color_mode="grayscale", class_mode="raw")` reading each source file
and resizing it to the model's size (`target_size`), pixels kept in 0..255 (the model's input),
batches of --batch_size, fed as numpy arrays to Keras 3 `model.fit` on one device without XLA
(the seed's tf.keras did not compile); a Python generator is read by one thread, as the
seed's kernel read it. Resizing uses bilinear interpolation (kinder to the seed than
load_img's default nearest). The generator's augmentation is the recipe's ranges translated
one to one (`seed_augmentation`); what ImageDataGenerator cannot do (contrast, gamma) is
listed in the curve JSON (`untranslated_augmentation`), with the remaining differences of
distribution (`AUGMENTATION_DIFFERENCES`). Optimizer, schedule, loss (a bins head also trains its
logits) are the run's, from `boneage_tpu.modeling.optim`; with the cosine, its end is re-fitted
to the budget from the measured step rate as the trainer does (never beyond --train_steps).

Every --eval_every steps and at the end, a callback predicts the preloaded val images and
records [minutes of training, val MAE]; the curve's clock stops during these measurements.
With --bn_recalibration_batches N > 0 each measurement first re-estimates the batch-norm
moving statistics from N augmented training batches run forward in training mode (no weight
update), as the trainer does before its validations; that time is left out of the curve, as
the trainer's records leave it out. Training stops at the first step after
--max_train_minutes of wall time, validation included (the trainer's budget counts it too).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402

from boneage_tpu import cli  # noqa: E402
from boneage_tpu.cli import option  # noqa: E402
from boneage_tpu.core.config import AugmentConfig  # noqa: E402
from boneage_tpu.core.errors import ConfigError, Error, UsageError  # noqa: E402

INTERPOLATION = "bilinear"
# What a one-to-one translation of the ranges still leaves different (tf_keras
# src/preprocessing/image.py: ImageDataGenerator.get_random_transform, apply_affine_transform,
# apply_channel_shift); recorded with the curve so that the report can say so.
AUGMENTATION_DIFFERENCES = (
    "zoom: ImageDataGenerator draws x and y zoom independently (ours is isotropic) and uniformly "
    "in 1/scale (ours uniformly in scale)",
    "shear: ImageDataGenerator's matrix is [[1, -sin a], [0, cos a]] (ours [[1, tan a], [0, 1]]), "
    "a = the same angle",
    "brightness: channel_shift_range adds the same +-b x 255 but clips to each image's own "
    "min..max (ours to 0..255)",
)


def seed_augmentation(augment: AugmentConfig) -> dict[str, Any]:
    """Translates the recipe's augmentation ranges into `ImageDataGenerator` arguments.

    Each range maps to the argument that draws the same transform from the same range, as far
    as ImageDataGenerator has one (see `untranslated_augmentation` for the rest and
    AUGMENTATION_DIFFERENCES for where the distributions still differ).

    Args:
      augment: the recipe's ranges (`TrainConfig.augment`).

    Returns:
      keyword arguments of `tf_keras.preprocessing.image.ImageDataGenerator`; {} when
      augmentation is off.
    """
    if not augment.enabled:
        return {}
    zoom_min, zoom_max = (float(z) for z in augment.zoom)
    return {
        "rotation_range": float(augment.rotation_deg),
        # A fraction of the side, as ours: ImageDataGenerator reads a range < 1 so.
        "width_shift_range": float(augment.shift),
        "height_shift_range": float(augment.shift),
        # apply_affine_transform's zoom matrix maps output to input coordinates, so a zoom z
        # shows 1/z of the side: z < 1 enlarges. Our scale s (> 1 enlarges) is z = 1/s.
        "zoom_range": [1.0 / zoom_max, 1.0 / zoom_min],
        # Ours is the x-shear coefficient tan(a); ImageDataGenerator takes a in degrees.
        "shear_range": math.degrees(math.atan(float(augment.shear))),
        "horizontal_flip": bool(augment.flip),
        # Our brightness adds +-b x 255 grey levels; brightness_range would multiply instead,
        # the channel shift (one channel: the grey level) adds.
        "channel_shift_range": float(augment.brightness) * 255.0,
        # Our warp fills outside the source with black; ImageDataGenerator's default repeats
        # the edge pixels ("nearest").
        "fill_mode": "constant",
        "cval": 0.0,
    }


def untranslated_augmentation(augment: AugmentConfig) -> dict[str, str]:
    """Returns the recipe's augmentations that ImageDataGenerator has no argument for.

    Args:
      augment: the recipe's ranges (`TrainConfig.augment`).

    Returns:
      {flag: why} for each range that is not the identity and that the seed side leaves out.
    """
    if not augment.enabled:
        return {}
    left_out = {}
    if tuple(augment.contrast) != (1.0, 1.0):
        left_out["aug_contrast"] = (
            f"contrast {tuple(augment.contrast)} about the image mean: ImageDataGenerator has no "
            "contrast jitter"
        )
    if tuple(augment.gamma) != (1.0, 1.0):
        left_out["aug_gamma"] = (
            f"gamma {tuple(augment.gamma)}: ImageDataGenerator has no gamma jitter"
        )
    if augment.shift >= 1:
        left_out["aug_shift"] = (
            f"shift {augment.shift:g}: ImageDataGenerator reads a range >= 1 as pixels"
        )
    return left_out


def batch_norm_recalibration(
    model: Any, next_inputs: Callable[[], dict[str, np.ndarray]], num_batches: int
) -> Callable[[], None]:
    """Returns a function re-estimating the model's batch-norm moving statistics ("precise BN").

    As `TrainLoop.recalibrate_batch_norm`: `num_batches` training batches run forward in
    training mode, which updates the moving statistics; no gradients, so the weights stay.

    Args:
      model: the Keras model ({"image", "male"} in).
      next_inputs: returns the next batch of model inputs (augmented training images).
      num_batches: batches per recalibration.
    """
    import tensorflow as tf

    forward = tf.function(lambda inputs: model(inputs, training=True), reduce_retracing=True)

    def recalibrate() -> None:
        for _ in range(num_batches):
            forward(next_inputs())

    return recalibrate


def _frame(path: str) -> Any:
    import pandas as pd

    frame = pd.read_csv(path)
    missing = {"path", "boneage", "male"} - set(frame.columns)
    if missing:
        raise ConfigError(f"{path} lacks columns {sorted(missing)}")
    frame["male"] = frame["male"].astype(np.float32)
    frame["boneage"] = frame["boneage"].astype(np.float32)
    return frame


def _flow(frame: Any, generator: Any, size: int, batch: int, shuffle: bool, seed: int) -> Any:
    return generator.flow_from_dataframe(
        frame, x_col="path", y_col=["boneage", "male"], class_mode="raw",
        target_size=(size, size), color_mode="grayscale", batch_size=batch, shuffle=shuffle,
        seed=seed, interpolation=INTERPOLATION, validate_filenames=False,
    )  # fmt: skip


def _inputs(x: np.ndarray, y: np.ndarray) -> tuple[dict[str, np.ndarray], np.ndarray]:
    return {"image": x.astype(np.float32), "male": y[:, 1].astype(np.float32)}, y[:, 0]


@dataclasses.dataclass
class SeedConfig:
    """The seed pipeline's own settings (the training settings are `TrainConfig`'s flags)."""

    train_csv: str = option("", "path,boneage,male of the training images.", required=True)
    val_csv: str = option("", "path,boneage,male of the validation images.", required=True)
    curve: str = option("", "Where to write the curve JSON.", required=True)


def run(config: Any, derived: Any, seed_config: SeedConfig) -> dict[str, Any]:
    """Trains the seed's way within the budget; returns {"curve", "steps", ...}.

    Args:
      config: the run's TrainConfig.
      derived: its Derived (label stats from the data manifest, `train.setup.derive`).
      seed_config: the CSVs of the split.
    """
    import keras
    import tensorflow as tf
    from tf_keras.preprocessing.image import ImageDataGenerator

    from boneage_tpu.modeling import heads, optim
    from boneage_tpu.modeling.model import build_model
    from boneage_tpu.train import loop

    size, batch, eval_every = (
        config.data.image_size,
        config.data.batch_size,
        max(config.schedule.eval_every, 1),
    )
    train_frame, val_frame = _frame(seed_config.train_csv), _frame(seed_config.val_csv)
    keras.utils.set_random_seed(config.seed)
    model = build_model(config, derived, weights=config.model.weights)

    # The val images are decoded once, before the clock starts (the seed kept its val in RAM).
    val_flow = _flow(val_frame, ImageDataGenerator(), size, 256, False, config.seed)
    parts = [val_flow[i] for i in range(len(val_flow))]
    val_x = np.concatenate([p[0] for p in parts])
    val_y = np.concatenate([p[1] for p in parts])
    val_inputs, val_true = _inputs(val_x, val_y)

    # The plateau schedule needs validation-driven cuts the seed's fit does not make: constant.
    schedule = (
        "constant" if config.schedule.lr_schedule == "plateau" else config.schedule.lr_schedule
    )
    end = optim.ScheduleEnd(config.schedule.train_steps)
    optimizer = optim.make_optimizer(
        name=config.optim.optimizer,
        learning_rate=config.optim.learning_rate,
        warmup_steps=config.schedule.warmup_steps,
        total_steps=config.schedule.train_steps,
        schedule=schedule,
        weight_decay=config.optim.weight_decay,
        end=end,
    )
    label_mean, label_std, loss_name = derived.label_mean, derived.label_std, config.optim.loss

    def loss(y_true: Any, y_pred: Any) -> Any:
        z = (tf.reshape(y_pred, [-1]) - tf.reshape(y_true, [-1])) / label_std
        return tf.reduce_mean(optim.per_example_loss(loss_name, z))

    # The run's loss: a bins head also trains its logits (cross-entropy to the binned target),
    # as the trainer does; the model being fitted then outputs (months, logits).
    fitted, losses = heads.with_logits(model), [loss]
    if fitted is not None:

        def bins_loss(y_true: Any, logits: Any) -> Any:
            z = (tf.reshape(y_true, [-1]) - label_mean) / label_std
            return tf.reduce_mean(heads.bins_loss(logits, z))

        losses.append(bins_loss)
    else:
        fitted = model
    fitted.compile(optimizer=optimizer, loss=losses if len(losses) > 1 else loss, jit_compile=False)
    two_outputs = len(losses) > 1
    budget = config.schedule.max_train_minutes * 60.0
    augmentation = seed_augmentation(config.augment)

    # Batch-norm recalibration on both sides or neither: the recipe's flag decides for both.
    bn_batches = config.optim.bn_recalibration_batches
    recalibrate_batch_norm, recalibrates = lambda: None, False
    if bn_batches > 0 and loop.moving_statistics(model):
        # Its own flow and seed stream (as the trainer's BN_SEED_OFFSET), so that fit's batches
        # stay those of a run without recalibration; augmented, as the trainer's.
        bn_flow = _flow(
            train_frame, ImageDataGenerator(**augmentation), size, batch, True,
            config.seed + loop.BN_SEED_OFFSET,
        )  # fmt: skip
        recalibrate_batch_norm = batch_norm_recalibration(
            model, lambda: _inputs(*next(bn_flow))[0], bn_batches
        )
        recalibrates = True

    class Clock(keras.callbacks.Callback):
        """Wall clock (budget, cosine end), curve clock (validation paused), val curve."""

        def __init__(self) -> None:
            super().__init__()
            self.curve: list[list[float]] = []
            self.steps = 0
            self.excluded = 0.0
            self.began = 0.0
            self.evaluated_at = -1
            self.mark: tuple[int, float] | None = None

        def wall_seconds(self) -> float:
            return time.perf_counter() - self.began

        def train_seconds(self) -> float:
            return self.wall_seconds() - self.excluded

        def on_train_begin(self, logs: Any = None) -> None:
            self.began = time.perf_counter()

        def on_train_batch_end(self, batch: int, logs: Any = None) -> None:
            self.steps += 1
            wall = self.wall_seconds()
            if self.mark is None and self.steps >= 20:
                self.mark = (self.steps, wall)  # The rate leaves out tracing, as the trainer's.
            elif self.mark is not None and schedule == "cosine" and self.steps % 10 == 0:
                rate = (self.steps - self.mark[0]) / max(wall - self.mark[1], 1e-9)
                reachable = self.steps + int(rate * max(budget - wall, 0.0))
                end.steps.assign(min(max(reachable, self.steps), config.schedule.train_steps))
            if wall >= budget or self.steps >= config.schedule.train_steps:
                self.model.stop_training = True
            if self.steps % eval_every == 0 or self.model.stop_training:
                self.measure()

        def measure(self) -> None:
            if self.evaluated_at == self.steps:
                return
            minutes_done = self.train_seconds() / 60.0
            paused = time.perf_counter()
            recalibrate_batch_norm()
            predicted = model.predict(val_inputs, batch_size=256, verbose=0)
            mae = float(np.mean(np.abs(np.reshape(predicted, [-1]) - val_true)))
            self.curve.append([minutes_done, mae])
            self.evaluated_at = self.steps
            self.excluded += time.perf_counter() - paused
            print(
                f"seed  step {self.steps}: val mae {mae:.2f} mo at {minutes_done:.2f} min",
                flush=True,
            )

    generator = ImageDataGenerator(**augmentation)
    train_flow = _flow(train_frame, generator, size, batch, True, config.seed)

    def batches() -> Any:
        while True:
            inputs, target = _inputs(*next(train_flow))
            yield inputs, ((target, target) if two_outputs else target)

    clock = Clock()
    # Epochs of eval_every steps only give fit a stopping grain; the clock does the rest.
    with warnings.catch_warnings():
        # fit's default shuffle=True does not apply to a generator; the flow shuffles itself.
        warnings.filterwarnings("ignore", message="`shuffle=True` was passed")
        fitted.fit(
            batches(), steps_per_epoch=eval_every, epochs=10**6, callbacks=[clock], verbose=0
        )
    clock.measure()
    seconds = clock.train_seconds()
    return {
        "curve": clock.curve,
        "steps": clock.steps,
        "train_minutes": seconds / 60.0,
        "wall_minutes": clock.wall_seconds() / 60.0,
        "images_per_second": clock.steps * batch / seconds if seconds > 0 else None,
        "settings": {
            "augmentation": augmentation,
            "augmentation_untranslated": untranslated_augmentation(config.augment),
            "augmentation_differences": list(AUGMENTATION_DIFFERENCES) if augmentation else [],
            "bn_recalibration_batches": bn_batches if recalibrates else 0,
            "interpolation": INTERPOLATION,
            "backbone": config.model.backbone,
            "image_size": size,
            "batch_size": batch,
            "optimizer": config.optim.optimizer,
            "learning_rate": config.optim.learning_rate,
            "warmup_steps": config.schedule.warmup_steps,
            "lr_schedule": schedule,
            "cosine_end_step": int(end.steps.numpy()),
            "loss": loss_name,
            "head": config.model.head,
            "input_norm": config.model.input_norm,
            "n_train": len(train_frame),
            "n_val": len(val_frame),
        },
    }


def _job(train_config: Any, seed_config: SeedConfig) -> None:
    from boneage_tpu.core import model_dir as model_dir_lib
    from boneage_tpu.train import setup

    if train_config.schedule.max_train_minutes <= 0:
        raise UsageError("--max_train_minutes must be > 0 (the budget of the comparison)")
    _, derived = setup.derive(train_config)
    model_dir_lib.save_config(train_config)
    model_dir_lib.save_derived(train_config.model_dir, derived)
    result = run(train_config, derived, seed_config)
    with open(seed_config.curve, "w", encoding="utf-8") as f:
        json.dump(result, f, indent=2)
    print(f"seed pipeline: {result['steps']} steps, {result['images_per_second']:.1f} img/s")


def main(argv: Sequence[str]) -> int:
    """Runs the seed pipeline on `argv` (argv[0] is the program); returns the exit status."""
    from absl import flags

    from boneage_tpu.core.config import TrainConfig

    fv = flags.FlagValues()
    cli.define_flags(TrainConfig, fv)
    cli.define_flags(SeedConfig, fv)
    _, status = cli.parse_flags("benchmark_real_seed", fv, argv, __doc__)
    if status is not None:
        return status
    try:
        train_config = cli.config_from_flags(TrainConfig, fv)
        seed_config = cli.config_from_flags(SeedConfig, fv)
    except UsageError as e:
        print(f"benchmark_real_seed: error: {e}", file=sys.stderr)
        return 2
    try:
        _job(train_config, seed_config)
    except UsageError as e:
        print(f"benchmark_real_seed: error: {e}", file=sys.stderr)
        return 2
    except (Error, OSError) as e:
        print(f"benchmark_real_seed: error: {str(e).splitlines()[0]}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
