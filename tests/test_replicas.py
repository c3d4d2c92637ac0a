"""Multi-replica correctness on virtual CPUs: fp16 overflow on one replica, batch-norm statistics
and dropout across replicas."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

from boneage_tpu import augment, distribute, optim
from boneage_tpu import config as config_lib
from boneage_tpu import model as model_lib
from boneage_tpu.train import loop, setup

# Logical CPUs must be split before TensorFlow runs its first op, i.e. at collection time.
try:
    distribute.configure_virtual_cpus(8)
    VIRTUAL_CPU_ERROR = ""
except distribute.DistributeError as err:
    VIRTUAL_CPU_ERROR = str(err)

SIZE = 16


def _two_replicas() -> tf.distribute.Strategy:
    if VIRTUAL_CPU_ERROR:
        pytest.fail(f"virtual CPUs unavailable: {VIRTUAL_CPU_ERROR}")
    return distribute.make_strategy(virtual_cpus=2)


def _batch(seed: int, boneage: float, size: int = 2) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "image": rng.integers(0, 256, (size, SIZE, SIZE, 1)).astype(np.uint8),
        "male": np.array([0.0, 1.0] * (size // 2), np.float32),
        "boneage": np.full([size], boneage, np.float32),
        "mask": np.ones([size], np.float32),
    }


def _iterator(strategy: tf.distribute.Strategy, batches: list[dict[str, np.ndarray]]):
    """A distributed iterator whose i-th per-replica batch is `batches[i]` (one pipeline: the
    replicas of a step take consecutive elements)."""

    def fn(context: tf.distribute.InputContext) -> tf.data.Dataset:
        stacked = {k: np.stack([b[k] for b in batches]) for k in batches[0]}
        return tf.data.Dataset.from_tensor_slices(stacked)

    return iter(strategy.distribute_datasets_from_function(fn))


def _local(strategy: tf.distribute.Strategy, variable) -> list[np.ndarray]:
    value = getattr(variable, "value", variable)
    return [np.asarray(v) for v in strategy.experimental_local_results(value)]


def _trainer(strategy, *, precision="fp32", norm="none", dropout=0.0, loss="l1"):
    with strategy.scope():
        model = model_lib.build_model(
            backbone="tiny",
            image_size=SIZE,
            dense_units=(8,),
            dropout=dropout,
            norm=norm,
            label_mean=100.0,
            label_std=50.0,
            precision=precision,
        )
        optimizer = optim.make_optimizer(
            name="adam",
            learning_rate=1e-3,
            warmup_steps=0,
            total_steps=10,
            schedule="constant",
            loss_scale=precision == "fp16",
        )
        optimizer.build(model.trainable_variables)
        step = tf.Variable(0, dtype=tf.int64, aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA)
    trainer = loop.TrainLoop(
        strategy, model, optimizer, step, global_batch=4, label_std=50.0, loss=loss
    )
    return trainer, model, optimizer


@pytest.mark.slow
def test_fp16_overflow_on_one_replica_skips_the_step_on_both():
    strategy = _two_replicas()
    trainer, model, optimizer = _trainer(strategy, precision="fp16", loss="mse")
    before = [_local(strategy, v) for v in model.trainable_variables]
    scale = float(_local(strategy, optimizer.dynamic_scale)[0])
    # Step 1: one replica's labels are 1e6 months: its mse gradient (~1e7 after loss scaling)
    # overflows fp16 in the backward pass; the other replica's gradient is finite.
    # Step 2: both replicas see normal labels, so the step is applied.
    batches = [_batch(0, 120.0), _batch(1, 1e6), _batch(2, 120.0), _batch(3, 60.0)]
    iterator = _iterator(strategy, batches)

    metrics = trainer.train(iterator, 1)
    assert np.isfinite(metrics.loss)  # the fp32 loss is finite: only the gradient overflowed
    after = [_local(strategy, v) for v in model.trainable_variables]
    for old, new in zip(before, after, strict=True):
        for replica_old, replica_new in zip(old, new, strict=True):
            assert np.all(np.isfinite(replica_new))
            np.testing.assert_array_equal(replica_new, replica_old)  # skipped on both replicas
    assert [float(s) for s in _local(strategy, optimizer.dynamic_scale)] == [scale / 2] * 2
    assert [int(i) for i in _local(strategy, optimizer.iterations)] == [0, 0]

    trainer.train(iterator, 1)
    assert [int(i) for i in _local(strategy, optimizer.iterations)] == [1, 1]
    changed = False
    for old, variable in zip(before, model.trainable_variables, strict=True):
        replica_0, replica_1 = _local(strategy, variable)
        assert np.all(np.isfinite(replica_0))
        np.testing.assert_array_equal(replica_0, replica_1)
        changed |= not np.array_equal(replica_0, old[0])
    assert changed
    assert [float(s) for s in _local(strategy, optimizer.dynamic_scale)] == [scale / 2] * 2


@pytest.mark.parametrize(
    ("platform", "capability", "expected"),
    [
        ("gpu", (8, 0), "bf16"),
        ("gpu", (9, 0), "bf16"),
        ("gpu", (7, 5), "fp16"),
        ("tpu", None, "bf16"),
    ],
)
def test_auto_precision_picks_bf16_on_ampere_and_newer(monkeypatch, platform, capability, expected):
    monkeypatch.setattr(distribute, "gpu_compute_capability", lambda: capability)
    settings = setup.resolve_settings(config_lib.TrainConfig(), platform)
    assert settings["precision"] == expected


def test_fp16_on_tpu_is_refused_in_one_line():
    with pytest.raises(ValueError, match=r"^--precision fp16 is not supported on TPU"):
        setup.resolve_settings(config_lib.TrainConfig(precision="fp16"), "tpu")
    assert setup.resolve_settings(config_lib.TrainConfig(precision="fp16"), "gpu")["precision"] == (
        "fp16"
    )


def test_tpu_uses_the_matmul_warp_and_others_the_gather_warp():
    config = config_lib.TrainConfig()
    assert setup.resolve_settings(config, "tpu")["warp"] == "matmul"
    assert setup.resolve_settings(config, "gpu")["warp"] == "gather"
    assert setup.resolve_settings(config, "cpu")["warp"] == "gather"


@pytest.mark.slow
def test_replica_step_with_the_matmul_warp_compiles_with_xla():
    strategy = tf.distribute.get_strategy()
    with strategy.scope():
        model = model_lib.build_model(
            backbone="tiny", image_size=SIZE, dense_units=(8,), label_mean=100.0, label_std=50.0
        )
        optimizer = optim.make_optimizer(
            name="adam", learning_rate=1e-3, warmup_steps=0, total_steps=4, schedule="cosine"
        )
        optimizer.build(model.trainable_variables)
    trainer = loop.TrainLoop(
        strategy,
        model,
        optimizer,
        tf.Variable(0, dtype=tf.int64),
        global_batch=2,
        label_std=50.0,
        augment_config=augment.AugmentConfig(),
        jit_compile=True,
        warp="matmul",
    )
    batch = {k: tf.constant(v) for k, v in _batch(0, 120.0).items()}
    grads, stats = trainer.gradients(batch, tf.constant([1, 2], tf.int64))
    assert all(np.all(np.isfinite(g.numpy())) for g in grads)
    assert stats.numpy()[2] == 2.0
