"""Everything a training run sets up before its first step: settings, model, optimizer, state.

`prepare` checks the flags against the devices (batch divisibility, paths on a remote TPU),
derives the label stats and splits from the manifest (`derive`; the config is never changed),
writes config.json and derived.json, builds the model and
the optimizer inside the strategy scope, restores the latest checkpoint and distributes the
input pipelines.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import keras
import tensorflow as tf

from boneage_tpu.core import config as config_lib
from boneage_tpu.core import distribute, schema
from boneage_tpu.core import model_dir as model_dir_lib
from boneage_tpu.core.errors import ConfigError, UsageError
from boneage_tpu.data import pipeline as data
from boneage_tpu.modeling import optim
from boneage_tpu.modeling.model import build_model
from boneage_tpu.train import lease as train_lease
from boneage_tpu.train import loop
from boneage_tpu.train import state as train_state

DatasetFn = Callable[[tf.distribute.InputContext], tf.data.Dataset]
DEFAULT_STEPS_PER_LOOP = {"tpu": 100, "gpu": 10, "cpu": 10}


def per_replica_batch(global_batch: int, replicas: int, flag: str = "--batch_size") -> int:
    """Returns global / replicas, or raises a one-line error when it does not divide."""
    if global_batch < 1 or global_batch % replicas:
        raise ConfigError(
            f"{flag} {global_batch} is not divisible by the {replicas} replicas: use a multiple "
            f"of {replicas} (each replica gets {flag} / {replicas})"
        )
    return global_batch // replicas


def resolve_settings(
    config: config_lib.TrainConfig, platform: str, replicas: int = 1
) -> dict[str, Any]:
    """Resolves the "auto"/0 settings for the platform: precision, XLA, steps per loop, warp.

    Args:
      config: the run's settings.
      platform: "tpu", "gpu" or "cpu" (`distribute.platform`).
      replicas: replicas in sync (one replica compiles its whole step).

    Returns:
      {"precision", "jit_compile" (wrap the replica step in jit_compile=True), "xla" (what
      runs under XLA, for the log), "steps_per_loop", "warp" (augmentation warp method)}.
    """
    runtime = distribute.resolve_runtime(config.runtime, platform, replicas)
    steps = config.schedule.steps_per_loop or DEFAULT_STEPS_PER_LOOP[platform]
    # TPUs run per-element gathers one element at a time; CPUs and GPUs gather cheaply and
    # would pay for the matmul warp's extra arithmetic (warp.warp_affine).
    warp = "matmul" if platform == "tpu" else "gather"
    return {**runtime, "steps_per_loop": steps, "warp": warp}


def resolve_splits(config: config_lib.TrainConfig, manifest: Mapping[str, Any]) -> tuple[str, str]:
    """Returns the (train, val) splits: the flags', or under `--fold i` the other folds and i."""
    if config.data.fold < 0:
        return config.data.train_split, config.data.val_split
    fold, folds = config.data.fold, schema.fold_count(manifest)
    if folds == 0:
        raise UsageError(
            f"--fold {fold}: {config.data.path} has no folds (convert with --num_folds K)"
        )
    if fold >= folds:
        raise UsageError(f"--fold {fold}: the data has folds 0..{folds - 1}")
    train = "+".join(schema.fold_split(k) for k in range(folds) if k != fold)
    return train, schema.fold_split(fold)


def derive(config: config_lib.TrainConfig) -> tuple[dict[str, Any], config_lib.Derived]:
    """Reads the data manifest; returns it and what the run derives from it (label stats...)."""
    manifest = schema.read_manifest(config.data.path)
    train_split, val_split = resolve_splits(config, manifest)
    train_info = schema.split_info(manifest, train_split)
    if val_split:
        schema.split_info(manifest, val_split)
    # The train split's own stats (pooled over folds); older manifests only have global ones.
    stats = train_info.get("label_stats") or manifest.get("label_stats", {})
    if not stats.get("std_months"):
        raise schema.ManifestError(f"{config.data.path}: manifest has no training label stats")
    crop, crop_margin = schema.manifest_crop(manifest)
    derived = config_lib.Derived(
        label_mean=float(stats["mean_months"]),
        label_std=float(stats["std_months"]),
        data_image_size=int(manifest.get("image_size", 0)),
        data_encoding=str(manifest.get("encoding", "")),
        data_jpeg_quality=int(manifest.get("jpeg_quality") or 95),
        data_crop=crop,
        data_crop_margin=crop_margin,
        schema_version=int(manifest["schema_version"]),
        train_split=train_split,
        val_split=val_split,
    )
    return manifest, derived


def input_fns(
    config: config_lib.TrainConfig,
    derived: config_lib.Derived,
    manifest: Mapping[str, Any],
    data_seed: int,
) -> dict[str, DatasetFn]:
    """The default input functions: `data.build_dataset` on the train and val splits."""
    eval_batch = config.data.eval_batch_size or config.data.batch_size

    def train_fn(context: tf.distribute.InputContext) -> tf.data.Dataset:
        return data.build_dataset(
            config.data.path,
            derived.train_split,
            training=True,
            batch_size=context.get_per_replica_batch_size(config.data.batch_size),
            image_size=config.data.image_size,
            input_context=context,
            seed=data_seed,
            balance=config.data.balance,
            cache=config.data.cache,
            manifest=dict(manifest),
        )

    def val_fn(context: tf.distribute.InputContext) -> tf.data.Dataset:
        return data.build_dataset(
            config.data.path,
            derived.val_split,
            training=False,
            batch_size=context.get_per_replica_batch_size(eval_batch),
            image_size=config.data.image_size,
            input_context=context,
            cache="no",
            manifest=dict(manifest),
        )

    return {"train": train_fn, "val": val_fn} if derived.val_split else {"train": train_fn}


@dataclasses.dataclass
class Session:
    """A prepared run: the objects the training loop drives."""

    config: config_lib.TrainConfig
    derived: config_lib.Derived
    strategy: tf.distribute.Strategy
    settings: dict[str, Any]
    per_replica_batch: int
    model: keras.Model
    optimizer: keras.optimizers.Optimizer
    step: tf.Variable
    plateau: optim.PlateauState
    schedule_end: optim.ScheduleEnd
    checkpoints: train_state.Checkpointing
    start_step: int
    trainer: loop.TrainLoop
    train_iterator: Any
    val_dataset: Any  # distributed dataset, or None without a validation split
    lease: train_lease.Lease  # held until the run ends: one trainer per model directory
    # What this process writes: the model directory (the chief) or a non-chief worker's
    # private folder there (`model_dir.worker_dir`), emptied when the run ends.
    write_dir: str

    @property
    def chief(self) -> bool:
        """Whether this process writes the model directory (always, but for multi-worker)."""
        return self.write_dir == self.config.model_dir


def _build_objects(
    config: config_lib.TrainConfig,
    derived: config_lib.Derived,
    settings: dict[str, Any],
    weights: str,
) -> tuple[
    keras.Model, keras.optimizers.Optimizer, tf.Variable, optim.PlateauState, optim.ScheduleEnd
]:
    """Builds model, optimizer, step, plateau state and schedule end (inside `strategy.scope()`)."""
    model = build_model(config, derived, weights=weights, precision=settings["precision"])
    plateau = optim.PlateauState(config.schedule.plateau_patience, config.schedule.plateau_factor)
    end = optim.ScheduleEnd(config.schedule.train_steps)
    optimizer = optim.make_optimizer(
        name=config.optim.optimizer,
        learning_rate=config.optim.learning_rate,
        warmup_steps=config.schedule.warmup_steps,
        total_steps=config.schedule.train_steps,
        schedule=config.schedule.lr_schedule,
        weight_decay=config.optim.weight_decay,
        plateau=plateau,
        loss_scale=settings["precision"] == "fp16",
        end=end,
    )
    # Built before the first trace: slot variables must not be created inside tf.function.
    optimizer.build(model.trainable_variables)
    # The step is the optimizer's count of applied updates: the loop keeps no counter of its
    # own (an fp16 step skipped on overflow is not counted).
    return model, optimizer, optimizer.iterations, plateau, end


def prepare(
    config: config_lib.TrainConfig,
    strategy: tf.distribute.Strategy | None,
    datasets: Mapping[str, DatasetFn] | None,
    log: Callable[[str], None],
    derived: config_lib.Derived | None = None,
) -> Session:
    """Validates, builds and restores everything for `config`.

    Args:
      config: the run's settings (not modified).
      strategy: the distribution strategy; None builds it from `config.runtime`.
      datasets: input functions {"train", "val"?}; None reads `config.data.path`.
      log: prints one progress line.
      derived: the label stats and splits with `datasets` (derived from the manifest
        otherwise; the default Derived() without either).
    """
    if not config.model_dir:
        raise ConfigError("--model_dir is required")
    if config.schedule.train_steps < 1 or config.schedule.checkpoint_every < 1:
        raise ConfigError("--train_steps and --checkpoint_every must be >= 1")
    if config.schedule.lr_schedule == "plateau" and (
        config.schedule.eval_every < 1 or not config.data.val_split
    ):
        raise ConfigError("--lr_schedule plateau needs --eval_every > 0 and a --val_split")
    paths = {"--data": config.data.path, "--model_dir": config.model_dir}
    for warning in distribute.check_paths(config.runtime.tpu, paths):
        log(f"warning: {warning}")
    manifest = None
    if config.data.path:
        manifest, derived = derive(config)
    elif datasets is None:
        raise ConfigError("--data is required")
    derived = derived or config_lib.Derived(
        train_split=config.data.train_split, val_split=config.data.val_split
    )
    strategy = strategy or distribute.make_strategy(config.runtime.tpu, config.runtime.virtual_cpus)
    platform = distribute.platform(strategy)
    replicas = strategy.num_replicas_in_sync
    batch = per_replica_batch(config.data.batch_size, replicas)
    eval_global = config.data.eval_batch_size or config.data.batch_size
    eval_batch = per_replica_batch(eval_global, replicas, "--eval_batch_size")
    if platform == "tpu" and batch % 8:
        log(f"hint: per-core batch {batch}: a multiple of 8 (ideally 128) keeps the MXUs full")
    settings = resolve_settings(config, platform, replicas)
    worker = distribute.worker_name(strategy)
    # Every worker reads the shared model directory (config, the chief's checkpoints); a
    # non-chief writes only what collectives make it write (checkpoints, exports), into its
    # private folder, and deletes them again.
    write_dir = model_dir_lib.worker_dir(config.model_dir, worker) if worker else config.model_dir
    # Before anything in the model directory is read or written: one trainer per directory.
    lease = train_lease.Lease(write_dir)
    lease.acquire(log)
    try:
        return _prepare_locked(
            config,
            derived,
            strategy,
            datasets,
            manifest,
            settings,
            batch,
            eval_batch,
            lease,
            write_dir,
        )
    except BaseException:
        lease.release()
        raise


def _prepare_locked(
    config: config_lib.TrainConfig,
    derived: config_lib.Derived,
    strategy: tf.distribute.Strategy,
    datasets: Mapping[str, DatasetFn] | None,
    manifest: dict[str, Any] | None,
    settings: dict[str, Any],
    batch: int,
    eval_batch: int,
    lease: train_lease.Lease,
    write_dir: str,
) -> Session:
    """The part of `prepare` that reads and writes the (locked) model directory."""
    train_state.check_resume(config, derived)
    resuming = model_dir_lib.latest_checkpoint(config.model_dir) is not None
    keras.utils.set_random_seed(config.seed)
    with strategy.scope():
        # A resumed run takes its weights from the checkpoint: nothing to download then.
        weights = "none" if resuming else config.model.weights
        model, optimizer, step, plateau, end = _build_objects(config, derived, settings, weights)
    checkpoints = train_state.Checkpointing(
        config.model_dir,
        config.schedule.keep_checkpoints,
        write_dir,
        step=step,
        model=model,
        optimizer=optimizer,
        plateau=plateau,
        schedule_end=end,
        rng=train_state.rng_state(model),
    )
    start = checkpoints.restore_latest() or 0
    if config.schedule.max_train_minutes <= 0:
        # Without a time budget the cosine ends at --train_steps, also when a resumed run asks
        # for more steps than the checkpointed one (its restored end would hold the rate at 0).
        end.steps.assign(config.schedule.train_steps)
    train_state.check_same_start(strategy, start, config.model_dir)
    chief = write_dir == config.model_dir
    if chief:
        # Written once the model exists: a run that fails to start leaves no config behind.
        model_dir_lib.save_config(config)
        model_dir_lib.save_derived(config.model_dir, derived)
        model_dir_lib.clear_done(config.model_dir)
    if datasets is None:
        # A resumed run reshuffles with a new seed rather than replaying the first batches.
        datasets = input_fns(config, derived, manifest, config.seed + start)
    trainer = loop.TrainLoop(
        strategy,
        model,
        optimizer,
        global_batch=config.data.batch_size,
        label_std=derived.label_std,
        label_mean=derived.label_mean,
        loss=config.optim.loss,
        augment_config=config.augment if config.augment.enabled else None,
        seed=config.seed,
        jit_compile=settings["jit_compile"],
        warp=settings["warp"],
    )
    train_data = loop.distribute(
        strategy, datasets["train"], per_replica_batch=batch, training=True
    )
    val_data = None
    if "val" in datasets:
        val_data = loop.distribute(
            strategy, datasets["val"], per_replica_batch=eval_batch, training=False
        )
    return Session(
        config=config,
        derived=derived,
        strategy=strategy,
        settings=settings,
        per_replica_batch=batch,
        model=model,
        optimizer=optimizer,
        step=step,
        plateau=plateau,
        schedule_end=end,
        checkpoints=checkpoints,
        start_step=start,
        trainer=trainer,
        train_iterator=iter(train_data),
        val_dataset=val_data,
        lease=lease,
        write_dir=write_dir,
    )
