"""The model directory: the one owner of its layout, with its writers and its readers.

A model directory (local or gs://) holds:
  config.json                 every TrainConfig field + the data manifest's label stats
  checkpoints/ckpt-<step>.*   tf.train.CheckpointManager output (model, optimizer, step, rng)
  logs/train, logs/val        TensorBoard event files of training
  logs/eval[_<split>][_flip]  TensorBoard event files of the continuous evaluator
  export/model.keras          the trained Keras model (outputs months)
  export/saved_model/         SavedModel; signature `serving_default`:
                                image_bytes: string[None] (PNG/JPEG bytes), male: float32[None]
                                -> {"boneage_months": float32[None]}
  DONE                        JSON {"step": N, "metrics": {...}}; written last: the run finished
  eval/<split>-<step>/        evaluation outputs (metrics.json, predictions.csv, report.*)
  workers/<task>/             a non-chief multi-worker process's private folder while it runs:
                                its LOCK and the checkpoint and export copies that collectives
                                make it write (deleted after each); the chief writes the rest
  LOCK                        JSON {owner, host, pid, started, heartbeat}: the lease of the one
                                trainer running here (`boneage_tpu.train.lease`); absent when idle
"""

from __future__ import annotations

import json
import re
from typing import Any

import tensorflow as tf

from boneage_tpu.core.config import TrainConfig, join
from boneage_tpu.core.errors import Error

CONFIG_NAME = "config.json"
DONE_NAME = "DONE"
CHECKPOINT_SUBDIR = "checkpoints"
EXPORT_SUBDIR = "export"
KERAS_EXPORT_NAME = "model.keras"
SAVED_MODEL_SUBDIR = "saved_model"
LOGS_SUBDIR = "logs"
EVAL_SUBDIR = "eval"
WORKERS_SUBDIR = "workers"
LOCK_NAME = "LOCK"

_STEP_KEY = "step/.ATTRIBUTES/VARIABLE_VALUE"
_CKPT_NUMBER = re.compile(r"ckpt-(\d+)$")


class ModelDirError(Error, ValueError):
    """A model directory, checkpoint or export that cannot be used; the message is one line."""


def lock_path(model_dir: str) -> str:
    """Returns the path of the trainer's lease file."""
    return join(model_dir, LOCK_NAME)


def save_config(config: TrainConfig) -> None:
    """Writes config.json into `config.model_dir`."""
    tf.io.gfile.makedirs(config.model_dir)
    with tf.io.gfile.GFile(join(config.model_dir, CONFIG_NAME), "w") as f:
        f.write(config.to_json())


def has_config(model_dir: str) -> bool:
    """Returns whether the directory has a config.json (a run has started there)."""
    return tf.io.gfile.exists(join(model_dir, CONFIG_NAME))


def load_config(model_dir: str) -> TrainConfig:
    """Reads config.json, with a one-line error when it is missing."""
    path = join(model_dir, CONFIG_NAME)
    if not tf.io.gfile.exists(path):
        raise FileNotFoundError(f"{path} not found: is {model_dir} a boneage_tpu model directory?")
    with tf.io.gfile.GFile(path, "r") as f:
        return TrainConfig.from_dict(json.load(f))


def checkpoint_dir(model_dir: str) -> str:
    """Returns the folder holding the CheckpointManager's checkpoints."""
    return join(model_dir, CHECKPOINT_SUBDIR)


def checkpoint_step(path: str) -> int:
    """Returns the training step stored in a checkpoint (its `step` variable, else `ckpt-<N>`).

    The checkpoint number is the manager's save counter, not necessarily the step, so the `step`
    variable wins when the checkpoint has one.
    """
    reader = tf.train.load_checkpoint(path)
    if reader.has_tensor(_STEP_KEY):
        return int(reader.get_tensor(_STEP_KEY))
    match = _CKPT_NUMBER.search(path)
    if not match:
        raise ModelDirError(f"checkpoint {path} has no `step` variable and no ckpt-<N> name")
    return int(match.group(1))


def list_checkpoints(model_dir: str) -> list[tuple[int, str]]:
    """Returns (step, path) of every checkpoint the CheckpointManager lists, oldest first.

    Uses the manager's `checkpoint` state file, which is updated only after a checkpoint is
    completely written, so a checkpoint being saved right now is never listed half-written.
    """
    state = tf.train.get_checkpoint_state(checkpoint_dir(model_dir))
    if state is None:
        return []
    found = []
    for path in state.all_model_checkpoint_paths:
        try:
            found.append((checkpoint_step(path), path))
        except tf.errors.NotFoundError:
            continue  # Deleted by the trainer's keep-K policy since the state file was read.
    return sorted(found)


def latest_checkpoint(model_dir: str) -> str | None:
    """Returns the path of the checkpoint with the highest step, or None when there is none."""
    checkpoints = list_checkpoints(model_dir)
    return checkpoints[-1][1] if checkpoints else None


def logs_dir(model_dir: str, name: str) -> str:
    """Returns the TensorBoard folder `logs/<name>`."""
    return join(model_dir, LOGS_SUBDIR, name)


def eval_dir(model_dir: str, name: str = "") -> str:
    """Returns `eval/<name>` (an evaluation's outputs), or `eval` itself."""
    return join(model_dir, EVAL_SUBDIR, name) if name else join(model_dir, EVAL_SUBDIR)


def export_dir(model_dir: str) -> str:
    """Returns the folder of the exports."""
    return join(model_dir, EXPORT_SUBDIR)


def keras_export_path(model_dir: str) -> str:
    """Returns the path of the Keras export."""
    return join(model_dir, EXPORT_SUBDIR, KERAS_EXPORT_NAME)


def saved_model_path(model_dir: str) -> str:
    """Returns the folder of the SavedModel export."""
    return join(model_dir, EXPORT_SUBDIR, SAVED_MODEL_SUBDIR)


def worker_dir(model_dir: str, worker: str) -> str:
    """Returns the private folder of the non-chief worker `worker` (e.g. "worker-1")."""
    return join(model_dir, WORKERS_SUBDIR, worker)


def remove_worker_dir(path: str) -> None:
    """Deletes a worker's private folder, and `workers/` once no worker has one left."""
    if tf.io.gfile.exists(path):
        tf.io.gfile.rmtree(path)
    parent = path.rstrip("/").rsplit("/", 1)[0]
    if tf.io.gfile.isdir(parent) and not tf.io.gfile.listdir(parent):
        tf.io.gfile.rmtree(parent)


def done_path(model_dir: str) -> str:
    """Returns the path of the DONE marker."""
    return join(model_dir, DONE_NAME)


def write_done(model_dir: str, step: int, metrics: dict[str, Any]) -> None:
    """Writes DONE (JSON with the final step and metrics); call it last."""
    with tf.io.gfile.GFile(done_path(model_dir), "w") as f:
        json.dump({"step": step, "metrics": metrics}, f, indent=2, sort_keys=True)


def clear_done(model_dir: str) -> None:
    """Removes DONE so a continued run is not taken as finished by a continuous evaluator."""
    if tf.io.gfile.exists(done_path(model_dir)):
        tf.io.gfile.remove(done_path(model_dir))


def read_done(model_dir: str) -> dict[str, Any] | None:
    """Returns the DONE marker's JSON when training has finished, else None."""
    path = done_path(model_dir)
    if not tf.io.gfile.exists(path):
        return None
    with tf.io.gfile.GFile(path, "r") as f:
        text = f.read()
    try:
        return json.loads(text) if text.strip() else {}
    except json.JSONDecodeError as e:
        raise ModelDirError(f"{path} is not valid JSON: {e}") from e
