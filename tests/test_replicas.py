"""Multi-replica correctness on virtual CPUs: fp16 overflow on one replica, batch-norm statistics
and dropout across replicas."""

from __future__ import annotations

import functools

import keras
import numpy as np
import pytest
import tensorflow as tf

from boneage_tpu import UsageError
from boneage_tpu.core import config as config_lib
from boneage_tpu.core import distribute
from boneage_tpu.data import augment
from boneage_tpu.modeling import model as model_lib
from boneage_tpu.modeling import optim
from boneage_tpu.train import job, loop, setup
from tests import helpers

SIZE = 16


@functools.cache
def _two_replicas() -> tf.distribute.Strategy:
    # One strategy for the whole module: a second MirroredStrategy over the same devices starts
    # its collective keys afresh, and its first all-reduce then meets the first one's in the
    # collective executor (a shape mismatch). A real run has one strategy per process. The
    # virtual CPUs are there already: tests/conftest.py splits the CPU into 8 at start-up.
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
            *helpers.config_and_derived(
                backbone="tiny",
                image_size=SIZE,
                dense_units=(8,),
                dropout=dropout,
                norm=norm,
                label_mean=100.0,
                label_std=50.0,
            ),
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
    trainer = loop.TrainLoop(strategy, model, optimizer, global_batch=4, label_std=50.0, loss=loss)
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


@pytest.mark.slow
def test_loop_statistics_sum_every_replica_and_name_the_first_non_finite_step():
    """The replicas' sync-on-read sums are read once per loop: totals cover both replicas'
    rows, and a NaN label on replica 1 at step 2 is reported as step 2 (replica 0 only meets
    the NaN weights one step later)."""
    strategy = _two_replicas()
    trainer, _, optimizer = _trainer(strategy)
    batches = [_batch(0, 120.0), _batch(1, 60.0), _batch(2, 120.0), _batch(3, float("nan"))]
    batches += [_batch(4, 90.0), _batch(5, 90.0)]
    iterator = _iterator(strategy, batches)
    first = trainer.train(iterator, 1)
    # Step 1: predictions p on 2 + 2 rows; |p - 120| and |p - 60| both count.
    assert first.count == 4.0 and first.bad_step == -1 and np.isfinite(first.abs_error_sum)
    second = trainer.train(iterator, 2)
    assert second.count == 8.0  # reset per loop: steps 2 and 3 only
    assert second.bad_step == 2
    assert [int(i) for i in _local(strategy, optimizer.iterations)] == [3, 3]


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
    settings = setup.resolve_settings(config_lib.TrainConfig.from_flags(), platform)
    assert settings["precision"] == expected


def test_fp16_on_tpu_is_refused_in_one_line():
    with pytest.raises(UsageError, match=r"^--precision fp16 is not supported on TPU"):
        setup.resolve_settings(config_lib.TrainConfig.from_flags(precision="fp16"), "tpu")
    assert setup.resolve_settings(config_lib.TrainConfig.from_flags(precision="fp16"), "gpu")[
        "precision"
    ] == ("fp16")


def test_tpu_uses_the_matmul_warp_and_others_the_gather_warp():
    config = config_lib.TrainConfig.from_flags()
    assert setup.resolve_settings(config, "tpu")["warp"] == "matmul"
    assert setup.resolve_settings(config, "gpu")["warp"] == "gather"
    assert setup.resolve_settings(config, "cpu")["warp"] == "gather"


@pytest.mark.slow
def test_replica_step_with_the_matmul_warp_compiles_with_xla():
    strategy = tf.distribute.get_strategy()
    with strategy.scope():
        model = model_lib.build_model(
            *helpers.config_and_derived(
                backbone="tiny", image_size=SIZE, dense_units=(8,), label_mean=100.0, label_std=50.0
            )
        )
        optimizer = optim.make_optimizer(
            name="adam", learning_rate=1e-3, warmup_steps=0, total_steps=4, schedule="cosine"
        )
        optimizer.build(model.trainable_variables)
    trainer = loop.TrainLoop(
        strategy,
        model,
        optimizer,
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


def _varied_input(batches: list[dict[str, np.ndarray]]):
    def fn(context: tf.distribute.InputContext) -> tf.data.Dataset:
        stacked = {k: np.stack([b[k] for b in batches]) for k in batches[0]}
        return tf.data.Dataset.from_tensor_slices(stacked).repeat()

    return fn


@pytest.mark.slow
def test_checkpointed_and_exported_batch_norm_statistics_are_the_replica_mean(
    tmp_path, monkeypatch
):
    strategy = _two_replicas()
    recorded: list[dict[str, list[np.ndarray]]] = []
    original = loop.TrainLoop.sync_batch_norm

    def recording_sync(self) -> None:
        strategy = self.strategy
        recorded.append({v.path: _local(strategy, v) for v in self.moving_statistics})
        original(self)
        for variable in self.moving_statistics:
            copies = _local(strategy, variable)
            np.testing.assert_allclose(copies[1], copies[0], rtol=0, atol=0)

    monkeypatch.setattr(loop.TrainLoop, "sync_batch_norm", recording_sync)
    config, derived = helpers.config_and_derived(
        model_dir=str(tmp_path / "run"),
        backbone="tiny",
        image_size=SIZE,
        dense_units=(8,),
        dropout=0.3,
        norm="batch",
        batch_size=4,
        train_steps=2,
        steps_per_loop=1,
        checkpoint_every=2,
        label_mean=100.0,
        label_std=50.0,
        virtual_cpus=2,
        augment=False,
    )
    # Two differently bright batches: the replicas' batch statistics differ.
    batches = [_batch(0, 120.0), _batch(1, 60.0)]
    batches[1]["image"] = (batches[1]["image"] // 4).astype(np.uint8)
    job.run(config, strategy, datasets={"train": _varied_input(batches)}, derived=derived)
    name = "norm0/moving_mean"
    diverged = [r[name] for r in recorded if np.abs(r[name][0] - r[name][1]).max() > 1e-3]
    # The sync before the step-2 checkpoint found the replicas diverged; the later ones (final
    # checkpoint and export, no training in between) found them equal.
    assert len(diverged) == 1 and len(recorded) >= 2
    replica_0, replica_1 = diverged[0]
    expected = (replica_0 + replica_1) / 2

    exported = keras.models.load_model(tmp_path / "run" / "export" / "model.keras")
    bn = exported.get_layer("tiny").get_layer("norm0")
    np.testing.assert_allclose(np.asarray(bn.moving_mean), expected, rtol=1e-6)
    reader = tf.train.load_checkpoint(str(tmp_path / "run" / "checkpoints" / "ckpt-2"))
    saved = [
        reader.get_tensor(key)
        for key, shape in tf.train.list_variables(str(tmp_path / "run" / "checkpoints" / "ckpt-2"))
        if key.startswith("model/") and shape == list(expected.shape)
    ]
    assert any(np.allclose(value, expected, rtol=1e-6) for value in saved)
    assert not any(np.allclose(value, replica_0, rtol=1e-6) for value in saved)


def test_dropout_masks_differ_between_replicas():
    strategy = _two_replicas()
    with strategy.scope():
        layer = model_lib.ReplicaDropout(0.5, seed=3)
        layer.build((4, 64))

    @tf.function
    def masks():
        return strategy.run(lambda: layer(tf.ones([4, 64]), training=True))

    first, second = (np.asarray(v) for v in strategy.experimental_local_results(masks()))
    assert set(np.unique(first)) == {0.0, 2.0} and set(np.unique(second)) == {0.0, 2.0}
    assert not np.array_equal(first == 0, second == 0)
    again = [np.asarray(v) for v in strategy.experimental_local_results(masks())]
    assert not np.array_equal(again[0] == 0, first == 0)  # the seed state advances per call
