"""Run state of training: checkpointing, resume checks and TensorBoard scalars.

Preemption safety: a restarted run with the same --model_dir restores the latest checkpoint
(step, model, optimizer with its step counter, plateau state, Keras RNG state such as dropout
seeds) and continues. The augmentation RNG is stateless and keyed by the restored step, so it
needs no state. TensorBoard steps already on disk are not written again after a restart.
"""

from __future__ import annotations

from typing import Any

import tensorflow as tf

from boneage_tpu.core import config as config_lib
from boneage_tpu.core import model_dir as model_dir_lib
from boneage_tpu.core import options, schema
from boneage_tpu.core.errors import Error

# Fields that define the network: resuming with other values cannot restore the checkpoint.
ARCHITECTURE_FIELDS = (
    "backbone",
    "image_size",
    "use_sex",
    "sex_units",
    "dense_units",
    "attention",
    "norm",
)


class ResumeError(Error, ValueError):
    """The model directory holds a run that this config cannot continue."""


class NonFiniteWeightsError(Error, RuntimeError):
    """The weights became NaN or inf; no checkpoint of them is written."""


def check_resume(config: config_lib.TrainConfig, derived: config_lib.Derived) -> None:
    """Raises ResumeError when model_dir has checkpoints of a different network.

    A config.json that is not boneage_tpu's (another project's folder) or is damaged raises
    `model_dir.ModelDirError` here, before training would overwrite it.
    """
    if not model_dir_lib.has_config(config.model_dir):
        return
    previous = options.flat(model_dir_lib.load_config(config.model_dir))
    if model_dir_lib.latest_checkpoint(config.model_dir) is None:
        return
    stored = model_dir_lib.load_derived(config.model_dir)
    for name, what in (("data_image_size", "px"), ("data_encoding", "encoding")):
        old, new = getattr(stored, name), getattr(derived, name)
        if old and new and old != new:
            # The model learned from images stored this way; predict and evaluate prepare
            # new images from config.json, which a resume must not silently rewrite.
            flag = "--image_size" if name == "data_image_size" else "--encoding"
            raise ResumeError(
                f"{config.model_dir} holds checkpoints trained on data stored at {old} "
                f"{what}, but --data {config.data.path} is stored at {new} {what}: resume with data "
                f"converted with boneage-make-tfrecords {flag} {old}, or use a new --model_dir"
            )
    old_crop = (stored.data_crop, stored.data_crop_margin)
    new_crop = (derived.data_crop, derived.data_crop_margin)
    if not schema.same_crop(old_crop, new_crop):
        raise ResumeError(
            f"{config.model_dir} holds checkpoints trained on data converted with "
            f"{schema.crop_flags(*old_crop)}, but --data {config.data.path} was converted with "
            f"{schema.crop_flags(*new_crop)}: resume with data converted with "
            f"boneage-make-tfrecords {schema.crop_flags(*old_crop)}, or use a new --model_dir"
        )
    settings = options.flat(config)
    for name in ARCHITECTURE_FIELDS:
        old, new = previous[name], settings[name]
        if isinstance(old, list | tuple):
            old, new = ",".join(map(str, old)), ",".join(map(str, new))
        if old != new:
            raise ResumeError(
                f"{config.model_dir} holds checkpoints of a model with --{name}={old}, this run "
                f"asks for --{name}={new}: resume with the same model flags or use a new --model_dir"
            )


def rng_state(model: Any) -> tf.Module:
    """Returns a trackable holding the model's Keras RNG states (e.g. dropout seeds).

    Keras keeps them in SeedGenerator variables that a tf.train.Checkpoint of the model does
    not reach, so they are checkpointed explicitly: a resumed run continues the random stream.
    """
    module = tf.Module(name="rng")
    module.seed_states = [v.value for v in model.variables if "seed_generator_state" in v.path]
    return module


class Checkpointing:
    """The CheckpointManager of a run (`checkpoints/ckpt-<step>`, keys `step` and `model`).

    Multi-worker: every worker restores the chief's checkpoints in `model_dir`, and every
    worker must take part in each save (the save runs collectives), but only the chief may
    write `model_dir`: a non-chief saves into `write_dir` (its private folder) and deletes the
    copy at once.
    """

    def __init__(
        self, model_dir: str, keep: int, write_dir: str | None = None, **objects: Any
    ) -> None:
        if "step" not in objects or "model" not in objects:
            raise ValueError("the checkpoint needs `step` and `model`")
        self.model_dir = model_dir
        self.write_dir = write_dir or model_dir
        self.step = objects["step"]
        self.model = objects["model"]
        self.checkpoint = tf.train.Checkpoint(**objects)
        self.manager = tf.train.CheckpointManager(
            self.checkpoint,
            model_dir_lib.checkpoint_dir(self.write_dir),
            max_to_keep=keep,
            checkpoint_name="ckpt",
            step_counter=self.step,
        )
        self.saved_step = -1
        self._finite_fn: Any = None

    def restore_latest(self) -> int | None:
        """Restores `model_dir`'s latest checkpoint; returns its step, or None when there is none."""
        path = model_dir_lib.latest_checkpoint(self.model_dir)
        if path is None:
            return None
        self.checkpoint.restore(path).assert_existing_objects_matched()
        self.saved_step = int(self.step.numpy())
        return self.saved_step

    def non_finite_weights(self) -> list[str]:
        """Returns the paths of the model's floating weights holding a NaN or inf.

        One `tf.function` call reduces them all and sends one boolean vector to the host: op by
        op, each weight would be a round trip to the device (~200 on a TPU for ConvNeXt-T).
        """
        weights = [v for v in self.model.weights if tf.as_dtype(v.dtype).is_floating]
        if not weights:
            return []
        if self._finite_fn is None:
            self._finite_fn = tf.function(
                lambda: tf.stack([tf.reduce_all(tf.math.is_finite(v)) for v in weights])
            )
        finite = self._finite_fn().numpy()
        return [v.path for v, ok in zip(weights, finite, strict=True) if not ok]

    def save(self) -> str:
        """Saves a checkpoint named after the current step (once per step).

        Raises:
          NonFiniteWeightsError: a weight is NaN or inf (an update overflowed after a finite
            loss); nothing is written, the previous checkpoint stays the latest.
        """
        step = int(self.step.numpy())
        bad = self.non_finite_weights()
        if bad:
            kept = (
                f"the checkpoint of step {self.saved_step} stays the latest"
                if self.saved_step >= 0
                else "no checkpoint was written"
            )
            raise NonFiniteWeightsError(
                f"weights are NaN or inf after step {step} ({bad[0]}"
                f"{f' and {len(bad) - 1} more' if len(bad) > 1 else ''}): not checkpointed "
                f"({kept}); lower --learning_rate or --weight_decay, or check the data"
            )
        path = self.manager.save(checkpoint_number=step)
        self.saved_step = step
        if self.write_dir != self.model_dir:
            tf.io.gfile.rmtree(model_dir_lib.checkpoint_dir(self.write_dir))
        return path


def check_same_start(strategy: tf.distribute.Strategy, step: int, model_dir: str) -> None:
    """Raises ResumeError unless every worker of a multi-worker run restored step `step`.

    A worker that cannot see the chief's checkpoints (a --model_dir on each machine's own
    disk) would start from scratch beside a resumed chief: weights out of step, or collectives
    that never meet. One all-reduce of (step, step², 1) tells every worker at once.
    """
    if not isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
        return
    value = tf.constant([float(step), float(step) ** 2, 1.0], tf.float64)

    @tf.function
    def total() -> Any:
        def replica() -> tf.Tensor:
            context = tf.distribute.get_replica_context()
            return context.all_reduce(tf.distribute.ReduceOp.SUM, value)

        return strategy.run(replica)

    steps, squares, count = strategy.experimental_local_results(total())[0].numpy()
    mean = steps / count
    if squares / count - mean**2 > 0.25 or abs(mean - step) > 0.5:
        raise ResumeError(
            f"the workers restored different steps (this one {step}, mean over all {mean:.1f}): "
            f"every worker must read the chief's checkpoints in --model_dir {model_dir}; use "
            "storage all workers share (gs://...)"
        )


def last_logged_step(logdir: str) -> int:
    """Returns the largest step with a summary in `logdir`'s event files (-1 if none)."""
    last = -1
    for path in tf.io.gfile.glob(config_lib.join(logdir, "events.out.tfevents.*")):
        try:
            for record in tf.data.TFRecordDataset(path):
                event = tf.compat.v1.Event.FromString(record.numpy())
                if event.HasField("summary"):
                    last = max(last, int(event.step))
        except tf.errors.DataLossError:
            # A file cut short by a kill: the events read before the torn record still count.
            continue
    return last


class ScalarLog:
    """TensorBoard scalars in `logdir` that never repeat a step already on disk.

    `logdir` None writes nothing (a non-chief worker: only the chief writes the logs).
    """

    def __init__(self, logdir: str | None) -> None:
        self.logdir = logdir
        self.skip_through = last_logged_step(logdir) if logdir else -1
        self.writer = tf.summary.create_file_writer(logdir) if logdir else None

    def write(self, step: int, scalars: dict[str, float]) -> bool:
        """Writes the scalars at `step` unless the step was logged before; returns if written."""
        if self.writer is None or step <= self.skip_through:
            return False
        with self.writer.as_default(step=step):
            for name, value in scalars.items():
                tf.summary.scalar(name, value)
        self.writer.flush()
        self.skip_through = step
        return True

    def close(self) -> None:
        """Flushes and closes the event file."""
        if self.writer is not None:
            self.writer.close()
