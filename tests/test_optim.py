"""Tests of boneage_tpu.modeling.optim: warmup + cosine/constant/plateau schedules and the losses."""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf

from boneage_tpu import UsageError
from boneage_tpu.modeling import optim


def test_warmup_then_cosine_to_zero() -> None:
    schedule = optim.WarmupSchedule(1e-3, warmup_steps=10, total_steps=110, decay="cosine")
    lr = [float(schedule(tf.constant(s))) for s in (0, 4, 9, 10, 60, 110, 500)]
    assert lr[0] == pytest.approx(1e-4)
    assert lr[1] == pytest.approx(5e-4)
    assert lr[2] == pytest.approx(1e-3)
    assert lr[3] == pytest.approx(1e-3)
    assert lr[4] == pytest.approx(0.5e-3, rel=1e-5)
    assert lr[5] == pytest.approx(0.0, abs=1e-12)
    assert lr[6] == pytest.approx(0.0, abs=1e-12)


def test_constant_schedule_and_plateau_scale() -> None:
    plateau = optim.PlateauState(patience=2, factor=0.5)
    schedule = optim.WarmupSchedule(2e-3, 0, 100, decay="constant", scale=plateau.scale)
    assert float(schedule(tf.constant(50))) == pytest.approx(2e-3)
    assert plateau.update(10.0) is False  # first value is a new best
    assert plateau.update(10.5) is False  # 1 bad evaluation
    assert plateau.update(11.0) is True  # 2 bad evaluations: cut
    assert float(schedule(tf.constant(50))) == pytest.approx(1e-3)
    assert plateau.update(9.0) is False  # new best resets the count
    assert float(plateau.best.numpy()) == 9.0 and int(plateau.bad_evals.numpy()) == 0


def test_make_optimizer_kinds_and_errors() -> None:
    adam = optim.make_optimizer(
        name="adam", learning_rate=1e-3, warmup_steps=0, total_steps=10, schedule="cosine"
    )
    assert isinstance(adam, keras.optimizers.Adam)
    adamw = optim.make_optimizer(
        name="adamw",
        learning_rate=1e-3,
        warmup_steps=0,
        total_steps=10,
        schedule="constant",
        weight_decay=1e-4,
    )
    assert isinstance(adamw, keras.optimizers.AdamW) and adamw.weight_decay == pytest.approx(1e-4)
    scaled = optim.make_optimizer(
        name="adam",
        learning_rate=1e-3,
        warmup_steps=0,
        total_steps=10,
        schedule="cosine",
        loss_scale=True,
    )
    assert isinstance(scaled, keras.optimizers.LossScaleOptimizer)
    with pytest.raises(UsageError, match="--weight_decay needs --optimizer adamw"):
        optim.make_optimizer(
            name="adam",
            learning_rate=1e-3,
            warmup_steps=0,
            total_steps=10,
            schedule="cosine",
            weight_decay=1e-4,
        )
    with pytest.raises(ValueError, match="needs a PlateauState"):
        optim.make_optimizer(
            name="adam", learning_rate=1e-3, warmup_steps=0, total_steps=10, schedule="plateau"
        )


def test_losses_on_z_errors() -> None:
    z = tf.constant([-3.0, -0.5, 0.0, 0.5, 3.0])
    np.testing.assert_allclose(optim.per_example_loss("l1", z), [3, 0.5, 0, 0.5, 3])
    np.testing.assert_allclose(optim.per_example_loss("mse", z), [9, 0.25, 0, 0.25, 9])
    np.testing.assert_allclose(optim.per_example_loss("huber", z), [2.5, 0.125, 0, 0.125, 2.5])
    with pytest.raises(ValueError, match="--loss must be one of"):
        optim.per_example_loss("l3", z)
