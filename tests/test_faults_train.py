"""Faults in training: a locked model directory, non-finite weights, corrupt shards, bad resumes."""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import time

import pytest

import boneage_tpu
from boneage_tpu.cli import train as train_cmd
from boneage_tpu.core import model_dir as model_dir_lib
from boneage_tpu.core import schema
from boneage_tpu.train import job as train
from boneage_tpu.train import lease as train_lease
from boneage_tpu.train import state as train_state
from tests.helpers import train_config
from tests.records import write_toy_dataset


def _lock(model_dir, *, host: str = "other-host", pid: int = 4242, age: float = 0.0) -> None:
    model_dir.mkdir(parents=True, exist_ok=True)
    holder = {"owner": "someone", "host": host, "pid": pid, "heartbeat": time.time() - age}
    (model_dir / train_lease.LOCK_NAME).write_text(json.dumps(holder))


def test_second_trainer_on_a_locked_model_dir_refuses_with_one_line(toy_data, tmp_path, capsys):
    model_dir = tmp_path / "run"
    _lock(model_dir)
    argv = ["train", f"--data={toy_data}", f"--model_dir={model_dir}", "--backbone=tiny"]
    assert train_cmd.main([*argv, "--image_size=32", "--train_steps=1", "--val_split="]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"train: error: {model_dir} is in use by"), err
    with pytest.raises(train_lease.LockedError) as info:
        train.run(train_config(toy_data, model_dir, train_steps=1, val_split=""))
    message = str(info.value)
    assert message.startswith(
        f"{model_dir} is in use by another trainer (host other-host, pid 4242"
    )
    assert str(model_dir / "LOCK") in message and "\n" not in message
    assert not (model_dir / "checkpoints").exists() and not (model_dir / "config.json").exists()
    assert json.loads((model_dir / "LOCK").read_text())["owner"] == "someone"  # Untouched.


@pytest.mark.slow
@pytest.mark.parametrize(
    "holder, reason",
    [
        ({"age": train_lease.STALE_SECONDS + 5}, "sent no heartbeat for"),
        ({"host": socket.gethostname(), "pid": 2**22 + 12345}, "no longer exists"),
    ],
)
def test_stale_lock_is_taken_over_with_a_message(toy_data, tmp_path, capsys, holder, reason):
    model_dir = tmp_path / "run"
    _lock(model_dir, **holder)
    result = train.run(train_config(toy_data, model_dir, train_steps=1, val_split=""))
    assert result["step"] == 1
    out = capsys.readouterr().out
    assert f"warning: taking over the lock of {model_dir}" in out and reason in out
    assert not (model_dir / "LOCK").exists()  # Released at the end.


def test_lease_heartbeat_and_release_only_touch_our_own_lease(tmp_path):
    clock = [1000.0]
    lease = train_lease.Lease(str(tmp_path), heartbeat_seconds=3600, clock=lambda: clock[0])
    lease.acquire()
    clock[0] += 50
    assert lease.heartbeat()
    assert json.loads((tmp_path / "LOCK").read_text())["heartbeat"] == 1050.0
    other = train_lease.Lease(str(tmp_path), clock=lambda: clock[0])
    with pytest.raises(train_lease.LockedError, match="heartbeat 0 s ago"):
        other.acquire()
    _lock(tmp_path, host="h2")  # Someone else's lease now (e.g. after a takeover).
    assert not lease.heartbeat()
    with pytest.raises(train_lease.LockedError, match=r"lost the lock of .* \(now held by host h2"):
        lease.check_held()  # The trainer stops before its next checkpoint.
    lease.release()
    assert json.loads((tmp_path / "LOCK").read_text())["host"] == "h2"


@pytest.mark.slow
def test_non_finite_weights_are_never_checkpointed(toy_data, tmp_path):
    model_dir = tmp_path / "run"
    base = {"optimizer": "adamw", "val_split": "", "lr_schedule": "constant"}
    train.run(train_config(toy_data, model_dir, train_steps=1, **base))
    latest = model_dir_lib.latest_checkpoint(str(model_dir))
    assert latest.endswith("ckpt-1")
    # lr x weight decay overflows float32: step 2's loss (before the update) is finite, the
    # weights after it are not.
    # Beyond the flags' ranges (built around their check): the quickest way to diverge.
    blowup = train_config(toy_data, model_dir, train_steps=2, **base)
    optim = dataclasses.replace(blowup.optim, learning_rate=1e38, weight_decay=100.0)
    blowup = dataclasses.replace(blowup, optim=optim)
    with pytest.raises(train_state.NonFiniteWeightsError) as info:
        train.run(blowup)
    message = str(info.value)
    assert message.startswith("weights are NaN or inf after step 2 (")
    assert "not checkpointed (the checkpoint of step 1 stays the latest)" in message
    assert model_dir_lib.latest_checkpoint(str(model_dir)) == latest
    assert not (model_dir / "checkpoints" / "ckpt-2.index").exists()
    assert not (model_dir / "DONE").exists() and not (model_dir / "LOCK").exists()
    assert issubclass(train_state.NonFiniteWeightsError, boneage_tpu.Error)  # One CLI line.


@pytest.mark.slow
def test_corrupt_shard_is_named_when_training_reads_it(tmp_path):
    data_dir = tmp_path / "data"
    write_toy_dataset(data_dir, splits={"train": 16, "val": 8}, shards_per_split=1)
    shard = data_dir / schema.shard_name("train", 0, 1)
    raw = bytearray(shard.read_bytes())
    raw[len(raw) // 3] ^= 0xFF  # Inside a record: its CRC no longer matches.
    shard.write_bytes(bytes(raw))
    with pytest.raises(train.TrainingError) as info:
        train.run(train_config(str(data_dir), tmp_path / "run", train_steps=1, val_split=""))
    message = str(info.value)
    assert message.startswith(f"corrupt data shard {shard}: sha256 differs from the manifest")
    assert "boneage-verify-tfrecords" in message and "\n" not in message


def test_manifest_that_is_not_json_names_the_file(tmp_path):
    data_dir = tmp_path / "data"
    write_toy_dataset(data_dir, splits={"train": 8})
    (data_dir / schema.MANIFEST_NAME).write_text("<html>not json</html>")
    with pytest.raises(
        schema.ManifestError, match=f"{data_dir / schema.MANIFEST_NAME} is not valid JSON"
    ):
        train.run(train_config(str(data_dir), tmp_path / "run", val_split=""))


@pytest.mark.slow
def test_resume_with_data_of_another_image_size_is_refused(toy_data, tmp_path):
    model_dir = tmp_path / "run"
    train.run(train_config(toy_data, model_dir, train_steps=1, val_split=""))
    before = (model_dir / "config.json").read_bytes()
    other = tmp_path / "other"
    write_toy_dataset(other, splits={"train": 16}, height=64, width=48)
    with pytest.raises(train_state.ResumeError) as info:
        train.run(train_config(str(other), model_dir, train_steps=2, val_split=""))
    assert str(info.value) == (
        f"{model_dir} holds checkpoints trained on data stored at 40 px, but --data {other} is "
        "stored at 64 px: resume with data converted with boneage-make-tfrecords --image_size 40, "
        "or use a new --model_dir"
    )
    assert (model_dir / "config.json").read_bytes() == before
    assert os.path.exists(model_dir / "DONE")  # The finished run is left as it was.


@pytest.mark.parametrize(
    "flag, message",
    [
        ("--steps_per_loop=-1", "--steps_per_loop must be >= 0, got -1"),
        ("--learning_rate=-0.001", "--learning_rate must be >= 0, got -0.001"),
        ("--dropout=-0.1", "--dropout must be >= 0, got -0.1"),
        ("--warmup_steps=-5", "--warmup_steps must be >= 0, got -5"),
        ("--virtual_cpus=-2", "--virtual_cpus must be >= 0, got -2"),
        ("--batch_size=-8", "--batch_size must be >= 1, got -8"),
        ("--keep_checkpoints=0", "--keep_checkpoints must be >= 1, got 0"),
    ],
)
def test_out_of_range_flags_are_one_line_usage_errors(tmp_path, capsys, flag, message):
    argv = ["train", f"--data={tmp_path}/data", f"--model_dir={tmp_path}/run", flag]
    assert train_cmd.main(argv) == 2
    assert capsys.readouterr().err.strip().splitlines() == [f"train: error: {message}"]
    assert not (tmp_path / "run").exists()  # Checked before any work.


@pytest.mark.gcs
def test_lease_on_gcs_is_create_only_and_taken_over_when_stale(gcs_dir, capsys):
    import tensorflow as tf

    clock = [1000.0]
    first = train_lease.Lease(gcs_dir, heartbeat_seconds=3600, clock=lambda: clock[0])
    first.acquire()
    second = train_lease.Lease(gcs_dir, heartbeat_seconds=3600, clock=lambda: clock[0])
    with pytest.raises(train_lease.LockedError, match=f"{gcs_dir} is in use by another trainer"):
        second.acquire()
    clock[0] += 10
    assert first.heartbeat()
    clock[0] += train_lease.STALE_SECONDS + 1  # The first trainer died: no more heartbeats.
    second.acquire(log=print)
    assert "taking over the lock" in capsys.readouterr().out
    assert not first.heartbeat()  # Its generation is gone: it can no longer write the lease.
    first.release()
    assert second.holds()
    second.release()
    assert not tf.io.gfile.exists(f"{gcs_dir}/LOCK")


def test_the_finiteness_check_is_one_graph_naming_each_bad_weight(tmp_path):
    import keras
    import tensorflow as tf

    inputs = keras.Input([3])
    model = keras.Model(inputs, keras.layers.Dense(2, name="head")(keras.layers.Dense(4)(inputs)))
    checkpoints = train_state.Checkpointing(
        str(tmp_path), 1, step=tf.Variable(0, dtype=tf.int64), model=model
    )
    assert checkpoints.non_finite_weights() == []
    head_kernel = model.get_layer("head").kernel
    head_kernel.assign(tf.fill(head_kernel.shape, float("inf")))
    assert checkpoints.non_finite_weights() == [head_kernel.path]
    # Both calls ran the same traced function: one device round trip per check.
    assert checkpoints._finite_fn.experimental_get_tracing_count() == 1
