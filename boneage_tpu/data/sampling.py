"""Balanced "multiple sampling": strata (age band x sex) drawn uniformly from one stream.

Each record is emitted a random number of times whose mean equalises the strata (rare strata
repeated, common ones subsampled), so a balanced pass reads the data once, like an unbalanced
epoch; filtering one dataset per stratum would read every shard once per stratum.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import tensorflow as tf

from boneage_tpu.core import schema
from boneage_tpu.core.errors import ConfigError

RESAMPLE_CHUNK = 256  # records per vectorised resampling step.


def parse_strata(serialized: tf.Tensor) -> tf.Tensor:
    """Reads only the stratum ids of a batch of serialized records (int64 [N])."""
    spec = {"stratum": schema.feature_spec()["stratum"]}
    return tf.io.parse_example(serialized, spec)["stratum"]


def stratum_repeats(counts_by_stratum: list[int]) -> list[float]:
    """Returns the expected copies per record of each stratum that make strata uniform.

    Each non-empty stratum then contributes total/K records per pass (K non-empty strata):
    rare strata are repeated ("multiple sampling"), common ones subsampled, and a pass costs
    the same reads as an unbalanced epoch.
    """
    nonempty = [c for c in counts_by_stratum if c > 0]
    if not nonempty:
        raise ConfigError("balance='age_sex' needs labeled records; the split has none")
    per_stratum = sum(nonempty) / len(nonempty)
    return [per_stratum / c if c > 0 else 0.0 for c in counts_by_stratum]


def resample_uniform(
    dataset: tf.data.Dataset,
    repeats: list[float],
    seed: int,
    stratum_of: Callable[[Any], tf.Tensor],
    strip: Callable[[Any], Any],
) -> tf.data.Dataset:
    """Resamples an infinite stream so strata come out uniformly (vectorised per chunk).

    Args:
      dataset: infinite stream of elements.
      repeats: expected copies per record, indexed by stratum id (`stratum_repeats`).
      seed: RNG seed; the draws are stateless, keyed by (seed, chunk index).
      stratum_of: batched element -> int64 [N] stratum ids.
      strip: batched element -> the part to emit (drops the stratum when it was carried).
    """
    table = tf.constant(repeats, tf.float32)

    def resample(index: tf.Tensor, chunk: Any) -> Any:
        expected = tf.gather(table, stratum_of(chunk))
        u = tf.random.stateless_uniform(
            tf.shape(expected), seed=tf.stack([tf.constant(seed, tf.int64), index])
        )
        # floor(w) copies plus one more with probability frac(w): the mean is exactly w.
        copies = tf.cast(
            tf.floor(expected) + tf.cast(u < expected - tf.floor(expected), tf.float32), tf.int32
        )
        return tf.nest.map_structure(lambda t: tf.repeat(t, copies, axis=0), strip(chunk))

    return (
        dataset.batch(RESAMPLE_CHUNK)
        .enumerate()
        .map(resample, num_parallel_calls=tf.data.AUTOTUNE)
        .unbatch()
    )
