"""The model directory: the one owner of its layout, with its writers and its readers.

A model directory (local or gs://) holds:
  config.json                 the user's settings: TrainConfig, one object per group
  derived.json                what the run derived from the data (label stats, stored image
                                format, splits) and fitted after training (bias corrections:
                                bias_slope/bias_intercept for plain predictions, the model's;
                                tta_corrections {flip|rotflip: [slope, intercept]};
                                interval_scores {mode: {absolute|spread: sorted scores}})
  checkpoints/ckpt-<step>.*   tf.train.CheckpointManager output (model, optimizer, step, rng)
  logs/train, logs/val        TensorBoard event files of training
  logs/eval[_<split>][_flip]  TensorBoard event files of the continuous evaluator
  export/model.keras          the trained Keras model (outputs months)
  export/saved_model/         SavedModel; signature `serving_default`:
                                image_bytes: string[None] (PNG/JPEG bytes), male: float32[None]
                                -> {"boneage_months": float32[None]}
  DONE                        JSON {"step": N, "metrics": {...}}; written last: the run finished
  metrics.jsonl               JSON lines appended by the chief across resumes: "kind" start
                                (each process), train (each loop), val, stop (time budget);
                                "step", "time" (unix), "seconds" (since the process's start
                                record) and the figures of the line the trainer prints
  eval/<split>-<step>/        evaluation outputs (metrics.json, predictions.csv, report.*)
  workers/<task>/             a non-chief multi-worker process's private folder while it runs:
                                its LOCK and the checkpoint and export copies that collectives
                                make it write (deleted after each); the chief writes the rest
  LOCK                        JSON {owner, host, pid, started, heartbeat}: the lease of the one
                                trainer running here (`boneage_tpu.train.lease`); absent when idle

The module is ~560 lines because it is the one owner of all of these: each file's writer sits
beside its reader, which checks what it reads and names the file and key in one line.
"""

from __future__ import annotations

import functools
import json
import math
import re
import time
import typing
from typing import Any

import tensorflow as tf

from boneage_tpu.core import guard, options, schema
from boneage_tpu.core.config import (
    INTERVAL_SCALES,
    TTA_CORRECTION_MODES,
    Derived,
    TrainConfig,
    join,
)
from boneage_tpu.core.errors import Error, UsageError

CONFIG_NAME = "config.json"
DERIVED_NAME = "derived.json"
DONE_NAME = "DONE"
CHECKPOINT_SUBDIR = "checkpoints"
EXPORT_SUBDIR = "export"
KERAS_EXPORT_NAME = "model.keras"
SAVED_MODEL_SUBDIR = "saved_model"
LOGS_SUBDIR = "logs"
EVAL_SUBDIR = "eval"
WORKERS_SUBDIR = "workers"
LOCK_NAME = "LOCK"
METRICS_NAME = "metrics.jsonl"
METRICS_KINDS = ("start", "train", "val", "stop")

MAX_CONFIG_BYTES = 2**20  # A config.json is ~3 KB.
# A record is ~300 bytes: a million loops (steps_per_loop 1) fit, a stray huge file does not.
MAX_METRICS_BYTES = 2**29
# Keys every flat config.json (before the groups) has; a JSON object without them is another
# project's file.
_OLD_KEYS = ("backbone", "image_size", "label_mean", "label_std", "data_image_size")
# The fields filled from the data manifest (no flag declares their range): stored image size
# (0: unknown, an old run; at most the side of an 8-bit image of images.MAX_DECODED_BYTES) and
# JPEG quality.
_MANIFEST_FIELD_RANGES = (("data_image_size", 0, 16384), ("data_jpeg_quality", 1, 100))

_STEP_KEY = "step/.ATTRIBUTES/VARIABLE_VALUE"
_CKPT_NUMBER = re.compile(r"ckpt-(\d+)$")


class ModelDirError(Error, ValueError):
    """A model directory, checkpoint or export that cannot be used; the message is one line."""


def lock_path(model_dir: str) -> str:
    """Returns the path of the trainer's lease file."""
    return join(model_dir, LOCK_NAME)


def save_config(config: TrainConfig) -> None:
    """Writes config.json (the user's settings, one object per group) into `config.model_dir`."""
    tf.io.gfile.makedirs(config.model_dir)
    with tf.io.gfile.GFile(join(config.model_dir, CONFIG_NAME), "w") as f:
        f.write(config.to_json())


def save_derived(model_dir: str, derived: Derived) -> None:
    """Writes derived.json: what the run derived from its data and fitted after training."""
    with tf.io.gfile.GFile(join(model_dir, DERIVED_NAME), "w") as f:
        f.write(derived.to_json())


def has_config(model_dir: str) -> bool:
    """Returns whether the directory has a config.json (a run has started there)."""
    return tf.io.gfile.exists(join(model_dir, CONFIG_NAME))


def load_config(model_dir: str) -> TrainConfig:
    """Reads and checks config.json, as `schema.read_manifest` checks a manifest.

    The file must be a JSON object written by boneage_tpu: nested by group (this version) or
    flat (runs before the groups, whose keys are the flag names). Every known key must have
    the right type and every setting must be within its flag's range and choices: a tampered
    image size is refused here with one line, before it can exhaust memory or fail deep inside
    Keras. Keys this version does not know are ignored.

    Raises:
      ModelDirError: one line naming the file and the problem; "not a boneage_tpu model
        directory" for a folder without config.json (e.g. another project's checkpoints) or
        with another project's config.json.
    """
    path = join(model_dir, CONFIG_NAME)
    return config_from_dict(_read_json(model_dir, path), path)


def load_derived(model_dir: str) -> Derived:
    """Reads and checks derived.json (runs before it: the same keys in the flat config.json).

    Raises:
      ModelDirError: one line naming the file and the problem (a stored image size, encoding,
        JPEG quality or crop out of range, a non-finite or non-positive label statistic).
    """
    path = join(model_dir, DERIVED_NAME)
    if not tf.io.gfile.exists(path):
        path = join(model_dir, CONFIG_NAME)
    return derived_from_dict(_read_json(model_dir, path), path)


def _read_json(model_dir: str, path: str) -> Any:
    """Returns the parsed JSON file `path` of `model_dir` (one-line errors)."""
    if not tf.io.gfile.exists(path):
        if not tf.io.gfile.isdir(model_dir):
            raise ModelDirError(f"model directory not found: {guard.printable(model_dir)}")
        raise ModelDirError(
            f"{guard.printable(model_dir)} is not a boneage_tpu model directory (no "
            f"{CONFIG_NAME}): give a training run's folder"
        )
    try:
        text = guard.read_file(path, MAX_CONFIG_BYTES, f"a {path.rsplit('/', 1)[-1]}")
        return json.loads(text.decode("utf-8"))
    except guard.InputFileError as e:
        raise ModelDirError(str(e)) from e
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelDirError(
            f"{path} is not valid JSON ({' '.join(str(e).split())}): the file was cut short or "
            "edited; restore it from the training run"
        ) from None


def _flat_settings(values: dict[str, Any], path: str) -> dict[str, Any]:
    """Returns {flag name: value} of a nested or a flat (older) config.json object."""
    nested = isinstance(values.get("model"), dict)
    identifying = (
        [("model", "backbone"), ("data", "image_size")] if nested else [(k,) for k in _OLD_KEYS]
    )
    missing = [".".join(keys) for keys in identifying if not _has_keys(values, keys)]
    if missing:
        raise ModelDirError(
            f"{path} is not a boneage_tpu config (no {', '.join(missing)}): this is not a "
            "boneage_tpu model directory"
        )
    settings = {}
    for flag in options.flags_of(TrainConfig):
        keys = flag.path if nested else (flag.name,)
        if not _has_keys(values, keys):
            continue
        value = functools.reduce(lambda d, k: d[k], keys, values)
        if not _has_type(value, flag.kind):
            raise ModelDirError(
                f"{path}: {'.'.join(keys)} is {json.dumps(value)[:80]}, expected "
                f"{_type_name(flag.kind)}"
            )
        settings[flag.name] = value
    return settings


def _has_keys(values: Any, keys: tuple[str, ...]) -> bool:
    for key in keys:
        if not isinstance(values, dict) or key not in values:
            return False
        values = values[key]
    return True


def config_from_dict(values: Any, path: str = CONFIG_NAME) -> TrainConfig:
    """Checks the parsed contents of a config.json and builds its TrainConfig.

    Raises:
      ModelDirError: see `load_config`.
    """
    if not isinstance(values, dict):
        raise ModelDirError(
            f"{path} is not a boneage_tpu config (a JSON {type(values).__name__}, not an object)"
        )
    settings = _flat_settings(values, path)
    try:
        return options.from_flat(TrainConfig, settings)
    except (UsageError, ValueError, TypeError) as e:
        text = " ".join(str(e).split()).replace("--", "")
        raise ModelDirError(f"{path}: {text}") from None


def derived_from_dict(values: Any, path: str = DERIVED_NAME) -> Derived:
    """Checks the parsed contents of a derived.json (or an older config.json) and builds it.

    Raises:
      ModelDirError: see `load_derived`.
    """
    if not isinstance(values, dict) or "label_std" not in values:
        raise ModelDirError(f"{path} has no label_std: not a boneage_tpu model directory's file")
    hints = typing.get_type_hints(Derived)
    for key, value in values.items():
        if key in hints and not _has_type(value, hints[key]):
            raise ModelDirError(
                f"{path}: {key} is {json.dumps(value)[:80]}, expected {_type_name(hints[key])}"
            )
    fields = {k: v for k, v in values.items() if k in hints}
    fields["tta_corrections"] = _tta_corrections(values.get("tta_corrections", {}), path)
    fields["interval_scores"] = _interval_scores(values.get("interval_scores", {}), path)
    derived = Derived(**fields)
    for name, low, high in _MANIFEST_FIELD_RANGES:
        value = getattr(derived, name)
        if not low <= value <= high:
            raise ModelDirError(f"{path}: {name} must be in {low}..{high}, got {value}")
    if derived.data_encoding not in ("", *schema.ENCODINGS):
        raise ModelDirError(
            f"{path}: data_encoding must be one of {', '.join(schema.ENCODINGS)}, got "
            f"{derived.data_encoding!r}"
        )
    if derived.data_crop not in schema.CROPS:
        raise ModelDirError(
            f"{path}: data_crop must be one of {', '.join(schema.CROPS)}, got {derived.data_crop!r}"
        )
    low, high = schema.CROP_MARGIN_RANGE
    if derived.data_crop != "none" and not low <= derived.data_crop_margin <= high:
        raise ModelDirError(
            f"{path}: data_crop_margin must be in {low}..{high} with data_crop "
            f"{derived.data_crop}, got {derived.data_crop_margin}"
        )
    if derived.schema_version not in (0, schema.SCHEMA_VERSION):
        raise ModelDirError(
            f"{path} was trained on data of schema version {derived.schema_version}; this "
            f"boneage_tpu reads version {schema.SCHEMA_VERSION}"
        )
    for name in ("label_mean", "label_std", "bias_slope", "bias_intercept"):
        if not math.isfinite(getattr(derived, name)):
            raise ModelDirError(f"{path}: {name} is not a finite number")
    if derived.label_std <= 0:
        raise ModelDirError(f"{path}: label_std must be > 0, got {derived.label_std}")
    return derived


def _tta_corrections(value: Any, path: str) -> dict[str, tuple[float, float]]:
    """Checks derived.json's tta_corrections: {flip|rotflip: [slope, intercept]} of finite numbers.

    Raises:
      ModelDirError: one line naming the file and the bad entry.
    """
    if not isinstance(value, dict):
        raise ModelDirError(
            f"{path}: tta_corrections is {json.dumps(value)[:80]}, expected an object"
        )
    lines = {}
    for mode, line in value.items():
        if mode not in TTA_CORRECTION_MODES:
            raise ModelDirError(
                f"{path}: tta_corrections has {json.dumps(mode)[:40]}, expected only "
                f"{', '.join(TTA_CORRECTION_MODES)}"
            )
        if not (
            isinstance(line, list | tuple)
            and len(line) == 2
            and all(_has_type(v, float) and math.isfinite(v) for v in line)
        ):
            raise ModelDirError(
                f"{path}: tta_corrections.{mode} is {json.dumps(line)[:80]}, expected "
                "[slope, intercept] (finite numbers)"
            )
        lines[mode] = (float(line[0]), float(line[1]))
    return lines


def _interval_scores(value: Any, path: str) -> dict[str, dict[str, list[float]]]:
    """Checks derived.json's interval_scores: {mode: {scale: sorted finite scores >= 0}}.

    Raises:
      ModelDirError: one line naming the file and the bad entry.
    """
    if not isinstance(value, dict):
        raise ModelDirError(
            f"{path}: interval_scores is {json.dumps(value)[:80]}, expected an object"
        )
    modes = ("none", *TTA_CORRECTION_MODES)
    checked: dict[str, dict[str, list[float]]] = {}
    for mode, by_scale in value.items():
        if mode not in modes:
            raise ModelDirError(
                f"{path}: interval_scores has {json.dumps(mode)[:40]}, expected only "
                f"{', '.join(modes)}"
            )
        if not isinstance(by_scale, dict) or not by_scale:
            raise ModelDirError(f"{path}: interval_scores.{mode} must be a non-empty object")
        checked[mode] = {}
        for scale, scores in by_scale.items():
            where = f"{path}: interval_scores.{mode}.{scale}"
            if scale not in INTERVAL_SCALES:
                raise ModelDirError(
                    f"{where}: unknown scale, expected {', '.join(INTERVAL_SCALES)}"
                )
            if not (
                isinstance(scores, list)
                and scores
                and all(_has_type(v, float) and math.isfinite(v) for v in scores)
            ):
                raise ModelDirError(f"{where} must be a non-empty list of finite numbers")
            floats = [float(v) for v in scores]
            if floats[0] < 0 or any(b < a for a, b in zip(floats, floats[1:], strict=False)):
                raise ModelDirError(f"{where} must be scores >= 0 in ascending order")
            checked[mode][scale] = floats
    return checked


def _has_type(value: Any, hint: Any) -> bool:
    """Whether a JSON value fits a TrainConfig field's type (ints count as floats)."""
    hint = options.base_type(hint)
    origin = typing.get_origin(hint)
    if origin is tuple:
        item = typing.get_args(hint)[0]
        return isinstance(value, list | tuple) and all(_has_type(v, item) for v in value)
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    return True


def _type_name(hint: Any) -> str:
    hint = options.base_type(hint)
    if typing.get_origin(hint) is tuple:
        item = typing.get_args(hint)[0]
        return f"a list of {({int: 'integers', float: 'numbers', str: 'strings'}).get(item, item)}"
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string"}.get(
        hint, str(hint)
    )


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


def metrics_path(model_dir: str) -> str:
    """Returns the path of the training metrics log (JSON lines)."""
    return join(model_dir, METRICS_NAME)


class MetricsLog:
    """Appends the trainer's records to metrics.jsonl, one JSON object a line.

    `model_dir` None writes nothing (a non-chief worker: only the chief writes, as with the
    TensorBoard logs). "seconds" counts from this object's creation: the process's start.
    """

    def __init__(self, model_dir: str | None) -> None:
        self.path = metrics_path(model_dir) if model_dir else None
        self.origin = time.monotonic()
        if self.path and tf.io.gfile.exists(self.path):
            # A killed run's cut last line goes, so that this run's records start a new line.
            with tf.io.gfile.GFile(self.path, "r") as f:
                text = f.read()
            if text and not text.endswith("\n"):
                with tf.io.gfile.GFile(self.path, "w") as f:
                    f.write(text[: text.rfind("\n") + 1])

    def write(self, kind: str, step: int, **values: Any) -> None:
        """Appends one record {"kind", "step", "time", "seconds", **values}."""
        if self.path is None:
            return
        record = {"kind": kind, "step": int(step), "time": round(time.time(), 3)}
        record["seconds"] = round(time.monotonic() - self.origin, 3)
        record.update(values)
        # One write per record, file closed after it: a kill loses at most a cut last line
        # (which `read_metrics` skips), and a gs:// object is uploaded on close.
        with tf.io.gfile.GFile(self.path, "a") as f:
            f.write(json.dumps(record, sort_keys=True) + "\n")


def read_metrics(model_dir: str) -> list[dict[str, Any]]:
    """Returns the records of metrics.jsonl in order; [] when the file does not exist.

    A last line without its newline that is not valid JSON is a record cut by a kill and is
    skipped; any other line that is not a record is refused.

    Raises:
      ModelDirError: one line naming the file, the line number and the problem.
    """
    path = metrics_path(model_dir)
    if not tf.io.gfile.exists(path):
        return []
    try:
        text = guard.read_file(path, MAX_METRICS_BYTES, "a metrics log").decode("utf-8")
    except guard.InputFileError as e:
        raise ModelDirError(str(e)) from e
    except UnicodeDecodeError:
        raise ModelDirError(f"{path} is not text: it is not a boneage_tpu metrics log") from None
    lines = text.split("\n")
    records = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            if number == len(lines):  # No newline after it: the write was cut short.
                break
            raise ModelDirError(
                f"{path} line {number} is not valid JSON ({' '.join(str(e).split())}): the file "
                "was edited or is not a boneage_tpu metrics log"
            ) from None
        problem = _record_problem(record)
        if problem:
            raise ModelDirError(f"{path} line {number} is not a metrics record: {problem}")
        records.append(record)
    return records


def _record_problem(record: Any) -> str:
    """What makes a parsed line not a metrics record ("" when it is one)."""
    if not isinstance(record, dict):
        return f"a JSON {type(record).__name__}, not an object"
    kind, step, seconds = record.get("kind"), record.get("step"), record.get("seconds")
    if kind not in METRICS_KINDS:
        return f"kind {json.dumps(kind)[:40]} is not one of {', '.join(METRICS_KINDS)}"
    if not _has_type(step, int) or not _has_type(seconds, float):
        return f"step {json.dumps(step)[:40]}, seconds {json.dumps(seconds)[:40]}: not numbers"
    return ""
