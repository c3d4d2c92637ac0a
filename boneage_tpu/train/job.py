"""Trains the bone-age model on TPU, GPUs or CPU: `python -m boneage_tpu.train --data D --model_dir M`.

The loop is our own (`boneage_tpu.train.loop`): `strategy.run` inside a `tf.function` running
--steps_per_loop steps per call, one progress line per call. The model directory layout is in
`boneage_tpu.config`; a rerun with the same --model_dir resumes from its latest checkpoint
(`boneage_tpu.train.state`). Every flag: `python -m boneage_tpu.train --helpfull`.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time
from collections.abc import Callable, Mapping
from typing import Any

# Quiets TensorFlow's C++ start-up logging when run as a program (no effect once TF is loaded).
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import tensorflow as tf  # noqa: E402
from absl import app, flags, logging  # noqa: E402

from boneage_tpu import config as config_lib  # noqa: E402
from boneage_tpu import distribute, export  # noqa: E402
from boneage_tpu.train import state as train_state  # noqa: E402
from boneage_tpu.train.flags import config_from_flags, define_flags  # noqa: E402
from boneage_tpu.train.setup import DatasetFn, Session, prepare  # noqa: E402


class TrainingError(RuntimeError):
    """Training cannot go on (e.g. a non-finite loss); the message names the step."""


def log(message: str) -> None:
    """Prints one progress line (stdout, flushed: readable in notebooks and CI logs)."""
    print(message, flush=True)


def _format_eta(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def _validate(session: Session, step: int, logs: train_state.ScalarLog) -> dict[str, float]:
    session.trainer.sync_batch_norm()
    metrics = session.trainer.evaluate(session.val_dataset)
    logs.write(step, {"mae_months": metrics.mae_months, "loss": metrics.loss})
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
    ends = [config.train_steps, (current // config.checkpoint_every + 1) * config.checkpoint_every]
    if config.eval_every > 0:
        ends.append((current // config.eval_every + 1) * config.eval_every)
    return min(min(ends) - current, steps_per_loop)


def _train(
    session: Session,
    train_log: train_state.ScalarLog,
    val_log: train_state.ScalarLog | None,
    after_loop: Callable[[int], None] | None,
) -> dict[str, Any]:
    """Runs loops up to train_steps; checkpoints and validates at their intervals."""
    config, trainer, ckpt = session.config, session.trainer, session.checkpoints
    result: dict[str, Any] = {}
    rates: list[float] = []
    current = session.start_step
    while current < config.train_steps:
        num_steps = _loop_length(config, current, session.settings["steps_per_loop"])
        began = time.perf_counter()
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
        rate = num_steps * config.batch_size / elapsed
        rates.append(rate)
        # The first loop includes tracing and compilation: leave it out of the ETA when possible.
        steady = rates[1:] or rates
        eta = (config.train_steps - current) * config.batch_size * len(steady) / sum(steady)
        lr = float(keras.ops.convert_to_numpy(session.optimizer.learning_rate))
        scalars = {"loss": metrics.loss, "mae_months": metrics.mae_months, "learning_rate": lr}
        train_log.write(current, {**scalars, "images_per_second": rate})
        log(
            f"step {current}/{config.train_steps}  loss {metrics.loss:.4f}  "
            f"mae {metrics.mae_months:.2f} mo  lr {lr:.2e}  {rate:.0f} img/s  "
            f"eta {_format_eta(eta)}"
        )
        result = {
            "train_loss": metrics.loss,
            "train_mae_months": metrics.mae_months,
            "images_per_second": rate,
        }
        if val_log is not None and config.eval_every > 0 and current % config.eval_every == 0:
            result.update(_validate(session, current, val_log))
            if config.lr_schedule == "plateau" and session.plateau.update(result["val_mae_months"]):
                log(f"plateau: learning rate x{config.plateau_factor} from step {current}")
        if current % config.checkpoint_every == 0:
            trainer.sync_batch_norm()
            ckpt.save()
        if after_loop is not None:
            after_loop(current)
    return result


def run(
    config: config_lib.TrainConfig,
    strategy: tf.distribute.Strategy | None = None,
    datasets: Mapping[str, DatasetFn] | None = None,
    *,
    after_loop: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """Trains (or resumes) a run, validates, exports it and writes DONE.

    Args:
      config: the run's settings (not modified). With `config.data` set, the label stats come
        from its manifest; without (tests with `datasets`), the given label_mean/std are used.
      strategy: the distribution strategy; None builds it from `config.tpu`/`virtual_cpus`.
      datasets: optional input functions replacing `data.build_dataset`:
        {"train": fn(input_context) -> dataset, "val": fn(input_context) -> dataset}; "val"
        is optional. Each yields batches of the PER-REPLICA size
        (`input_context.get_per_replica_batch_size(config.batch_size)`; `eval_batch_size` for
        "val") of {"image": uint8 [B,S,S,1], "male": float32 [B], "boneage": float32 [B],
        "mask": float32 [B] (optional)}; "train" is infinite, "val" finite.
      after_loop: called with the step after each loop's validation and checkpoint (tests use
        it to stop a run the way a kill would).

    Returns:
      {"step", "train_loss", "train_mae_months", "images_per_second", "val_mae_months",
       "val_loss", "val_count", "exports"}; the train keys are those of the last loop (absent
      when the run was already finished), the val keys need a validation split.
    """
    config = dataclasses.replace(config)
    session = prepare(config, strategy, datasets, log)
    settings = session.settings
    log(
        f"train: {distribute.describe(session.strategy)}, batch {config.batch_size} "
        f"({session.per_replica_batch}/replica), {settings['precision']}, "
        f"XLA: {settings['xla']}, warp: {settings['warp']}, {settings['steps_per_loop']} steps/loop, "
        + (f"resuming at step {session.start_step}" if session.start_step else "from step 0")
        + f" of {config.train_steps}"
    )
    logs_dir = config_lib.join(config.model_dir, config_lib.LOGS_SUBDIR)
    train_log = train_state.ScalarLog(config_lib.join(logs_dir, "train"))
    val_log = None
    if session.val_dataset is not None:
        val_log = train_state.ScalarLog(config_lib.join(logs_dir, "val"))
    try:
        result = _train(session, train_log, val_log, after_loop)
        current = int(session.step.numpy())
        session.trainer.sync_batch_norm()
        if session.checkpoints.saved_step != current:
            session.checkpoints.save()
        if val_log is not None and "val_mae_months" not in result:
            result.update(_validate(session, current, val_log))
    finally:
        train_log.close()
        if val_log is not None:
            val_log.close()
    result["step"] = current
    result["exports"] = export.export_all(session.model, config)
    metrics = {k: v for k, v in result.items() if k != "exports"}
    train_state.write_done(config.model_dir, current, metrics)
    export_dir = config_lib.join(config.model_dir, config_lib.EXPORT_SUBDIR)
    log(f"done: step {current}, exports in {export_dir}")
    return result


# Bad input ends the CLI with one line; anything else keeps its traceback (a bug to report).
ERRORS = (
    ValueError,
    distribute.DistributeError,
    TrainingError,
    FileNotFoundError,
    tf.errors.NotFoundError,
    tf.errors.PermissionDeniedError,
)


def main(argv: list[str]) -> None:
    """Entry point after absl parsed the flags: builds the config and calls `run`."""
    if len(argv) > 1:
        sys.exit(f"train: error: unexpected arguments {argv[1:]} (flags are --name=value)")
    if not flags.FLAGS["verbosity"].present:
        # absl turns INFO on by default; TF and Keras then bury the progress lines.
        logging.set_verbosity(logging.WARNING)
        tf.get_logger().setLevel("WARNING")
    try:
        run(config_from_flags(flags.FLAGS))
    except ERRORS as err:
        message = " ".join(str(err).split()) or type(err).__name__
        sys.exit(f"train: error: {message}")


if __name__ == "__main__":
    define_flags()
    app.run(main)
