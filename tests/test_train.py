"""Tests of the trainer: end-to-end runs on toy TFRecords, resume, replicas, XLA, errors, CLI."""

from __future__ import annotations

import dataclasses
import io
import json
import pathlib
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf
from absl import flags
from PIL import Image

import boneage_tpu.modeling.model  # noqa: F401  (registers the custom layers for load_model)
from boneage_tpu import cli
from boneage_tpu.core import config as config_lib
from boneage_tpu.core import distribute
from boneage_tpu.core import model_dir as model_dir_lib
from boneage_tpu.data import augment
from boneage_tpu.data import pipeline as data
from boneage_tpu.modeling import model as model_lib
from boneage_tpu.train import job as train
from boneage_tpu.train import loop
from boneage_tpu.train import state as train_state
from tests import helpers
from tests.helpers import train_config
from tests.records import toy_image, write_toy_dataset

REPO = pathlib.Path(__file__).resolve().parents[1]


def _scalar_steps(logdir: pathlib.Path) -> dict[str, list[int]]:
    """tag -> every step it was written at (duplicates kept), from all event files."""
    steps: dict[str, list[int]] = {}
    for path in sorted(logdir.glob("events.out.tfevents.*")):
        for record in tf.data.TFRecordDataset(str(path)):
            event = tf.compat.v1.Event.FromString(record.numpy())
            for value in event.summary.value:
                steps.setdefault(value.tag, []).append(int(event.step))
    return {tag: sorted(s) for tag, s in steps.items()}


def _png(age: float, male: bool) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(toy_image(age, male, 80, 64), mode="L").save(buf, format="PNG")
    return buf.getvalue()


def test_two_step_run_writes_checkpoints_logs_config_and_both_exports(toy_data, tmp_path, capsys):
    model_dir = tmp_path / "run"
    result = train.run(train_config(toy_data, model_dir, eval_every=1))
    assert result["step"] == 2
    assert result["val_count"] == 10.0
    assert np.isfinite(result["train_loss"]) and np.isfinite(result["val_mae_months"])

    manifest = json.loads((pathlib.Path(toy_data) / "manifest.json").read_text())
    saved = model_dir_lib.load_config(str(model_dir))
    derived = model_dir_lib.load_derived(str(model_dir))
    assert saved == train_config(toy_data, model_dir, eval_every=1)  # the flags, unchanged
    assert derived.label_mean == pytest.approx(manifest["label_stats"]["mean_months"])
    assert derived.label_std == pytest.approx(manifest["label_stats"]["std_months"])
    assert derived.schema_version == manifest["schema_version"]
    assert (derived.train_split, derived.val_split) == ("train", "val")

    ckpts = train_state.Checkpointing(
        str(model_dir), 3, step=tf.Variable(0, dtype=tf.int64), model=keras.Model()
    )
    assert [int(p.rsplit("-", 1)[1]) for p in ckpts.manager.checkpoints] == [1, 2]
    assert json.loads((model_dir / "DONE").read_text())["step"] == 2

    train_tags = _scalar_steps(model_dir / "logs" / "train")
    for tag in ("loss", "mae_months", "learning_rate", "images_per_second"):
        assert train_tags[tag] == [1, 2]
    assert _scalar_steps(model_dir / "logs" / "val")["mae_months"] == [1, 2]

    # metrics.jsonl: the same figures as the printed lines, read back through model_dir.
    records = model_dir_lib.read_metrics(str(model_dir))
    assert [(r["kind"], r["step"]) for r in records] == [
        ("start", 0), ("train", 1), ("val", 1), ("train", 2), ("val", 2),
    ]  # fmt: skip
    assert records[0]["train_steps"] == 2 and records[0]["batch_size"] == 4
    train_keys = {"loss", "mae_months", "learning_rate", "images_per_second", "time", "seconds"}
    assert all(train_keys <= set(r) for r in records if r["kind"] == "train")
    assert records[-1]["mae_months"] == pytest.approx(result["val_mae_months"])
    assert records[-1]["count"] == 10 and records[-2]["loss"] == pytest.approx(result["train_loss"])
    seconds = [r["seconds"] for r in records]
    assert seconds == sorted(seconds) and all(r["time"] > 1.7e9 for r in records)

    out = capsys.readouterr().out
    progress = [line for line in out.splitlines() if line.startswith("step ")]
    assert len(progress) == 2
    assert all(k in progress[0] for k in ("step 1/2", "loss", "mae", "img/s", "eta"))
    # Printed once at the start: 4 images of 32 px through the CPU's gather warp.
    expected = augment.batch_transient_bytes(32, 32, 1, "gather", augment.AugmentConfig(), 4)
    assert out.count(f"augmentation transients ≈ {expected / 1e9:.3g} GB/replica") == 1

    # The evaluator's way to restore a checkpoint: keys `model` and `step`.
    config = model_dir_lib.load_config(str(model_dir))
    restored = model_lib.build_model(config, model_dir_lib.load_derived(str(model_dir)))
    step = tf.Variable(0, dtype=tf.int64)
    checkpoint = tf.train.Checkpoint(model=restored, step=step)
    checkpoint.restore(str(model_dir / "checkpoints" / "ckpt-2")).expect_partial()
    assert int(step.numpy()) == 2

    # Both exports give the same months; the SavedModel decodes PNG bytes itself.
    keras_model = keras.models.load_model(model_dir / "export" / "model.keras")
    serving = tf.saved_model.load(str(model_dir / "export" / "saved_model"))
    signature = serving.signatures["serving_default"]
    images = [_png(60.0, True), _png(180.0, False)]
    male = np.array([1.0, 0.0], np.float32)
    months = signature(image_bytes=tf.constant(images), male=tf.constant(male))["boneage_months"]
    assert months.shape == (2,) and months.dtype == tf.float32
    decoded = np.stack([data.decode_image_bytes(tf.constant(b), 32).numpy() for b in images])
    expected = keras_model({"image": decoded.astype(np.float32), "male": male})
    np.testing.assert_allclose(months.numpy(), np.asarray(expected), rtol=1e-5)
    np.testing.assert_allclose(
        np.asarray(restored({"image": decoded, "male": male})), expected, rtol=1e-5
    )


class Killed(Exception):
    """Stands in for a preemption."""


@pytest.mark.slow
def test_killed_run_resumes_from_its_checkpoint_without_duplicate_logs(toy_data, tmp_path, capsys):
    model_dir = tmp_path / "run"
    config = train_config(toy_data, model_dir, train_steps=4, checkpoint_every=2, dropout=0.2)

    def kill_at_3(step: int) -> None:
        if step == 3:
            raise Killed

    with pytest.raises(Killed):
        train.run(config, after_loop=kill_at_3)
    assert not (model_dir / "DONE").exists()
    assert model_dir_lib.latest_checkpoint(str(model_dir)).endswith("ckpt-2")
    assert _scalar_steps(model_dir / "logs" / "train")["loss"] == [1, 2, 3]
    capsys.readouterr()

    result = train.run(config)
    out = capsys.readouterr().out
    assert "resuming at step 2 of 4" in out
    assert [line.split()[1] for line in out.splitlines() if line.startswith("step ")] == [
        "3/4",
        "4/4",
    ]
    assert result["step"] == 4
    assert json.loads((model_dir / "DONE").read_text())["step"] == 4
    # Step 3 ran twice (before the kill and after the restart) but is logged once.
    assert _scalar_steps(model_dir / "logs" / "train")["loss"] == [1, 2, 3, 4]
    # metrics.jsonl keeps both processes' records, each process after its start record; the
    # final validation (no --eval_every) is recorded too.
    records = model_dir_lib.read_metrics(str(model_dir))
    assert [(r["kind"], r["step"]) for r in records] == [
        ("start", 0), ("train", 1), ("train", 2), ("train", 3), ("start", 2), ("train", 3),
        ("train", 4), ("val", 4),
    ]  # fmt: skip
    reader = tf.train.load_checkpoint(str(model_dir / "checkpoints" / "ckpt-4"))
    # The step is the optimizer's own count: one variable, saved once under `step`.
    assert reader.get_tensor("step/.ATTRIBUTES/VARIABLE_VALUE") == 4
    assert not reader.has_tensor("optimizer/_iterations/.ATTRIBUTES/VARIABLE_VALUE")
    assert any(
        name.startswith("rng/")
        for name, _ in tf.train.list_variables(str(model_dir / "checkpoints" / "ckpt-4"))
    )


def test_metrics_log_skips_a_cut_last_line_and_refuses_garbage(tmp_path):
    model_dir = str(tmp_path)
    assert model_dir_lib.read_metrics(model_dir) == []
    log = model_dir_lib.MetricsLog(model_dir)
    log.write("train", 5, loss=0.5)
    log.write("val", 5, mae_months=12.5)
    path = pathlib.Path(model_dir_lib.metrics_path(model_dir))
    assert path.name == "metrics.jsonl"
    with path.open("a") as f:
        f.write('{"kind": "train", "step": 6, "lo')  # killed in the middle of a write
    assert [r["step"] for r in model_dir_lib.read_metrics(model_dir)] == [5, 5]
    # A resume drops the cut line before appending, so its records start a new line.
    model_dir_lib.MetricsLog(model_dir).write("start", 5)
    records = model_dir_lib.read_metrics(model_dir)
    assert [r["kind"] for r in records] == ["train", "val", "start"]
    assert records[1]["mae_months"] == 12.5 and records[2]["seconds"] >= 0
    assert model_dir_lib.MetricsLog(None).path is None  # a non-chief writes nothing
    for garbage, problem in (
        ("not json\n", "line 1 is not valid JSON"),
        ("[1, 2]\n", "line 1 is not a metrics record: a JSON list"),
        ('{"kind": "x", "step": 1, "seconds": 0}\n', 'kind "x" is not one of'),
        ('{"kind": "val", "step": "1", "seconds": 0}\n', "not numbers"),
    ):
        path.write_text(garbage + '{"kind": "val", "step": 1, "seconds": 0}\n')
        with pytest.raises(model_dir_lib.ModelDirError, match=problem) as error:
            model_dir_lib.read_metrics(model_dir)
        assert len(str(error.value).splitlines()) == 1


def _logged(logdir: pathlib.Path, tag: str) -> dict[int, float]:
    values = {}
    for path in sorted(logdir.glob("events.out.tfevents.*")):
        for record in tf.data.TFRecordDataset(str(path)):
            event = tf.compat.v1.Event.FromString(record.numpy())
            for value in event.summary.value:
                if value.tag == tag:
                    values[int(event.step)] = float(tf.make_ndarray(value.tensor))
    return values


@pytest.mark.slow
def test_a_resumed_run_with_more_steps_stretches_the_cosine(toy_data, tmp_path):
    model_dir = tmp_path / "run"
    train.run(train_config(toy_data, model_dir, train_steps=2, warmup_steps=0))
    train.run(train_config(toy_data, model_dir, train_steps=4, warmup_steps=0))
    lr = _logged(model_dir / "logs" / "train", "learning_rate")
    assert lr[2] == 0.0  # the first run's cosine ended at its last step
    assert lr[3] > 0.0  # the continued run anneals again, to its own --train_steps
    assert lr[4] == 0.0


@pytest.mark.slow
def test_resume_with_another_network_is_refused(toy_data, tmp_path):
    model_dir = tmp_path / "run"
    train.run(train_config(toy_data, model_dir, train_steps=1, val_split=""))
    with pytest.raises(
        train_state.ResumeError,
        match="model with --dense_units=16, this run asks for --dense_units=32: resume",
    ):
        train.run(train_config(toy_data, model_dir, train_steps=2, dense_units=(32,), val_split=""))


def _fixed_input(records: int, *, nan_from: int | None = None):
    """Input function over fixed arrays in a fixed order (no shuffling): replica-count proof."""
    rng = np.random.default_rng(7)
    arrays = {
        "image": rng.integers(0, 256, (records, 16, 16, 1)).astype(np.uint8),
        "male": (rng.random(records) < 0.5).astype(np.float32),
        "boneage": rng.uniform(5, 225, records).astype(np.float32),
    }
    if nan_from is not None:
        arrays["boneage"][nan_from:] = np.nan
    contexts: list[tuple[int, int]] = []

    def make(global_batch: int, training: bool):
        def fn(context: tf.distribute.InputContext) -> tf.data.Dataset:
            batch = context.get_per_replica_batch_size(global_batch)
            contexts.append((context.num_replicas_in_sync, batch))
            ds = tf.data.Dataset.from_tensor_slices(arrays)
            if training:
                return ds.repeat().batch(batch, drop_remainder=True)
            return ds.batch(batch)

        return fn

    return make, contexts


@pytest.mark.slow
def test_eight_replicas_equal_one_replica(tmp_path):
    results, weights = {}, {}
    for replicas in (1, 8):
        make, contexts = _fixed_input(16)
        config = train_config(
            "",
            tmp_path / f"r{replicas}",
            image_size=16,
            batch_size=8,
            eval_batch_size=8,
            train_steps=1,
            augment=False,
            norm="none",
            dropout=0.0,
            virtual_cpus=replicas,
        )
        results[replicas] = train.run(
            config,
            datasets={"train": make(8, True), "val": make(8, False)},
            derived=config_lib.Derived(label_mean=110.0, label_std=50.0),
        )
        assert contexts == [(replicas, 8 // replicas)] * 2  # train and val: per-replica batch
        path = str(tmp_path / f"r{replicas}" / "checkpoints" / "ckpt-1")
        reader = tf.train.load_checkpoint(path)
        weights[replicas] = {
            name: reader.get_tensor(name)
            for name, _ in tf.train.list_variables(path)
            if name.startswith("optimizer/_trainable_variables/")
        }
    assert results[1]["train_loss"] == pytest.approx(results[8]["train_loss"], abs=1e-4)
    assert results[1]["train_mae_months"] == pytest.approx(results[8]["train_mae_months"], abs=1e-3)
    assert results[1]["val_count"] == results[8]["val_count"] == 16.0
    assert results[1]["val_mae_months"] == pytest.approx(results[8]["val_mae_months"], abs=1e-3)
    assert len(weights[1]) > 10 and weights[1].keys() == weights[8].keys()
    for name, value in weights[1].items():
        np.testing.assert_allclose(weights[8][name], value, atol=1e-4, err_msg=name)


@pytest.mark.slow
@pytest.mark.parametrize("strategy_name", ["default", "one_device"])
def test_whole_replica_step_compiles_with_xla_and_trains_like_the_graph_step(strategy_name):
    """augment + model + loss + gradients + optimizer update as one jit_compile=True function
    (a single GPU's step; OneDeviceStrategy is what one GPU trains under): it compiles, and
    three steps give the weights that three uncompiled steps give. Without augmentation and
    dropout (XLA's random bits differ from TF's kernels') and with SGD (Adam's first steps
    amplify rounding in near-zero gradients), the two differ by rounding only."""
    strategy = (
        tf.distribute.get_strategy()
        if strategy_name == "default"
        else tf.distribute.OneDeviceStrategy("/cpu:0")
    )
    rng = np.random.default_rng(0)
    batch = {
        "image": tf.constant(rng.integers(0, 256, (4, 32, 32, 1)).astype(np.uint8)),
        "male": tf.constant([0.0, 1.0, 0.0, 1.0]),
        "boneage": tf.constant([20.0, 80.0, 150.0, 210.0]),
        "mask": tf.ones([4]),
    }
    weights, trainers = [], []
    for jit in (True, False):
        keras.utils.set_random_seed(0)
        with strategy.scope():
            model = model_lib.build_model(
                *helpers.config_and_derived(
                    backbone="tiny",
                    image_size=32,
                    dense_units=(8,),
                    dropout=0.0,
                    label_mean=100.0,
                    label_std=50.0,
                )
            )
            optimizer = keras.optimizers.SGD(learning_rate=1e-2)
            optimizer.build(model.trainable_variables)
        trainer = loop.TrainLoop(
            strategy,
            model,
            optimizer,
            global_batch=4,
            label_std=50.0,
            jit_compile=jit,
        )
        initial = [v.numpy() for v in model.weights]
        data = strategy.experimental_distribute_dataset(
            tf.data.Dataset.from_tensors(batch).repeat()
        )
        metrics = trainer.train(iter(data), 3)
        assert int(optimizer.iterations.numpy()) == 3
        assert metrics.count == 12.0 and metrics.bad_step == -1 and np.isfinite(metrics.loss)
        weights.append([v.numpy() for v in model.weights])
        trainers.append(trainer)
    hlo = trainers[0].replica_step.experimental_get_compiler_ir(batch)(stage="hlo")
    assert "HloModule" in hlo
    for compiled, graph in zip(*weights, strict=True):
        # XLA and oneDNN order float sums differently; after 3 steps a few weights differ by
        # ~6e-5 (seen on a clean clone), far below the ~1e-2 that one SGD step moves them.
        np.testing.assert_allclose(compiled, graph, rtol=1e-3, atol=2e-4)
    assert any(not np.array_equal(w, s) for w, s in zip(weights[0], initial, strict=True))


def test_batch_not_divisible_by_replicas_reads_well(tmp_path):
    make, _ = _fixed_input(16)
    config = train_config("", tmp_path / "run", batch_size=12, virtual_cpus=8)
    with pytest.raises(ValueError) as info:
        train.run(config, datasets={"train": make(12, True)})
    assert str(info.value) == (
        "--batch_size 12 is not divisible by the 8 replicas: use a multiple of 8 "
        "(each replica gets --batch_size / 8)"
    )


def test_local_paths_with_a_remote_tpu_fail_before_anything_starts(toy_data, tmp_path):
    model_dir = tmp_path / "run"
    with pytest.raises(distribute.DistributeError, match="read only gs://"):
        train.run(train_config(toy_data, model_dir, tpu="grpc://10.0.0.2:8470"))
    assert not model_dir.exists()


def test_nan_loss_stops_with_the_step_named(tmp_path):
    make, _ = _fixed_input(8, nan_from=4)  # batch 1 is finite, batch 2 has NaN labels
    config = train_config(
        "", tmp_path / "run", image_size=16, train_steps=3, steps_per_loop=3, checkpoint_every=5
    )
    with pytest.raises(
        train.TrainingError,
        match=r"loss is NaN or inf at step 2: stopped \(no checkpoint was written\); lower",
    ):
        train.run(config, datasets={"train": make(4, True)})
    assert not (tmp_path / "run" / "DONE").exists()


@pytest.mark.slow
def test_fp16_loss_scaling_path_runs(tmp_path):
    make, _ = _fixed_input(8)
    config = train_config("", tmp_path / "run", image_size=16, precision="fp16")
    derived = config_lib.Derived(label_mean=100.0, label_std=50.0)
    result = train.run(config, datasets={"train": make(4, True)}, derived=derived)
    assert result["step"] == 2 and np.isfinite(result["train_loss"])
    exported = keras.models.load_model(tmp_path / "run" / "export" / "model.keras")
    assert exported.get_layer("tiny").get_layer("conv0").compute_dtype == "float32"


def test_flags_cover_every_config_field_and_parse():
    values = flags.FlagValues()
    cli.define_flags(config_lib.TrainConfig, values)
    values(
        [
            "train",
            "--data=gs://b/d",
            "--model_dir=/tmp/m",
            "--dense_units=64,32",
            "--nouse_sex",
            "--noaugment",
            "--balance=age_sex",
            "--virtual_cpus=8",
            "--backbone=inception_v3",
        ]
    )
    config = cli.config_from_flags(config_lib.TrainConfig, values)
    assert config.model.dense_units == (64, 32)
    assert not config.model.use_sex and not config.augment.enabled
    assert config.data.balance == "age_sex" and config.runtime.virtual_cpus == 8
    assert config.model.backbone == "inception_v3" and config.data.path == "gs://b/d"
    assert cli.flat(config)["dense_units"] == (64, 32)  # flag names stay flat
    # Every field of every group is a flag; the values derived from the data are not.
    groups = [f for f in dataclasses.fields(config_lib.TrainConfig) if f.metadata.get("group")]
    fields = {f.name for g in groups for f in dataclasses.fields(getattr(config, g.name))}
    fields |= {"model_dir", "seed"}
    paths = {f.path[-1] for f in cli.flags_of(config_lib.TrainConfig)}
    assert paths == fields
    flag_names = {f.name for f in cli.flags_of(config_lib.TrainConfig)}
    derived = {f.name for f in dataclasses.fields(config_lib.Derived)}
    # Only the splits are both: the flags', and the ones trained on (a fold's under --fold).
    assert flag_names & derived == {"train_split", "val_split"}
    for name in flag_names:
        assert values[name].help, name


@pytest.mark.slow
def test_cli_helpfull_and_a_bad_data_error(tmp_path):
    helpfull = subprocess.run(
        [sys.executable, "-m", "boneage_tpu.train", "--helpfull"],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
        check=False,
    )
    assert helpfull.returncode in (0, 1)  # absl ends --helpfull with exit code 1
    assert "Traceback" not in helpfull.stderr
    for name in (
        "data",
        "model_dir",
        "backbone",
        "weights",
        "image_size",
        "batch_size",
        "train_steps",
        "steps_per_loop",
        "eval_every",
        "checkpoint_every",
        "learning_rate",
        "precision",
        "seed",
        "tpu",
        "virtual_cpus",
        "use_sex",
        "augment",
        "balance",
        "dense_units",
    ):
        shown = f"--[no]{name}" if name in ("use_sex", "augment") else f"--{name}"
        assert shown in helpfull.stdout, name
    bad = subprocess.run(
        [
            sys.executable,
            "-m",
            "boneage_tpu.train",
            f"--data={tmp_path}/nothing",
            f"--model_dir={tmp_path}/m",
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
        check=False,
    )
    assert bad.returncode == 1
    assert bad.stderr.strip().splitlines()[-1].startswith("train: error: no manifest.json in")
    assert "Traceback" not in bad.stderr


@pytest.mark.gcs
@pytest.mark.slow
def test_two_step_run_on_gcs_and_resume(gcs_dir):
    data_dir, model_dir = f"{gcs_dir}/data", f"{gcs_dir}/run"
    write_toy_dataset(data_dir, splits={"train": 24, "val": 10}, height=40, width=32)
    config = train_config(data_dir, model_dir, dense_units=(8,), train_steps=1)
    train.run(config)
    result = train.run(cli.replace(config, train_steps=2))
    assert result["step"] == 2
    assert model_dir_lib.latest_checkpoint(model_dir).endswith("ckpt-2")
    for name in ("config.json", "DONE", "export/model.keras", "export/saved_model/saved_model.pb"):
        assert tf.io.gfile.exists(f"{model_dir}/{name}"), name
    assert json.loads(tf.io.gfile.GFile(f"{model_dir}/DONE").read())["step"] == 2
    assert train_state.last_logged_step(f"{model_dir}/logs/train") == 2
    # metrics.jsonl is appended on gs:// too, across the resume.
    kinds = [(r["kind"], r["step"]) for r in model_dir_lib.read_metrics(model_dir)]
    assert kinds == [("start", 0), ("train", 1), ("val", 1), ("start", 1), ("train", 2), ("val", 2)]
    serving = tf.saved_model.load(f"{model_dir}/export/saved_model")
    out = serving.signatures["serving_default"](
        image_bytes=tf.constant([_png(100.0, True)]), male=tf.constant([1.0])
    )
    assert out["boneage_months"].shape == (1,)
