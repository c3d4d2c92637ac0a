"""Tests of boneage_tpu.core.distribute and the replica reductions of boneage_tpu.loop."""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf

from boneage_tpu.core import distribute
from boneage_tpu.data import pipeline as data
from boneage_tpu.modeling import model as model_lib
from boneage_tpu.modeling import optim
from boneage_tpu.train import loop
from tests import helpers


def _mirrored(replicas: int) -> tf.distribute.Strategy:
    # tests/conftest.py splits the CPU into 8 logical devices before TensorFlow's first op.
    return distribute.make_strategy(virtual_cpus=replicas)


def test_virtual_cpus_give_a_mirrored_strategy_with_that_many_replicas() -> None:
    strategy = _mirrored(4)
    assert isinstance(strategy, tf.distribute.MirroredStrategy)
    assert strategy.num_replicas_in_sync == 4
    assert distribute.platform(strategy) == "cpu"
    assert distribute.describe(strategy) == "MirroredStrategy: 4 replicas on cpu"


def test_default_strategy_without_flags(monkeypatch) -> None:
    monkeypatch.delenv("TF_CONFIG", raising=False)
    strategy = distribute.make_strategy()
    assert strategy.num_replicas_in_sync == 1
    assert distribute.platform(strategy) == "cpu"
    assert distribute.make_strategy(virtual_cpus=1).num_replicas_in_sync == 1


def test_tpu_kind_and_colab_address(monkeypatch) -> None:
    monkeypatch.delenv("COLAB_TPU_ADDR", raising=False)
    assert distribute.tpu_kind("") == ""
    assert distribute.tpu_kind("local") == "vm"
    assert distribute.tpu_kind("colab") == "vm"
    assert distribute.tpu_address("colab") == "local"
    assert distribute.tpu_kind("my-tpu") == "remote"
    assert distribute.tpu_kind("grpc://10.0.0.2:8470") == "remote"
    monkeypatch.setenv("COLAB_TPU_ADDR", "10.1.2.3:8470")
    assert distribute.tpu_kind("colab") == "remote"
    assert distribute.tpu_address("colab") == "grpc://10.1.2.3:8470"


def test_remote_tpu_with_a_local_path_is_a_clear_error() -> None:
    with pytest.raises(distribute.DistributeError) as info:
        distribute.check_paths(
            "grpc://10.0.0.2:8470", {"--data": "gs://b/data", "--model_dir": "/tmp/run"}
        )
    message = str(info.value)
    assert "--model_dir /tmp/run is a local path" in message
    assert "read only gs://" in message
    assert distribute.check_paths("my-tpu", {"--data": "gs://b/d", "--model_dir": "gs://b/m"}) == []


def test_tpu_vm_warns_about_a_local_model_dir_only() -> None:
    warnings = distribute.check_paths("local", {"--data": "/data", "--model_dir": "/tmp/run"})
    assert len(warnings) == 1 and "vanish with the TPU VM" in warnings[0]
    assert distribute.check_paths("local", {"--data": "/data", "--model_dir": "gs://b/m"}) == []
    assert distribute.check_paths("", {"--data": "/data", "--model_dir": "/tmp/run"}) == []


@pytest.mark.skipif(distribute.has_tpu_build(), reason="this Python has the TPU build")
@pytest.mark.parametrize("tpu", ["local", "colab"])
def test_missing_tpu_build_is_one_line(monkeypatch, tpu: str) -> None:
    monkeypatch.delenv("COLAB_TPU_ADDR", raising=False)
    with pytest.raises(distribute.DistributeError) as info:
        distribute.make_strategy(tpu=tpu)
    message = str(info.value)
    assert "\n" not in message
    assert "needs TensorFlow's TPU build" in message
    assert "tensorflow-tpu" in message


def test_conflicting_flags_and_bad_tf_config(monkeypatch) -> None:
    with pytest.raises(distribute.DistributeError, match="exclude each other"):
        distribute.make_strategy(tpu="local", virtual_cpus=8)
    monkeypatch.setenv("TF_CONFIG", "{not json")
    with pytest.raises(distribute.DistributeError, match="TF_CONFIG is not valid JSON"):
        distribute.make_strategy()


def test_then_empty_batches_follows_the_data_with_endless_masked_batches() -> None:
    batches = tf.data.Dataset.from_tensor_slices(
        {"mask": np.ones((5, 2), np.float32), "image": np.ones((5, 2, 3, 3, 1), np.uint8)}
    )
    padded = list(data.then_empty_batches(batches, 2).take(8).as_numpy_iterator())
    assert [float(b["mask"].sum()) for b in padded] == [2.0] * 5 + [0.0] * 3
    assert all(b["image"].shape == (2, 3, 3, 1) for b in padded)
    assert all(not b["image"].any() for b in padded[5:])


def _toy_batch(n: int, size: int = 16) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(1)
    return {
        "image": rng.integers(0, 256, (n, size, size, 1)).astype(np.uint8),
        "male": (np.arange(n) % 2).astype(np.float32),
        "boneage": rng.uniform(10, 220, n).astype(np.float32),
        "mask": np.ones(n, np.float32),
    }


def _trainer(strategy: tf.distribute.Strategy, global_batch: int) -> loop.TrainLoop:
    keras.utils.set_random_seed(3)
    with strategy.scope():
        model = model_lib.build_model(
            *helpers.config_and_derived(
                backbone="tiny",
                image_size=16,
                norm="none",
                dropout=0.0,
                dense_units=(8,),
                label_mean=100.0,
                label_std=50.0,
            )
        )
        optimizer = optim.make_optimizer(
            name="adam", learning_rate=1e-3, warmup_steps=0, total_steps=10, schedule="constant"
        )
        optimizer.build(model.trainable_variables)
    return loop.TrainLoop(strategy, model, optimizer, global_batch=global_batch, label_std=50.0)


@pytest.mark.slow
def test_replica_gradients_sum_to_the_single_device_gradient() -> None:
    """The loss is divided by the GLOBAL batch, so summed replica gradients = one-device ones."""
    batch = _toy_batch(8)
    single = _trainer(tf.distribute.get_strategy(), 8)
    seed = tf.constant([0, 0], tf.int64)
    grads_1, stats_1 = single.gradients({k: tf.constant(v) for k, v in batch.items()}, seed)

    strategy = _mirrored(4)
    multi = _trainer(strategy, 8)

    def per_replica(context: tf.distribute.ValueContext) -> dict[str, tf.Tensor]:
        start = 2 * context.replica_id_in_sync_group
        return {k: tf.constant(v[start : start + 2]) for k, v in batch.items()}

    values = strategy.experimental_distribute_values_from_function(per_replica)
    grads_4, stats_4 = strategy.run(multi.gradients, args=(values, seed))
    summed = [strategy.reduce("SUM", g, axis=None) for g in grads_4]
    for a, b in zip(grads_1, summed, strict=True):
        np.testing.assert_allclose(a.numpy(), b.numpy(), atol=1e-5, rtol=1e-4)
    # (loss sum, |error| sum, count): per-replica sums add up to the whole batch's.
    np.testing.assert_allclose(
        stats_1.numpy(), strategy.reduce("SUM", stats_4, axis=None).numpy(), rtol=1e-5
    )
    assert strategy.reduce("SUM", stats_4, axis=None).numpy()[2] == 8.0


def test_tpu_build_needs_tensorflow_tpu_not_only_jaxs_libtpu(monkeypatch, tmp_path) -> None:
    import importlib.metadata
    import importlib.util

    installed: dict[str, str] = {}
    have_libtpu = {"value": True}

    def version(name: str) -> str:
        if name not in installed:
            raise importlib.metadata.PackageNotFoundError(name)
        return installed[name]

    real_find_spec = importlib.util.find_spec

    def find_spec(name: str, *args):
        if name == "libtpu":
            return object() if have_libtpu["value"] else None
        return real_find_spec(name, *args)

    monkeypatch.setattr(importlib.metadata, "version", version)
    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    monkeypatch.delenv("TPU_LIBRARY_PATH", raising=False)
    assert not distribute.has_tpu_build()  # jax[tpu]'s libtpu beside a CPU TensorFlow
    library = tmp_path / "libtpu.so"
    library.write_bytes(b"")
    monkeypatch.setenv("TPU_LIBRARY_PATH", str(library))
    assert not distribute.has_tpu_build()
    installed["tensorflow-tpu"] = "2.20.0"
    assert distribute.has_tpu_build()
    monkeypatch.setenv("TPU_LIBRARY_PATH", str(tmp_path / "missing.so"))
    assert not distribute.has_tpu_build()
    monkeypatch.delenv("TPU_LIBRARY_PATH")
    assert distribute.has_tpu_build()
    have_libtpu["value"] = False
    assert not distribute.has_tpu_build()
