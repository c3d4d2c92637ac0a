"""Trains the bone-age model on TPU, GPUs or CPU: `python -m boneage_tpu.train --data D --model_dir M`.

The loop is our own (`boneage_tpu.train.loop`): `strategy.run` inside a `tf.function` running
--steps_per_loop steps per call, one progress line per call. The model directory layout is in
`boneage_tpu.core.model_dir`; a rerun with the same --model_dir resumes from its latest checkpoint
(`boneage_tpu.train.state`). Every flag: `python -m boneage_tpu.train --helpfull`.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any

# Quiets TensorFlow's C++ start-up logging when run as a program (no effect once TF is loaded).
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import tensorflow as tf  # noqa: E402

from boneage_tpu.core import config as config_lib  # noqa: E402
from boneage_tpu.core import distribute  # noqa: E402
from boneage_tpu.core import model_dir as model_dir_lib  # noqa: E402
from boneage_tpu.core.errors import Error, UsageError  # noqa: E402
from boneage_tpu.data import (
    augment,  # noqa: E402
    verify,  # noqa: E402
)
from boneage_tpu.modeling import export  # noqa: E402
from boneage_tpu.train import calibrate  # noqa: E402
from boneage_tpu.train import state as train_state  # noqa: E402
from boneage_tpu.train.setup import DatasetFn, Session, prepare  # noqa: E402


class TrainingError(Error, RuntimeError):
    """Training cannot go on (e.g. a non-finite loss); the message names the step."""


def log(message: str) -> None:
    """Prints one progress line (stdout, flushed: readable in notebooks and CI logs)."""
    print(message, flush=True)


def _format_eta(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def _validate(
    session: Session, step: int, logs: train_state.ScalarLog, records: model_dir_lib.MetricsLog
) -> dict[str, float]:
    session.trainer.sync_batch_norm()
    metrics = session.trainer.evaluate(session.val_dataset)
    logs.write(step, {"mae_months": metrics.mae_months, "loss": metrics.loss})
    records.write(
        "val", step, mae_months=metrics.mae_months, loss=metrics.loss, count=int(metrics.count)
    )
    log(
        f"val   step {step}: mae {metrics.mae_months:.2f} mo  loss {metrics.loss:.4f}  "
        f"n={int(metrics.count)}"
    )
    return {
        "val_mae_months": metrics.mae_months,
        "val_loss": metrics.loss,
        "val_count": metrics.count,
    }


def _loop_length(config: config_lib.TrainConfig, current: int, steps_per_loop: int) -> int:
    """Steps of the next loop: it ends at the next checkpoint, validation or the last step."""
    ends = [
        config.schedule.train_steps,
        (current // config.schedule.checkpoint_every + 1) * config.schedule.checkpoint_every,
    ]
    if config.schedule.eval_every > 0:
        ends.append((current // config.schedule.eval_every + 1) * config.schedule.eval_every)
    return min(min(ends) - current, steps_per_loop)


def _fit_schedule_to_budget(
    session: Session, current: int, minutes: float, mark: tuple[int, float]
) -> None:
    """Moves the cosine's end to the step the remaining time budget reaches at the recent rate.

    `mark` is (step, minutes) at the end of this process's first loop: the rate is measured
    from there (validation and checkpoints included), leaving out tracing and cache filling.
    """
    config = session.config
    steps, span = current - mark[0], minutes - mark[1]
    if steps <= 0 or span <= 0:
        return
    reachable = current + int(steps / span * (config.schedule.max_train_minutes - minutes))
    session.schedule_end.steps.assign(min(max(reachable, current), config.schedule.train_steps))


@contextlib.contextmanager
def _data_errors_name_the_shard(
    config: config_lib.TrainConfig, splits: list[str]
) -> Iterator[None]:
    """A failed record read (DataLossError names no file) becomes a TrainingError naming the
    shard whose size or sha256 differs from the manifest."""
    try:
        yield
    except tf.errors.DataLossError as e:
        if not config.data.path:
            raise
        raise TrainingError(
            verify.describe_read_failure(config.data.path, None, splits, e)
        ) from None


def _train(
    session: Session,
    train_log: train_state.ScalarLog,
    val_log: train_state.ScalarLog | None,
    records: model_dir_lib.MetricsLog,
    after_loop: Callable[[int], None] | None,
) -> dict[str, Any]:
    """Runs loops up to train_steps; checkpoints and validates at their intervals."""
    config, trainer, ckpt = session.config, session.trainer, session.checkpoints
    result: dict[str, Any] = {}
    rates: list[float] = []
    current = session.start_step
    started = time.perf_counter()
    mark: tuple[int, float] | None = None
    while current < config.schedule.train_steps:
        num_steps = _loop_length(config, current, session.settings["steps_per_loop"])
        began = time.perf_counter()
        with _data_errors_name_the_shard(config, ["train"]):
            metrics = trainer.train(session.train_iterator, num_steps)
        elapsed = time.perf_counter() - began
        if metrics.bad_step >= 0:
            kept = (
                f"the checkpoint of step {ckpt.saved_step} is kept"
                if ckpt.saved_step >= 0
                else "no checkpoint was written"
            )
            raise TrainingError(
                f"loss is NaN or inf at step {metrics.bad_step}: stopped ({kept}); "
                "lower --learning_rate or check the data"
            )
        current = int(session.step.numpy())
        rate = num_steps * config.data.batch_size / elapsed
        rates.append(rate)
        # The first loop includes tracing and compilation: leave it out of the ETA when possible.
        steady = rates[1:] or rates
        eta = (
            (config.schedule.train_steps - current)
            * config.data.batch_size
            * len(steady)
            / sum(steady)
        )
        lr = float(keras.ops.convert_to_numpy(session.optimizer.learning_rate))
        scalars = {"loss": metrics.loss, "mae_months": metrics.mae_months, "learning_rate": lr}
        train_log.write(current, {**scalars, "images_per_second": rate})
        records.write(
            "train", current, **scalars, images_per_second=rate, steps=num_steps,
            train_steps=config.schedule.train_steps, eta_seconds=eta,
        )  # fmt: skip
        log(
            f"step {current}/{config.schedule.train_steps}  loss {metrics.loss:.4f}  "
            f"mae {metrics.mae_months:.2f} mo  lr {lr:.2e}  {rate:.0f} img/s  "
            f"eta {_format_eta(eta)}"
        )
        result = {
            "train_loss": metrics.loss,
            "train_mae_months": metrics.mae_months,
            "images_per_second": rate,
        }
        validate = (
            val_log is not None
            and config.schedule.eval_every > 0
            and current % config.schedule.eval_every == 0
        )
        if validate or current % config.schedule.checkpoint_every == 0:
            # Checkpoints and validations get moving statistics of the current weights.
            trainer.recalibrate_batch_norm(
                session.train_iterator, config.optim.bn_recalibration_batches
            )
        if validate:
            with _data_errors_name_the_shard(config, [session.derived.val_split]):
                result.update(_validate(session, current, val_log, records))
            if config.schedule.lr_schedule == "plateau" and session.plateau.update(
                result["val_mae_months"]
            ):
                log(f"plateau: learning rate x{config.schedule.plateau_factor} from step {current}")
        if current % config.schedule.checkpoint_every == 0:
            trainer.sync_batch_norm()
            session.lease.check_held()  # Never write after another trainer took over.
            ckpt.save()
        if after_loop is not None:
            after_loop(current)
        minutes = (time.perf_counter() - started) / 60.0
        if mark is None:
            mark = (current, minutes)
        elif config.schedule.max_train_minutes > 0:
            _fit_schedule_to_budget(session, current, minutes, mark)
        if (
            0 < config.schedule.max_train_minutes <= minutes
            and current < config.schedule.train_steps
        ):
            records.write(
                "stop", current, reason="time_budget", minutes=minutes,
                max_train_minutes=config.schedule.max_train_minutes, train_steps=config.schedule.train_steps,
            )  # fmt: skip
            log(
                f"time budget: stopping at step {current} of {config.schedule.train_steps} after "
                f"{minutes:.1f} min (--max_train_minutes {config.schedule.max_train_minutes:g})"
            )
            break
    result["train_minutes"] = (time.perf_counter() - started) / 60.0
    return result


def run(
    config: config_lib.TrainConfig,
    strategy: tf.distribute.Strategy | None = None,
    datasets: Mapping[str, DatasetFn] | None = None,
    *,
    after_loop: Callable[[int], None] | None = None,
    derived: config_lib.Derived | None = None,
) -> dict[str, Any]:
    """Trains (or resumes) a run, validates, exports it and writes DONE.

    Args:
      config: the run's settings (never modified). With `config.data.path` set, the label
        stats and splits are derived from its manifest.
      strategy: the distribution strategy; None builds it from `config.runtime.tpu`/`virtual_cpus`.
      datasets: optional input functions replacing `data.build_dataset`:
        {"train": fn(input_context) -> dataset, "val": fn(input_context) -> dataset}; "val"
        is optional. Each yields batches of the PER-REPLICA size
        (`input_context.get_per_replica_batch_size(config.data.batch_size)`; `eval_batch_size` for
        "val") of {"image": uint8 [B,S,S,1], "male": float32 [B], "boneage": float32 [B],
        "mask": float32 [B] (optional)}; "train" is infinite, "val" finite.
      after_loop: called with the step after each loop's validation and checkpoint (tests use
        it to stop a run the way a kill would).
      derived: the label stats and splits to use with `datasets` (without `config.data.path`).

    Returns:
      {"step", "train_loss", "train_mae_months", "images_per_second", "val_mae_months",
       "val_loss", "val_count", "exports"}; the train keys are those of the last loop (absent
      when the run was already finished), the val keys need a validation split.
    """
    for name in ("fit_bias_correction", "fit_intervals"):
        if getattr(config.model, name) and not (config.data.path and config.data.val_split):
            raise UsageError(f"--{name} needs --data and a --val_split to fit on")
    session = prepare(config, strategy, datasets, log, derived)
    try:
        return _run_locked(session, after_loop)
    finally:
        session.lease.release()
        if not session.chief:
            model_dir_lib.remove_worker_dir(session.write_dir)


def _run_locked(session: Session, after_loop: Callable[[int], None] | None) -> dict[str, Any]:
    """`run` once the session holds the model directory's lease."""
    config, settings = session.config, session.settings
    # Only the chief writes metrics.jsonl (as the TensorBoard logs); its clock starts here.
    records = model_dir_lib.MetricsLog(config.model_dir if session.chief else None)
    records.write(
        "start", session.start_step, train_steps=config.schedule.train_steps,
        batch_size=config.data.batch_size, per_replica_batch=session.per_replica_batch,
        replicas=session.strategy.num_replicas_in_sync, steps_per_loop=settings["steps_per_loop"],
    )  # fmt: skip
    log(
        f"train: {distribute.describe(session.strategy)}, batch {config.data.batch_size} "
        f"({session.per_replica_batch}/replica), {settings['precision']}"
        + (f" ({settings['cpu_hardware']})" if settings["cpu_hardware"] else "")
        + f", XLA: {settings['xla']}, warp: {settings['warp']}, {settings['steps_per_loop']} steps/loop, "
        + (f"resuming at step {session.start_step}" if session.start_step else "from step 0")
        + f" of {config.schedule.train_steps}"
    )
    if config.augment.enabled:
        transients = augment.batch_transient_bytes(
            config.data.image_size,
            config.data.image_size,
            1,
            settings["warp"],
            config.augment,
            session.per_replica_batch,
        )
        log(
            f"augmentation transients ≈ {transients / 1e9:.3g} GB/replica ({settings['warp']} warp)"
        )

    def logs_dir(name: str) -> str | None:
        # Only the chief writes TensorBoard logs (a ScalarLog of None writes nothing).
        return model_dir_lib.logs_dir(config.model_dir, name) if session.chief else None

    train_log = train_state.ScalarLog(logs_dir("train"))
    val_log = None
    if session.val_dataset is not None:
        val_log = train_state.ScalarLog(logs_dir("val"))
    try:
        result = _train(session, train_log, val_log, records, after_loop)
        current = int(session.step.numpy())
        if session.checkpoints.saved_step != current:
            session.trainer.recalibrate_batch_norm(
                session.train_iterator, config.optim.bn_recalibration_batches
            )
        session.trainer.sync_batch_norm()
        if session.checkpoints.saved_step != current:
            session.lease.check_held()
            session.checkpoints.save()
        if val_log is not None and "val_mae_months" not in result:
            with _data_errors_name_the_shard(config, [session.derived.val_split]):
                result.update(_validate(session, current, val_log, records))
    finally:
        train_log.close()
        if val_log is not None:
            val_log.close()
    result["step"] = current
    if config.model.fit_bias_correction or config.model.fit_intervals:
        result.update(calibrate.fit(session, log))
    # Every worker exports (saving reads distributed variables); a non-chief into its private
    # folder, deleted when the run ends. Only the chief writes DONE.
    result["exports"] = export.export_all(session.model, config, session.derived, session.write_dir)
    if not session.chief:
        log(f"done: step {current} (worker {session.write_dir}: the chief writes the results)")
        return result
    metrics = {k: v for k, v in result.items() if k != "exports"}
    model_dir_lib.write_done(config.model_dir, current, metrics)
    log(f"done: step {current}, exports in {model_dir_lib.export_dir(config.model_dir)}")
    return result
