"""Continuous evaluation: follow a training run and evaluate each new checkpoint exactly once.

The Model Garden `continuous_eval` pattern (Keras 3 has no SidecarEvaluator). The loop looks at
the model directory every `poll_interval` seconds:
  1. note whether the DONE marker exists (the trainer writes it last, after its final
     checkpoint, so every checkpoint saved before DONE is in the listing of step 2);
  2. list the CheckpointManager's checkpoints (oldest first) and evaluate each one whose
     `eval/<split>-<step>/metrics.json` does not exist yet: restarting the evaluator therefore
     skips what was done. Each result also goes to TensorBoard (`MODEL_DIR/logs/eval`, or
     `logs/eval_<split>[_<tta>]` for another split or TTA);
  3. stop when DONE was seen in step 1, or when no new checkpoint appeared for `timeout`
     seconds (0: never time out).
A checkpoint that the trainer's keep-K policy deleted before it could be evaluated is listed in
the summary's `skipped` with the reason.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import tensorflow as tf

from boneage_tpu.core import config as config_lib
from boneage_tpu.core import model_dir as model_dir_lib
from boneage_tpu.core import storage
from boneage_tpu.evaluate import once, report

# metrics.json key -> TensorBoard tag. "mae_months" is also the trainer's tag in logs/train and
# logs/val, so TensorBoard draws train, val and eval MAE on one chart.
SCALARS = {
    "mae_months": "mae_months",
    "rmse_months": "rmse_months",
    "bias": "bias_months",
    "r2": "r2",
    "mean_predictor_mae_months": "mean_predictor_mae_months",
}


def eval_logdir(model_dir: str, split: str, tta: str) -> str:
    """Returns the TensorBoard folder: logs/eval for the val split, logs/eval_<split>[_<tta>]."""
    name = "eval" if split == "val" else f"eval_{split}"
    return model_dir_lib.logs_dir(model_dir, name if tta == "none" else f"{name}_{tta}")


def write_scalars(writer: Any, step: int, values: dict[str, Any]) -> None:
    """Writes the evaluation scalars of one checkpoint at its training step."""
    with writer.as_default():
        for key, tag in SCALARS.items():
            if values.get(key) is not None:
                tf.summary.scalar(tag, values[key], step=step)
    writer.flush()


def run_continuous(
    config: Any,
    strategy: tf.distribute.Strategy,
    *,
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
) -> dict[str, Any]:
    """Evaluates every new checkpoint of `config.model_dirs[0]` until DONE or the timeout.

    Args:
      config: an `once.EvalConfig` with `continuous=True` and one model directory.
      strategy: where the model runs.
      sleep: waits between polls (injectable for tests).
      clock: monotonic seconds (injectable for tests).

    Returns:
      {"evaluated_steps": [...], "already_evaluated_steps": [...], "skipped": [{step, reason}],
       "stop_reason": "done" | "timeout", "metrics": {step: metrics dict}}.
    """

    model_dir = config.model_dirs[0]
    base = config.output or model_dir_lib.eval_dir(model_dir)
    writer = None
    models: dict[str, Any] = {}
    handled: set[int] = set()
    summary: dict[str, Any] = {
        "evaluated_steps": [],
        "already_evaluated_steps": [],
        "skipped": [],
        "metrics": {},
    }
    last_new = clock()
    settled: list[str] | None = None
    print(f"watching {model_dir_lib.checkpoint_dir(model_dir)} for new checkpoints")
    while True:
        done = model_dir_lib.read_done(model_dir) is not None
        has_config = model_dir_lib.has_config(model_dir)
        # One listing call per poll (a single LIST request on gs://); the state file and every
        # checkpoint's index are read again only when the listing changed.
        listing = storage.list_prefix(model_dir_lib.checkpoint_dir(model_dir) + "/ckpt-")
        checkpoints = []
        if has_config and listing != settled:
            checkpoints = model_dir_lib.list_checkpoints(model_dir)
            # Settled once the state file lists every index (it is updated after them).
            indexes = {n for n in listing if n.endswith(".index")}
            if indexes <= {f"{path}.index" for _, path in checkpoints}:
                settled = listing
        for step, _ in checkpoints:
            if step in handled:
                continue
            handled.add(step)
            last_new = clock()
            output = config_lib.join(base, once.output_name(config.split, [step], config.tta))
            if tf.io.gfile.exists(config_lib.join(output, report.METRICS_NAME)):
                print(f"step {step}: already evaluated in {output}, skipped")
                summary["already_evaluated_steps"].append(step)
                continue
            try:
                values = once.evaluate_once(
                    config, strategy, checkpoint=str(step), output=output, models=models
                )
            except (tf.errors.NotFoundError, model_dir_lib.ModelDirError) as e:
                if step in {s for s, _ in model_dir_lib.list_checkpoints(model_dir)}:
                    raise  # Still there: a real problem, not the trainer's clean-up.
                reason = (
                    "deleted by the trainer's keep-K policy before it could be evaluated "
                    f"(raise --keep_checkpoints to evaluate every one): {str(e).splitlines()[0]}"
                )
                print(f"step {step}: skipped, {reason}")
                summary["skipped"].append({"step": step, "reason": reason})
                continue
            if writer is None:
                writer = tf.summary.create_file_writer(
                    eval_logdir(model_dir, config.split, config.tta)
                )
            write_scalars(writer, step, values)
            print(f"step {step}: mae_months {values['mae_months']} -> {output}")
            summary["evaluated_steps"].append(step)
            summary["metrics"][step] = values
        if done:
            summary["stop_reason"] = "done"
            break
        if config.timeout > 0 and clock() - last_new > config.timeout:
            print(f"no new checkpoint for {config.timeout:g} s: stopping")
            summary["stop_reason"] = "timeout"
            break
        sleep(config.poll_interval)
    if writer is not None:
        writer.close()
    return summary
