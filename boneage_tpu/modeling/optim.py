"""Optimizer, learning-rate schedule (linear warmup, then cosine, constant or plateau) and losses."""

from __future__ import annotations

import math

import keras
import tensorflow as tf

from boneage_tpu.core.config import LOSSES, OPTIMIZERS, SCHEDULES
from boneage_tpu.core.errors import ConfigError, UsageError


class PlateauState(tf.Module):
    """Learning-rate multiplier cut by `factor` after `patience` evaluations without a new best.

    Its variables go into the checkpoint, so a resumed run keeps its reduced learning rate.
    """

    def __init__(self, patience: int, factor: float) -> None:
        super().__init__(name="plateau")
        if patience < 1 or not 0 < factor < 1:
            raise ConfigError(
                f"plateau needs patience >= 1 and 0 < factor < 1, got {patience}, {factor}"
            )
        self.patience = patience
        self.factor = factor
        self.scale = tf.Variable(1.0, trainable=False, name="lr_scale")
        self.best = tf.Variable(math.inf, trainable=False, name="best_val_mae")
        self.bad_evals = tf.Variable(0, dtype=tf.int64, trainable=False, name="bad_evals")

    def update(self, val_mae: float) -> bool:
        """Records one validation MAE; returns True when the learning rate was just cut."""
        if val_mae < float(self.best.numpy()):
            self.best.assign(val_mae)
            self.bad_evals.assign(0)
            return False
        self.bad_evals.assign_add(1)
        if int(self.bad_evals.numpy()) < self.patience:
            return False
        self.scale.assign(self.scale * self.factor)
        self.bad_evals.assign(0)
        return True


class ScheduleEnd(tf.Module):
    """The step where the cosine reaches 0; a time-budgeted run moves it to fit its budget.

    With `--max_train_minutes`, the loop re-estimates after each call how many steps the
    remaining time allows and sets `steps` (never beyond train_steps), so the learning rate
    anneals fully whatever the machine's speed. In the checkpoint, so a resume continues the
    same curve.
    """

    def __init__(self, total_steps: int) -> None:
        super().__init__(name="schedule_end")
        self.steps = tf.Variable(int(total_steps), dtype=tf.int64, trainable=False, name="steps")


class WarmupSchedule(keras.optimizers.schedules.LearningRateSchedule):
    """Linear warmup to `base_lr`, then cosine decay to 0 at `total_steps` or a constant rate.

    An optional `scale` variable (the plateau multiplier) multiplies the result.
    """

    def __init__(
        self,
        base_lr: float,
        warmup_steps: int,
        total_steps: int,
        decay: str = "cosine",
        scale: tf.Variable | None = None,
        end: ScheduleEnd | None = None,
    ) -> None:
        self.base_lr = float(base_lr)
        self.warmup_steps = int(warmup_steps)
        self.total_steps = max(int(total_steps), 1)
        self.decay = decay
        self.scale = scale
        self.end = end

    def __call__(self, step: tf.Tensor) -> tf.Tensor:
        step = tf.cast(step, tf.float32)
        lr = tf.constant(self.base_lr, tf.float32)
        if self.warmup_steps > 0:
            lr *= tf.minimum(1.0, (step + 1.0) / self.warmup_steps)
        if self.decay == "cosine":
            total = (
                tf.cast(self.end.steps, tf.float32)
                if self.end is not None
                else float(self.total_steps)
            )
            span = tf.maximum(total - self.warmup_steps, 1.0)
            progress = tf.clip_by_value((step - self.warmup_steps) / span, 0.0, 1.0)
            lr *= 0.5 * (1.0 + tf.cos(math.pi * progress))
        if self.scale is not None:
            lr *= tf.cast(self.scale, tf.float32)
        return lr

    def get_config(self) -> dict:
        return {
            "base_lr": self.base_lr,
            "warmup_steps": self.warmup_steps,
            "total_steps": self.total_steps,
            "decay": self.decay,
        }


def make_optimizer(
    *,
    name: str,
    learning_rate: float,
    warmup_steps: int,
    total_steps: int,
    schedule: str,
    weight_decay: float = 0.0,
    plateau: PlateauState | None = None,
    loss_scale: bool = False,
    end: ScheduleEnd | None = None,
) -> keras.optimizers.Optimizer:
    """Returns the optimizer; create it inside `strategy.scope()` and build it before tracing.

    Args:
      name: "adam" or "adamw".
      learning_rate: peak learning rate.
      warmup_steps: linear warmup length.
      total_steps: the run's train_steps (end of the cosine).
      schedule: "cosine", "constant" or "plateau" (constant, times `plateau.scale`).
      weight_decay: AdamW's decoupled weight decay.
      plateau: the plateau state (required for schedule="plateau").
      loss_scale: wrap in a dynamic LossScaleOptimizer (fp16).
      end: a movable end of the cosine (time-budgeted runs); None: `total_steps`.
    """
    if name not in OPTIMIZERS:
        raise ConfigError(f"--optimizer must be one of {OPTIMIZERS}, got {name!r}")
    if schedule not in SCHEDULES:
        raise ConfigError(f"--lr_schedule must be one of {SCHEDULES}, got {schedule!r}")
    if schedule == "plateau" and plateau is None:
        raise ConfigError("the plateau schedule needs a PlateauState")
    lr = WarmupSchedule(
        learning_rate,
        warmup_steps,
        total_steps,
        decay="cosine" if schedule == "cosine" else "constant",
        scale=plateau.scale if schedule == "plateau" else None,
        end=end,
    )
    if name == "adamw":
        optimizer = keras.optimizers.AdamW(learning_rate=lr, weight_decay=weight_decay)
    else:
        if weight_decay:
            raise UsageError("--weight_decay needs --optimizer adamw (Adam's L2 is not decoupled)")
        optimizer = keras.optimizers.Adam(learning_rate=lr)
    if loss_scale:
        optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
    return optimizer


def per_example_loss(name: str, z_error: tf.Tensor) -> tf.Tensor:
    """Returns the per-example loss of the z-scored error (prediction - target) / std."""
    if name == "l1":
        return tf.abs(z_error)
    if name == "mse":
        return tf.square(z_error)
    if name == "huber":
        # delta = 1 std: quadratic near the target, L1-like for outliers.
        abs_error = tf.abs(z_error)
        quadratic = tf.minimum(abs_error, 1.0)
        return 0.5 * tf.square(quadratic) + (abs_error - quadratic)
    raise ConfigError(f"--loss must be one of {LOSSES}, got {name!r}")
