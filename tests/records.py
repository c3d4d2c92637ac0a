"""Writes tiny TFRecord datasets in the converter's format, for fast unit tests.

Independent of the converter (`boneage_tpu.convert`) on purpose: reader, trainer and evaluator
tests use it to get a valid data folder (shards + manifest.json) in milliseconds, with a simple learnable
signal (a bright bar whose length grows with age).
"""

from __future__ import annotations

import hashlib
import io
import json
import pathlib

import numpy as np
import tensorflow as tf
from PIL import Image

from boneage_tpu import __version__
from boneage_tpu.core import schema


def toy_image(age_months: float, male: bool, height: int, width: int) -> np.ndarray:
    """Returns a uint8 image whose bar length encodes age and whose corner dot encodes sex."""
    image = np.full((height, width), 20, np.uint8)
    length = max(1, int(round((height - 4) * age_months / schema.MAX_AGE_MONTHS)))
    x0 = width // 2 - max(1, width // 10)
    image[height - 2 - length : height - 2, x0 : x0 + max(2, width // 5)] = 220
    if male:
        image[1:4, 1:4] = 255
    return image


def _png(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image, mode="L").save(buf, format="PNG")
    return buf.getvalue()


def write_toy_dataset(
    output: str | pathlib.Path,
    *,
    splits: dict[str, int] | None = None,
    height: int = 40,
    width: int = 32,
    shards_per_split: int = 2,
    seed: int = 0,
    labeled: bool = True,
    encoding: str = "png",
) -> dict:
    """Writes shards + manifest.json for a toy dataset and returns the manifest.

    Args:
      output: folder to write into (created).
      splits: split name -> number of records; default {"train": 24, "val": 10}.
      height: stored image height (the longest side, like the converter's image_size).
      width: stored image width.
      shards_per_split: shards per split; records are dealt round-robin.
      seed: RNG seed for ages and sexes.
      labeled: False writes unlabeled records (RSNA test layout).
      encoding: "png" or "raw" (uncompressed pixels, read back with the stored height/width).
    """
    output = str(output)
    tf.io.gfile.makedirs(output)
    splits = splits or {"train": 24, "val": 10}
    rng = np.random.default_rng(seed)
    encoders = {"png": _png, "raw": lambda image: image.tobytes()}
    if encoding not in encoders:
        raise ValueError(f"encoding must be one of {sorted(encoders)}, got {encoding!r}")
    encode = encoders[encoding]
    manifest_splits = {}
    train_ages: list[float] = []
    for split, count in splits.items():
        ages = rng.integers(1, 229, size=count).astype(float)
        males = rng.random(count) < 0.54
        shards: list[list[bytes]] = [[] for _ in range(shards_per_split)]
        for i, (age, male) in enumerate(zip(ages, males, strict=True)):
            record = schema.encode_example(
                image_id=f"{split}{i:04d}",
                image=encode(toy_image(age, bool(male), height, width)),
                height=height,
                width=width,
                encoding=encoding,
                boneage=float(age) if labeled else None,
                male=bool(male),
            )
            shards[i % shards_per_split].append(record)
        shard_entries = []
        for index, records in enumerate(shards):
            name = schema.shard_name(split, index, shards_per_split)
            with tf.io.TFRecordWriter(f"{output}/{name}") as writer:
                for record in records:
                    writer.write(record)
            with tf.io.gfile.GFile(f"{output}/{name}", "rb") as f:
                written = f.read()
            shard_entries.append(
                {
                    "name": name,
                    "records": len(records),
                    "bytes": len(written),
                    "sha256": hashlib.sha256(written).hexdigest(),
                }
            )
        strata = [0] * schema.NUM_STRATA
        bands = dict.fromkeys(schema.AGE_BAND_NAMES, 0)
        for age, male in zip(ages, males, strict=True):
            strata[schema.stratum(age, male)] += 1
            bands[schema.AGE_BAND_NAMES[schema.age_band(age)]] += 1
        manifest_splits[split] = {
            "count": count,
            "labeled": count if labeled else 0,
            "shards": shard_entries,
            "counts_by_sex": {"male": int(males.sum()), "female": int((~males).sum())},
            "counts_by_age_band": bands,
            "counts_by_stratum": strata,
        }
        if split == "train" or not train_ages:
            train_ages = list(ages)
    manifest = {
        "schema_version": schema.SCHEMA_VERSION,
        "tool_version": __version__,
        "layout": "kaggle",
        "image_size": max(height, width),
        "encoding": encoding,
        "splits": manifest_splits,
        "label_stats": {
            "mean_months": float(np.mean(train_ages)),
            "std_months": float(np.std(train_ages)),
            "split": "train",
        },
        "skipped": [],
    }
    with tf.io.gfile.GFile(f"{output}/{schema.MANIFEST_NAME}", "w") as f:
        json.dump(manifest, f, indent=2)
    return manifest
