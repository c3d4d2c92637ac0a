"""The distributed training and validation loops: `strategy.run` inside one `tf.function`.

One call of `TrainLoop.train` runs `num_steps` replica steps in a `tf.range` loop on the
device side (the standard way to keep a TPU busy: the Python host is not involved per step).
Keras' `model.fit` cannot do this with several replicas on TF 2.21 (keras#19246).

Replica step: on-device augmentation (uint8 -> float32) -> model -> loss on the z-scored target
-> gradients -> optimizer update. With XLA on one replica (one GPU) all of it is one compiled
function; with several replicas the gradient all-reduce (a sum, inside the optimizer) cannot
be part of an XLA function, so only augmentation to gradients is compiled. The loss is divided
by the GLOBAL batch, so the summed gradients equal those of one device seeing the whole batch.

Per step nothing goes to the host: the step is the optimizer's own `iterations`, and each
replica adds its statistics to replica-local (sync-on-read) sums that are read once per loop.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable
from typing import Any

import keras
import tensorflow as tf

from boneage_tpu.data import augment
from boneage_tpu.data import pipeline as data
from boneage_tpu.modeling import heads
from boneage_tpu.modeling.optim import per_example_loss

# Features the replicas need; ids (strings) stay on the host because TPUs cannot hold strings.
DEVICE_KEYS = ("image", "male", "boneage", "mask")


@dataclasses.dataclass
class LoopMetrics:
    """Sums over a loop or an evaluation pass, already reduced across replicas."""

    loss_sum: float
    abs_error_sum: float
    count: float
    bad_step: int = -1  # first step whose loss was NaN/inf, -1 if none

    @property
    def loss(self) -> float:
        """Mean per-example loss (z-scored units)."""
        return self.loss_sum / max(self.count, 1.0)

    @property
    def mae_months(self) -> float:
        """Mean absolute error in months."""
        return self.abs_error_sum / max(self.count, 1.0)


def device_features(batch: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
    """Keeps the features the replicas use; a missing `mask` becomes all ones."""
    out = {k: batch[k] for k in DEVICE_KEYS if k in batch}
    if "mask" not in out:
        out["mask"] = tf.ones_like(batch["male"], tf.float32)
    return out


BN_SEED_OFFSET = 7919  # seed stream of the batch-norm recalibration batches


def moving_statistics(model: keras.Model) -> list[Any]:
    """Returns the model's batch-norm moving means and variances (empty: nothing to recalibrate)."""
    return [v for v in model.variables if v.path.endswith(("/moving_mean", "/moving_variance"))]


def skip_together(grads: list[tf.Tensor]) -> list[tf.Tensor]:
    """Makes every replica see a non-finite gradient when any replica has one (fp16).

    Keras 3's LossScaleOptimizer decides "finite -> apply, else skip and halve the scale" from
    the gradients it is given, which under tf.distribute are each replica's own, not yet
    all-reduced ones: MirroredStrategy takes replica 0's verdict for all (`_tf_apply`), other
    strategies let each replica decide alone. A replica that overflowed alone would then have
    its inf summed into the update of every replica. One all-reduced "any replica non-finite"
    flag, folded into the first gradient as NaN, gives every replica the same verdict: the
    step is skipped everywhere and the scale is halved once. Call in replica context.
    """
    context = tf.distribute.get_replica_context()
    if context is None or context.num_replicas_in_sync == 1 or not grads:
        return grads
    finite = tf.reduce_all([tf.reduce_all(tf.math.is_finite(g)) for g in grads])
    bad_replicas = context.all_reduce(
        tf.distribute.ReduceOp.SUM, tf.cast(tf.logical_not(finite), tf.float32)
    )
    poison = tf.where(bad_replicas > 0, float("nan"), 0.0)
    return [grads[0] + tf.cast(poison, grads[0].dtype), *grads[1:]]


class TrainLoop:
    """Compiled training and validation loops for one model, optimizer and strategy."""

    def __init__(
        self,
        strategy: tf.distribute.Strategy,
        model: keras.Model,
        optimizer: keras.optimizers.Optimizer,
        *,
        global_batch: int,
        label_std: float,
        label_mean: float = 0.0,
        loss: str = "l1",
        augment_config: augment.AugmentConfig | None = None,
        seed: int = 0,
        jit_compile: bool = False,
        warp: str = "gather",
    ) -> None:
        """Builds the loops; `optimizer` must already be built (variables created).

        Args:
          strategy: the distribution strategy the model and optimizer were created under.
          model: the Keras model (outputs months).
          optimizer: a built Keras optimizer (LossScaleOptimizer for fp16); its `iterations`
            (applied updates) is the training step.
          global_batch: batch size over all replicas (the loss divisor).
          label_std: training label std in months (z-scores the error).
          label_mean: training label mean in months (z-scores the bins head's target).
          loss: "l1", "mse" or "huber".
          augment_config: on-device augmentation; None disables it.
          seed: global seed for the stateless augmentation RNG.
          jit_compile: XLA-compile the replica step: all of it on one replica, augment +
            forward + loss + gradients with several.
          warp: the augmentation's `warp.warp_affine` method ("matmul" on TPU).
        """
        self.strategy = strategy
        self.model = model
        self.optimizer = optimizer
        self.global_batch = global_batch
        self.label_std = float(label_std)
        self.label_mean = float(label_mean)
        self.loss_name = loss
        self.augment_config = augment_config
        self.seed = seed
        self.jit_compile = jit_compile
        # The bins head trains on its logits too (cross-entropy to a Gaussian target).
        self.logits_model = heads.with_logits(model)
        self.warp = warp
        # Without XLA a nested tf.function only adds graph-inlining work (it is traced once per
        # replica), so the plain methods are used; with XLA they are the compiled units.
        whole_step = jit_compile and strategy.num_replicas_in_sync == 1
        self.gradients = (
            tf.function(self._gradients, jit_compile=True)
            if jit_compile and not whole_step
            else self._gradients
        )
        self.replica_step = (
            tf.function(self._replica_step, jit_compile=True) if whole_step else self._replica_step
        )
        self.replicas = replicas = strategy.num_replicas_in_sync
        with strategy.scope():
            # Each replica adds to its own copy (no communication per step); a read in
            # cross-replica context sums the copies, once per loop.
            self._totals = tf.Variable(
                tf.zeros([3]),
                trainable=False,
                synchronization=tf.VariableSynchronization.ON_READ,
                aggregation=tf.VariableAggregation.SUM,
                name="loop_totals",
            )
            # The first step whose loss was not finite, per replica in its own slot (0: none).
            self._first_bad = tf.Variable(
                tf.zeros([replicas]),
                trainable=False,
                synchronization=tf.VariableSynchronization.ON_READ,
                aggregation=tf.VariableAggregation.SUM,
                name="loop_first_bad",
            )
        self._train_fn = tf.function(self._train_loop)
        self._eval_fn = tf.function(self._eval_loop)
        self._recalibrate_fn = tf.function(self._recalibrate_loop)
        # Batch-norm moving statistics: each replica updates its own copy from its own batch.
        self.moving_statistics = moving_statistics(model)
        self._sync_fn = tf.function(self._sync_statistics)

    def batch_stats(
        self, months: tf.Tensor, batch: dict[str, tf.Tensor]
    ) -> tuple[tf.Tensor, tf.Tensor]:
        """Returns one batch's masked per-example loss [B] and its [loss, abs-error, count] sums.

        The one definition of the statistics, for training and validation alike; `LoopMetrics`
        turns their sums into means.
        """
        target = tf.cast(batch["boneage"], tf.float32)
        mask = tf.cast(batch["mask"], tf.float32)
        per_example = per_example_loss(self.loss_name, (months - target) / self.label_std) * mask
        stats = tf.stack(
            [
                tf.reduce_sum(per_example),
                tf.reduce_sum(tf.abs(months - target) * mask),
                tf.reduce_sum(mask),
            ]
        )
        return per_example, stats

    def _sync_statistics(self) -> None:
        def replica_means() -> list[tf.Tensor]:
            context = tf.distribute.get_replica_context()
            values = [tf.identity(v.value) for v in self.moving_statistics]
            return context.all_reduce(tf.distribute.ReduceOp.MEAN, values)

        means = self.strategy.run(replica_means)
        for variable, mean in zip(self.moving_statistics, means, strict=True):
            # A cross-replica assign writes every local copy; the mean is the same on all hosts.
            variable.value.assign(self.strategy.experimental_local_results(mean)[0])

    def sync_batch_norm(self) -> None:
        """Sets every replica's batch-norm moving statistics to their mean over all replicas.

        Call before each checkpoint, validation and export: checkpoints and exports save one
        copy (replica 0's), and validation runs on every replica's own copy.
        """
        if self.strategy.num_replicas_in_sync > 1 and self.moving_statistics:
            self._sync_fn()

    def _gradients(
        self, batch: dict[str, tf.Tensor], seed: tf.Tensor
    ) -> tuple[list[tf.Tensor], tf.Tensor]:
        """Augment + forward + loss + gradients for one replica's batch (XLA-compilable)."""
        if self.augment_config is not None:
            images = augment.augment_batch(batch["image"], seed, self.augment_config, self.warp)
        else:
            images = augment.to_float(batch["image"])
        inputs = {"image": images, "male": batch["male"]}
        with tf.GradientTape() as tape:
            if self.logits_model is None:
                months = tf.cast(self.model(inputs, training=True), tf.float32)
                per_example, stats = self.batch_stats(months, batch)
            else:
                months, logits = self.logits_model(inputs, training=True)
                months = tf.cast(months, tf.float32)
                per_example, stats = self.batch_stats(months, batch)
                # The bins head also learns the distribution (its logged loss is the L1 part).
                z = (tf.cast(batch["boneage"], tf.float32) - self.label_mean) / self.label_std
                per_example += heads.bins_loss(logits, z) * tf.cast(batch["mask"], tf.float32)
            loss = tf.reduce_sum(per_example) / self.global_batch
            scaled = self.optimizer.scale_loss(loss)
        grads = tape.gradient(scaled, self.model.trainable_variables)
        return grads, stats

    def _replica_step(self, batch: dict[str, tf.Tensor]) -> None:
        context = tf.distribute.get_replica_context()
        replica_id = context.replica_id_in_sync_group
        # The optimizer's own step count, read on this replica: no cross-replica read.
        step = tf.cast(self.optimizer.iterations, tf.int64)
        seed = augment.replica_seed(self.seed, step, replica_id)
        grads, stats = self.gradients(batch, seed)
        if isinstance(self.optimizer, keras.optimizers.LossScaleOptimizer):
            grads = skip_together(grads)
        self.optimizer.apply_gradients(zip(grads, self.model.trainable_variables, strict=True))
        self._totals.assign_add(stats)
        # Steps count from 1 here (the step that this update completes), as the loop reports.
        slot = tf.one_hot(replica_id, self.replicas)
        first = (slot > 0) & (self._first_bad == 0) & tf.logical_not(tf.math.is_finite(stats[0]))
        self._first_bad.assign(tf.where(first, tf.cast(step + 1, tf.float32), self._first_bad))

    def _train_loop(self, iterator: Any, num_steps: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        self._totals.assign(tf.zeros([3]))
        self._first_bad.assign(tf.zeros([self.replicas]))
        # No `break` on a non-finite loss: a loop condition on device results would make the
        # host wait for every step before queueing the next one, which idles a TPU. The caller
        # stops after the loop.
        for _ in tf.range(num_steps):
            self.strategy.run(self.replica_step, args=(next(iterator),))
        return self._totals.read_value(), self._first_bad.read_value()

    def _recalibrate_replica(self, batch: dict[str, tf.Tensor], index: tf.Tensor) -> tf.Tensor:
        replica_id = tf.distribute.get_replica_context().replica_id_in_sync_group
        # Another seed stream than the training steps': these batches teach nothing.
        seed = augment.replica_seed(self.seed + BN_SEED_OFFSET, index, replica_id)
        if self.augment_config is not None:
            images = augment.augment_batch(batch["image"], seed, self.augment_config, self.warp)
        else:
            images = augment.to_float(batch["image"])
        self.model({"image": images, "male": batch["male"]}, training=True)
        return tf.zeros([])

    def _recalibrate_loop(self, iterator: Any, num_batches: tf.Tensor) -> None:
        for i in tf.range(num_batches):
            self.strategy.run(self._recalibrate_replica, args=(next(iterator), i))

    def recalibrate_batch_norm(self, iterator: Any, num_batches: int) -> None:
        """Re-estimates the batch-norm moving statistics at the current weights ("precise BN").

        The moving averages that training keeps mix statistics of weights from many steps
        ago; early in a run at a high learning rate they lag far behind the weights (on real
        radiographs a resnet_small validated at +26 months bias with them, unbiased after
        this). Runs `num_batches` augmented training batches forward in training mode, no
        gradients: with momentum 0.9, 50 batches leave under 1 % of the old statistics.
        """
        if num_batches > 0 and self.moving_statistics:
            self._recalibrate_fn(iterator, tf.constant(num_batches, tf.int64))

    def train(self, iterator: Any, num_steps: int) -> LoopMetrics:
        """Runs `num_steps` training steps; returns the summed loss/error over them."""
        totals, first_bad = self._train_fn(iterator, tf.constant(num_steps, tf.int64))
        loss_sum, abs_sum, count = (float(v) for v in totals.numpy())
        bad = [int(v) for v in first_bad.numpy() if v > 0]
        return LoopMetrics(loss_sum, abs_sum, count, min(bad) if bad else -1)

    def _eval_replica(self, batch: dict[str, tf.Tensor]) -> tf.Tensor:
        months = tf.cast(
            self.model(
                {"image": augment.to_float(batch["image"]), "male": batch["male"]}, training=False
            ),
            tf.float32,
        )
        return self.batch_stats(months, batch)[1]

    def _eval_loop(self, iterator: Any) -> tf.Tensor:
        totals = tf.zeros([3], tf.float32)
        more = tf.constant(True)
        # `next(iterator)` until a step whose batches are all padding on every replica: the
        # reduced count is the same on every host, so all hosts run the same number of steps
        # (`for batch in dataset` over a distributed dataset inside a tf.function is not
        # supported for multi-worker strategies, and hosts' batch counts differ).
        while more:
            per_replica = self.strategy.run(self._eval_replica, args=(next(iterator),))
            stats = self.strategy.reduce(tf.distribute.ReduceOp.SUM, per_replica, axis=None)
            totals += stats
            more = stats[2] > 0
        return totals

    def evaluate(self, dataset: Any) -> LoopMetrics:
        """One pass over an evaluation dataset of `distribute(..., training=False)`.

        Its stream per replica is the data, then endless all-masked batches: the pass ends at
        the first step that is all padding everywhere (padding rows carry mask 0).
        """
        with warnings.catch_warnings():
            # tf.data warns about options when a distributed dataset is iterated in a graph;
            # the options are ours and known, so the warning only adds noise.
            warnings.filterwarnings("ignore", message="To make it possible to preserve tf.data")
            totals = self._eval_fn(iter(dataset))
        loss_sum, abs_sum, count = (float(v) for v in totals.numpy())
        return LoopMetrics(loss_sum, abs_sum, count)


def distribute(
    strategy: tf.distribute.Strategy,
    dataset_fn: Callable[[tf.distribute.InputContext], tf.data.Dataset],
    *,
    per_replica_batch: int,
    training: bool,
) -> Any:
    """Distributes per-replica-batch datasets with one pipeline per host.

    Checks the batch dimension the function produces, keeps only the device features and, for
    evaluation, follows the data with endless all-masked batches (`TrainLoop.evaluate`).
    """

    def fn(context: tf.distribute.InputContext) -> tf.data.Dataset:
        dataset = dataset_fn(context)
        batch_dim = dataset.element_spec["image"].shape[0]
        if batch_dim is not None and batch_dim != per_replica_batch:
            raise ValueError(
                f"the input function made batches of {batch_dim}, expected the per-replica "
                f"batch {per_replica_batch}"
            )
        dataset = dataset.map(device_features)
        if not training:
            dataset = data.then_empty_batches(dataset, per_replica_batch)
        return dataset.prefetch(tf.data.AUTOTUNE)

    return strategy.distribute_datasets_from_function(fn)
