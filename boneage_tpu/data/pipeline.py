"""tf.data input pipeline: TFRecord shards -> uint8 batches at the training size.

The host only reads, decodes and resizes; augmentation runs on the accelerator
(`boneage_tpu.data.augment`). Shards, counts, strata and the stored encoding come from the
converter's manifest via `boneage_tpu.core.schema`. All reads go through tf.data / tf.io.gfile, so
local folders and gs:// behave the same.

`fit_to_square` and `decode_image_bytes` are also the serving preprocessing (SavedModel
signature, `predict`): training and serving resize with the same code.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import tensorflow as tf
from absl import logging

from boneage_tpu.core import schema
from boneage_tpu.core.errors import ConfigError
from boneage_tpu.data import sampling

BALANCE_MODES = ("none", "age_sex")
CACHE_MODES = ("auto", "yes", "no")
# cache="auto" keeps the decoded split in RAM when this pipeline's share of it
# (records / input pipelines x image_size^2 bytes) fits: RSNA's 12.6k training images are
# 1.1 GB at 299 px (cached) and 3.3 GB at 512 px (streamed).
CACHE_BUDGET_BYTES = 2 * 1024**3
# Host memory is bounded by these, not by the dataset: SHUFFLE_BUFFER encoded records (~40 kB
# each at 512 px JPEG; decoded S x S images when cached) plus one read buffer per open shard.
# Buffered records cost ~3x their size in RSS (allocator fragmentation): 1024 of them took
# ~110 MB more than 64 on RSNA-size records. The converter shuffles records within shards and
# shard order is reshuffled every pass, so a small record buffer suffices.
SHUFFLE_BUFFER = 256
READ_BUFFER_BYTES = 1024**2  # per open shard (8 MB buffers cost ~130 MB more RSS with 8 shards).
MAX_PARALLEL_SHARDS = 16  # shards read concurrently (interleave cycle length).
BALANCE_SHUFFLE_FACTOR = 4  # balance="age_sex" shuffles over this x shuffle_buffer records.


def fit_to_square(image: tf.Tensor, size: int) -> tf.Tensor:
    """Resizes uint8 [H, W, 1] to fit in size x size (aspect kept) and centre-pads with 0.

    Shrinking averages areas (antialiased, and 3.5x faster than antialiased bilinear: 0.36 vs
    1.27 ms for a 394x512 image on one core, where the JPEG decode takes 0.6 ms); enlarging is
    bilinear. An image whose longer side is already `size` is only padded.

    Returns:
      uint8 [size, size, 1].
    """
    shape = tf.shape(image)
    height, width = shape[0], shape[1]
    longest = tf.maximum(height, width)
    scale = size / tf.cast(longest, tf.float64)
    new_height = tf.maximum(1, tf.cast(tf.round(tf.cast(height, tf.float64) * scale), tf.int32))
    new_width = tf.maximum(1, tf.cast(tf.round(tf.cast(width, tf.float64) * scale), tf.int32))
    new_shape = tf.stack([new_height, new_width])

    def resize(method: str) -> tf.Tensor:
        resized = tf.image.resize(image, new_shape, method=method)
        return tf.saturate_cast(tf.round(resized), tf.uint8)

    image = tf.case(
        [(longest > size, lambda: resize("area")), (longest < size, lambda: resize("bilinear"))],
        default=lambda: tf.cast(image, tf.uint8),
    )
    top = (size - new_height) // 2
    left = (size - new_width) // 2
    padded = tf.pad(
        image, [[top, size - new_height - top], [left, size - new_width - left], [0, 0]]
    )
    return tf.ensure_shape(padded, [size, size, 1])


def decode_image_bytes(image_bytes: tf.Tensor, size: int) -> tf.Tensor:
    """Decodes one PNG or JPEG (any size, 8 or 16 bit) to grey and fits it: uint8 [S, S, 1]."""
    image = tf.io.decode_image(image_bytes, channels=1, dtype=tf.uint8, expand_animations=False)
    return fit_to_square(image, size)


def _decode_stored(
    image: tf.Tensor, encoding: str, height: tf.Tensor | int, width: tf.Tensor | int
) -> tf.Tensor:
    """Decodes a stored image (the record's `image` feature) to uint8 [H, W, 1]."""
    if encoding == "raw":
        pixels = tf.io.decode_raw(image, tf.uint8)
        return tf.reshape(pixels, tf.cast(tf.stack([height, width, 1]), tf.int32))
    if encoding == "jpeg":
        # Same libjpeg defaults (accurate integer IDCT) as decode_image in decode_image_bytes:
        # served JPEGs decode to exactly the training pixels (tested).
        return tf.io.decode_jpeg(image, channels=1)
    if encoding == "png":
        return tf.io.decode_png(image, channels=1)
    raise ConfigError(f"encoding must be one of {schema.ENCODINGS}, got {encoding!r}")


def decode_stored_image(
    image: tf.Tensor,
    encoding: str,
    height: tf.Tensor | int,
    width: tf.Tensor | int,
    image_size: int,
) -> tf.Tensor:
    """Decodes an image stored as the converter stores it and fits it: uint8 [S, S, 1].

    Args:
      image: scalar string, the record's `image` feature (or the same bytes made by
        `boneage_tpu.data.images.prepare` at predict time).
      encoding: jpeg | png | raw (the manifest's `encoding`).
      height: stored height (used by raw).
      width: stored width (used by raw).
      image_size: output side S.
    """
    return fit_to_square(_decode_stored(image, encoding, height, width), image_size)


def parse_records(
    serialized: tf.Tensor, image_size: int, encoding: str, with_stratum: bool = False
) -> dict[str, tf.Tensor]:
    """Parses and decodes a batch of serialized records into one batch of pipeline elements.

    A whole batch per call: tf.data then hands over one element per batch instead of per
    image (each handover is a thread wake-up; per image they cost ~5 % of a 2-core host).

    Args:
      serialized: string [N], N >= 1 records.
      image_size: output side S.
      encoding: the manifest's image encoding (jpeg | png | raw).
      with_stratum: also return the int64 "stratum" [N] (for balancing cached elements).

    Returns:
      {"image": uint8 [N, S, S, 1], "male", "boneage", "mask": float32 [N], "id": string [N]}
      (+ "stratum"), with N static when `serialized`'s length is.
    """
    # Only the features used: parsing all nine cost ~5 us more per record.
    names = ["image", "male", "boneage", "id"] + (["height", "width"] if encoding == "raw" else [])
    names += ["stratum"] if with_stratum else []
    spec = schema.feature_spec()
    features = tf.io.parse_example(serialized, {name: spec[name] for name in names})
    sizes = (features["height"], features["width"]) if encoding == "raw" else None

    def decode(args: tuple[tf.Tensor, ...]) -> tf.Tensor:
        image, height, width = args if sizes else (args[0], 0, 0)
        return decode_stored_image(image, encoding, height, width, image_size)

    images = tf.map_fn(
        decode,
        (features["image"], *sizes) if sizes else (features["image"],),
        fn_output_signature=tf.TensorSpec([image_size, image_size, 1], tf.uint8),
        # One image at a time: tf.data already runs several batches in parallel.
        parallel_iterations=1,
    )
    batch = {
        "image": images,
        "male": tf.cast(features["male"], tf.float32),
        "boneage": features["boneage"],
        "id": features["id"],
        "mask": tf.ones_like(features["boneage"]),
    }
    if with_stratum:
        batch["stratum"] = features["stratum"]
    return batch


def use_cache(
    cache: str,
    split: Mapping[str, Any],
    image_size: int,
    num_pipelines: int = 1,
    budget_bytes: int = CACHE_BUDGET_BYTES,
) -> bool:
    """Decides whether to keep the decoded split in RAM (see `CACHE_BUDGET_BYTES`)."""
    if cache not in CACHE_MODES:
        raise ConfigError(f"cache must be one of {CACHE_MODES}, got {cache!r}")
    if cache != "auto":
        return cache == "yes"
    needed = math.ceil(split["count"] / num_pipelines) * image_size * image_size
    return needed <= budget_bytes


# Values of padding rows (their mask is 0, so no metric sees them).
PAD_VALUES = {"image": 0, "male": 0.0, "boneage": schema.NO_LABEL, "id": "", "mask": 0.0}


def pad_rows(batch: dict[str, tf.Tensor], size: int) -> dict[str, tf.Tensor]:
    """Pads every feature along axis 0 to `size` rows of `PAD_VALUES` (mask 0).

    The one place evaluation padding is made: the final partial batch of a split and the
    all-masked batches that follow a host's evaluation data (`then_empty_batches`) both use it.
    """
    missing = size - tf.shape(batch["mask"])[0]
    out = {}
    for name, value in batch.items():
        paddings = [[0, missing]] + [[0, 0]] * (value.shape.rank - 1)
        padded = tf.pad(value, paddings, constant_values=PAD_VALUES[name])
        out[name] = tf.ensure_shape(padded, [size, *value.shape[1:]])
    return out


def then_empty_batches(dataset: tf.data.Dataset, batch_size: int) -> tf.data.Dataset:
    """Follows a finite batched dataset with endless all-masked batches of `batch_size` rows.

    Hosts (and the replicas of one host) hold different numbers of evaluation batches; a
    replica without data would stall the all-reduce, and TPUs need static shapes. With this
    stream every replica gets a full batch on every step, and the evaluation loop ends at the
    first step whose batches are all padding on every replica (`train.loop.TrainLoop`).
    """
    empty = (
        dataset.take(1)
        .map(lambda batch: pad_rows({k: v[:0] for k, v in batch.items()}, batch_size))
        .cache()  # One read of the first batch per pass, not one per padding step.
        .repeat()
    )
    return dataset.concatenate(empty)


def _shard_files(
    files: list[str], split: str, input_context: tf.distribute.InputContext | None
) -> list[str]:
    """Returns this input pipeline's shards: a static, disjoint slice of the split's shards."""
    if input_context is None or input_context.num_input_pipelines == 1:
        return files
    pipelines = input_context.num_input_pipelines
    if len(files) < pipelines:
        raise ConfigError(
            f"split {split!r} has {len(files)} shards, fewer than the {pipelines} input "
            "pipelines: re-run boneage-make-tfrecords with at least that many shards"
        )
    return files[input_context.input_pipeline_id :: pipelines]


def build_dataset(
    data_dir: str,
    split: str,
    *,
    training: bool,
    batch_size: int,
    image_size: int,
    input_context: tf.distribute.InputContext | None = None,
    seed: int = 0,
    balance: str = "none",
    cache: str = "auto",
    manifest: dict | None = None,
    shuffle_buffer: int = SHUFFLE_BUFFER,
    cache_budget_bytes: int = CACHE_BUDGET_BYTES,
) -> tf.data.Dataset:
    """Builds the training or evaluation dataset of one split for one input pipeline.

    Args:
      data_dir: folder written by boneage-make-tfrecords (local or gs://).
      split: split name in the manifest, e.g. "train".
      training: True: shuffled, infinite, drop_remainder. False: every record of this
        pipeline's shards exactly once, in a deterministic order, the final batch padded.
      batch_size: PER-REPLICA batch size.
      image_size: output side S (aspect-preserving resize, centre pad with 0).
      input_context: from `strategy.distribute_datasets_from_function`; shards are split
        between input pipelines (one per host on a multi-host TPU).
      seed: seed of the shard order, record shuffle and balanced resampling.
      balance: "none" or "age_sex" (strata age band x sex drawn uniformly; training only).
      cache: "auto" (see `CACHE_BUDGET_BYTES`), "yes" or "no": keep decoded images in RAM.
      manifest: the parsed manifest, to skip reading it again.
      shuffle_buffer: records in the shuffle buffer (training).
      cache_budget_bytes: the RAM budget of cache="auto".

    Returns:
      Batches of {"image": uint8 [B, S, S, 1], "male", "boneage", "mask": float32 [B],
      "id": string [B]} with a static batch dimension B in both modes; "mask" is 0 on the
      padding of the final eval batch.
    """
    if balance not in BALANCE_MODES:
        raise ConfigError(f"balance must be one of {BALANCE_MODES}, got {balance!r}")
    if balance != "none" and not training:
        raise ConfigError("balance is for training only: evaluation must see the split as it is")
    if batch_size < 1 or image_size < 1:
        raise ConfigError(f"batch_size and image_size must be >= 1, got {batch_size}, {image_size}")
    manifest = manifest if manifest is not None else schema.read_manifest(data_dir)
    info = schema.split_info(manifest, split)
    encoding = manifest.get("encoding", "")
    if encoding not in schema.ENCODINGS:
        raise schema.ManifestError(f"manifest encoding {encoding!r} not in {schema.ENCODINGS}")
    repeats = None
    if balance == "age_sex":
        if info.get("labeled", info["count"]) < info["count"]:
            raise ConfigError(f"balance='age_sex' needs every record of {split!r} labeled")
        repeats = sampling.stratum_repeats(list(info["counts_by_stratum"]))
    files = _shard_files(schema.shard_paths(data_dir, manifest, split), split, input_context)
    pipelines = input_context.num_input_pipelines if input_context else 1
    cached = use_cache(cache, info, image_size, pipelines, cache_budget_bytes)
    logging.info(
        "input %s/%s: %d shards, training=%s, cache=%s, balance=%s",
        data_dir,
        split,
        len(files),
        training,
        cached,
        balance,
    )

    carry_stratum = cached and repeats is not None

    def parse(serialized: tf.Tensor) -> dict[str, tf.Tensor]:
        return parse_records(serialized, image_size, encoding, with_stratum=carry_stratum)

    ds = _read_records(files, training, seed)
    if cached:
        # Decode once (a batch per call), then every later pass reads S x S uint8 images
        # from RAM.
        ds = ds.batch(batch_size).map(
            parse, num_parallel_calls=tf.data.AUTOTUNE, deterministic=not training
        )
        ds = ds.unbatch().cache()
    if training:
        ds = _training_order(ds, repeats, seed, shuffle_buffer, carry_stratum)
        # drop_remainder: a static batch dimension, which XLA / TPU compilation needs.
        ds = ds.batch(batch_size, drop_remainder=True)
        if not cached:
            # Parse + decode + resize a batch of records per call, batches in parallel on
            # the host cores; uint8 out: 4x less host->device traffic than float32.
            ds = ds.map(parse, num_parallel_calls=tf.data.AUTOTUNE, deterministic=False)
    else:
        # Keep the last partial batch, padded to B with mask 0: every record seen once.
        def finish(batch: Any) -> dict[str, tf.Tensor]:
            return pad_rows(batch if cached else parse(batch), batch_size)

        ds = ds.batch(batch_size).map(finish, num_parallel_calls=tf.data.AUTOTUNE)
    # Overlap host preprocessing with the device step.
    ds = ds.prefetch(tf.data.AUTOTUNE)
    options = tf.data.Options()
    options.deterministic = not training
    return ds.with_options(options)


def _read_records(files: list[str], training: bool, seed: int) -> tf.data.Dataset:
    """Streams the serialized records of `files` (one pass; shard order shuffled in training)."""
    ds = tf.data.Dataset.from_tensor_slices(files)
    if training:
        # Shard order reshuffled every pass, so the interleave mixes different shards.
        ds = ds.shuffle(len(files), seed=seed, reshuffle_each_iteration=True)
    # Several shards read concurrently: hides gs:// latency. Order is only kept
    # (deterministic) for evaluation; training takes whichever shard is ready.
    return ds.interleave(
        lambda path: tf.data.TFRecordDataset(path, buffer_size=READ_BUFFER_BYTES),
        cycle_length=min(len(files), MAX_PARALLEL_SHARDS),
        num_parallel_calls=tf.data.AUTOTUNE,
        deterministic=not training,
    )


def _training_order(
    ds: tf.data.Dataset,
    repeats: list[float] | None,
    seed: int,
    shuffle_buffer: int,
    carry_stratum: bool,
) -> tf.data.Dataset:
    """Shuffles and repeats forever; with `repeats`, also resamples strata uniformly."""
    if repeats is None:
        # Shuffle before repeat: every record once per pass, passes do not blend.
        return ds.shuffle(shuffle_buffer, seed=seed, reshuffle_each_iteration=True).repeat()
    if carry_stratum:
        stratum_of = lambda chunk: chunk["stratum"]  # noqa: E731
        strip = lambda chunk: {k: v for k, v in chunk.items() if k != "stratum"}  # noqa: E731
    else:
        stratum_of, strip = sampling.parse_strata, lambda chunk: chunk
    # Resample after repeat (the stream must not end mid-chunk). A record's copies arrive
    # together (~28 of each 0-2 y girl on RSNA); a larger buffer spreads them. Simulated with
    # RSNA's strata, batches of 32 hold 3.0 repeated samples with a 256 buffer, 1.0 with 1024.
    ds = sampling.resample_uniform(ds.repeat(), repeats, seed, stratum_of, strip)
    return ds.shuffle(BALANCE_SHUFFLE_FACTOR * shuffle_buffer, seed=seed + 1)
