"""The one TFRecord schema and manifest format, shared by the converter and every reader.

Writer (`boneage-make-tfrecords`) and readers (`boneage_tpu.data.pipeline`, evaluation, TFDS) take the
feature names, types and the stratum definition from here and nowhere else.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import tensorflow as tf

from boneage_tpu.core import guard
from boneage_tpu.core.errors import Error

SCHEMA_VERSION = 1
MANIFEST_NAME = "manifest.json"
MAX_MANIFEST_BYTES = 256 * 2**20  # Its skip list grows with bad rows; RSNA's is ~10 KB.
ENCODINGS = ("jpeg", "png", "raw")
# --crop of the converter (boneage_tpu.data.crop holds the same values, TF-free).
CROPS = ("none", "hand")
CROP_MARGIN_RANGE = (1.0, 4.0)

# Age bands in months (0-2, 2-6, 6-10, 10-13, 13-16, 16-20 years): used for the stratified
# split, the balanced sampler (band x sex strata) and the per-band evaluation metrics.
AGE_BAND_EDGES_MONTHS = (0, 24, 72, 120, 156, 192, 241)
AGE_BAND_NAMES = ("0-2y", "2-6y", "6-10y", "10-13y", "13-16y", "16-19y")
NUM_AGE_BANDS = len(AGE_BAND_NAMES)
NUM_STRATA = 2 * NUM_AGE_BANDS
MAX_AGE_MONTHS = 240.0
NO_LABEL = -1.0  # boneage value stored in records whose label is absent (RSNA test layout).

# name -> (tf dtype, tfds-style description). Every record carries every feature.
FEATURES: dict[str, tuple[tf.dtypes.DType, str]] = {
    "id": (tf.string, "image id as in the source CSV"),
    "image": (tf.string, "encoded 8-bit single-channel image, longest side = image_size"),
    "height": (tf.int64, "stored image height in pixels"),
    "width": (tf.int64, "stored image width in pixels"),
    "encoding": (tf.string, "jpeg | png | raw (row-major uint8 height x width)"),
    "boneage": (tf.float32, "bone age in months; -1 when has_label == 0"),
    "male": (tf.int64, "1 male, 0 female"),
    "has_label": (tf.int64, "1 when boneage is a real label"),
    "stratum": (tf.int64, "age_band * 2 + male; -1 when unlabeled"),
}


def age_band(months: float) -> int:
    """Returns the index of the age band holding `months` (clipped to the outer bands)."""
    band = int(np.searchsorted(AGE_BAND_EDGES_MONTHS, months, side="right")) - 1
    return min(max(band, 0), NUM_AGE_BANDS - 1)


def stratum(months: float, male: bool) -> int:
    """Returns the stratum id (age band x sex) used for splitting and balanced sampling."""
    return age_band(months) * 2 + int(bool(male))


def feature_spec() -> dict[str, tf.io.FixedLenFeature]:
    """Returns the `tf.io.parse_example` spec for one record."""
    return {name: tf.io.FixedLenFeature([], dtype) for name, (dtype, _) in FEATURES.items()}


def _feature(dtype: tf.dtypes.DType, value: Any) -> tf.train.Feature:
    if dtype == tf.string:
        raw = value.encode("utf-8") if isinstance(value, str) else bytes(value)
        return tf.train.Feature(bytes_list=tf.train.BytesList(value=[raw]))
    if dtype == tf.int64:
        return tf.train.Feature(int64_list=tf.train.Int64List(value=[int(value)]))
    return tf.train.Feature(float_list=tf.train.FloatList(value=[float(value)]))


def encode_example(
    *,
    image_id: str,
    image: bytes,
    height: int,
    width: int,
    encoding: str,
    boneage: float | None,
    male: bool,
) -> bytes:
    """Serializes one record; `boneage=None` marks it unlabeled (for prediction)."""
    if encoding not in ENCODINGS:
        raise ValueError(f"encoding must be one of {ENCODINGS}, got {encoding!r}")
    has_label = boneage is not None
    values = {
        "id": image_id,
        "image": image,
        "height": height,
        "width": width,
        "encoding": encoding,
        "boneage": float(boneage) if has_label else NO_LABEL,
        "male": int(bool(male)),
        "has_label": int(has_label),
        "stratum": stratum(boneage, male) if has_label else -1,
    }
    feats = {name: _feature(FEATURES[name][0], v) for name, v in values.items()}
    example = tf.train.Example(features=tf.train.Features(feature=feats))
    # deterministic: map field order must not vary between processes (resumed conversions).
    return example.SerializeToString(deterministic=True)


def parse_examples(serialized: tf.Tensor) -> dict[str, tf.Tensor]:
    """Parses a scalar or a batch of serialized records into feature tensors."""
    if serialized.shape.rank == 0:
        return tf.io.parse_single_example(serialized, feature_spec())
    return tf.io.parse_example(serialized, feature_spec())


def tfds_features():
    """Returns the TFDS FeaturesDict equivalent of `FEATURES` (for folder-dataset metadata)."""
    import tensorflow_datasets as tfds  # Imported lazily: only the converter needs it.

    return tfds.features.FeaturesDict(
        {
            name: tfds.features.Tensor(shape=(), dtype=dtype, doc=doc)
            for name, (dtype, doc) in FEATURES.items()
        }
    )


def shard_name(split: str, index: int, num_shards: int) -> str:
    """Returns the shard file name, e.g. `train-00000-of-00016.tfrecord`."""
    return f"{split}-{index:05d}-of-{num_shards:05d}.tfrecord"


class ManifestError(Error, ValueError):
    """Raised when a data folder has no usable manifest."""


def read_manifest(data_dir: str) -> dict[str, Any]:
    """Reads and checks `data_dir/manifest.json` (local path or gs://)."""
    path = f"{data_dir.rstrip('/')}/{MANIFEST_NAME}"
    if not tf.io.gfile.exists(path):
        raise ManifestError(
            f"no {MANIFEST_NAME} in {data_dir}: is it an output folder of boneage-make-tfrecords?"
        )
    try:
        manifest = json.loads(guard.read_file(path, MAX_MANIFEST_BYTES, "a manifest").decode())
    except guard.InputFileError as e:
        raise ManifestError(str(e)) from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ManifestError(
            f"{path} is not valid JSON ({' '.join(str(e).split())}): the conversion was cut "
            "short or the file was edited; rerun boneage-make-tfrecords --overwrite"
        ) from None
    if not isinstance(manifest, dict):
        raise ManifestError(f"{path} is not a manifest (a JSON {type(manifest).__name__})")
    version = manifest.get("schema_version")
    if version != SCHEMA_VERSION:
        raise ManifestError(
            f"{path} has schema version {version}, this boneage_tpu reads {SCHEMA_VERSION}: "
            "re-run boneage-make-tfrecords with this version"
        )
    return manifest


def crop_entries(
    crop: str, margin: float, fallbacks: Sequence[Mapping[str, Any]]
) -> dict[str, Any]:
    """Returns the manifest keys that describe the converter's crop (see `manifest_crop`).

    Args:
      crop: none | hand.
      margin: the hand box's enlargement (recorded for `hand` only; null for `none`).
      fallbacks: one entry ({row, id, path, reason}) per image whose hand crop found no hand
        and kept the whole image.
    """
    return {
        "crop": crop,
        "crop_margin": float(margin) if crop != "none" else None,
        "crop_fallbacks": len(fallbacks),
        "crop_fallback_images": list(fallbacks),
    }


def manifest_crop(manifest: Mapping[str, Any]) -> tuple[str, float]:
    """Returns (crop, margin) a data folder was converted with: ("none", 0.0) without a crop.

    Manifests from before the crop existed have no `crop` key: their images are uncropped.

    Raises:
      ManifestError: an unknown crop, or a hand crop without a valid margin.
    """
    crop = manifest.get("crop") or "none"
    if crop not in CROPS:
        raise ManifestError(f"manifest crop must be one of {', '.join(CROPS)}, got {crop!r}")
    if crop == "none":
        return "none", 0.0
    margin = manifest.get("crop_margin")
    low, high = CROP_MARGIN_RANGE
    if isinstance(margin, bool) or not isinstance(margin, int | float) or not low <= margin <= high:
        raise ManifestError(f"manifest crop_margin must be in {low}..{high}, got {margin!r}")
    return crop, float(margin)


def crop_flags(crop: str, margin: float) -> str:
    """The converter flags of a crop, for messages: "--crop hand --crop_margin 1.15"."""
    return f"--crop {crop}" + (f" --crop_margin {margin:g}" if crop != "none" else "")


def same_crop(a: tuple[str, float], b: tuple[str, float]) -> bool:
    """Whether two (crop, margin) pairs prepare images alike (the margin matters for hand only)."""
    return a[0] == b[0] and (a[0] == "none" or math.isclose(a[1], b[1]))


def split_info(manifest: Mapping[str, Any], split: str) -> Mapping[str, Any]:
    """Returns the manifest entry of `split`, or raises a one-line error naming the splits.

    `split` may be a union "a+b+..." (e.g. the training folds of a K-fold run): counts add up,
    shards are listed in order, per-split label stats are pooled.
    """
    splits = manifest.get("splits", {})
    names = split.split("+")
    for name in names:
        if name not in splits:
            raise ManifestError(f"split {name!r} not in the data; it has: {sorted(splits)}")
    if len(names) == 1:
        return splits[split]
    if len(set(names)) != len(names):
        raise ManifestError(f"split union {split!r} names a split twice")
    entries = [splits[name] for name in names]
    merged: dict[str, Any] = {
        "count": sum(e["count"] for e in entries),
        "labeled": sum(e["labeled"] for e in entries),
        "shards": [shard for e in entries for shard in e["shards"]],
        "counts_by_stratum": [
            sum(v) for v in zip(*(e["counts_by_stratum"] for e in entries), strict=True)
        ],
    }
    if all("label_stats" in e for e in entries):
        merged["label_stats"] = pool_label_stats([e["label_stats"] for e in entries])
    return merged


def pool_label_stats(parts: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Pools per-split {count, mean_months, std_months} into the stats of their union."""
    count = sum(int(p["count"]) for p in parts)
    if not count:
        return {"count": 0, "mean_months": None, "std_months": None}
    mean = sum(p["count"] * p["mean_months"] for p in parts if p["count"]) / count
    second = sum(
        p["count"] * (p["std_months"] ** 2 + p["mean_months"] ** 2) for p in parts if p["count"]
    )
    return {
        "count": count,
        "mean_months": mean,
        "std_months": math.sqrt(max(second / count - mean**2, 0.0)),
    }


def fold_split(fold: int) -> str:
    """Returns the split name of K-fold fold `fold` (`boneage-make-tfrecords --num_folds`)."""
    return f"fold{fold}"


def fold_count(manifest: Mapping[str, Any]) -> int:
    """Returns K for a K-fold conversion (splits fold0..fold{K-1}), 0 for any other."""
    k = 0
    while fold_split(k) in manifest.get("splits", {}):
        k += 1
    return k


def shard_paths(data_dir: str, manifest: Mapping[str, Any], split: str) -> list[str]:
    """Returns the full paths of a split's shards, in manifest order."""
    return [f"{data_dir.rstrip('/')}/{s['name']}" for s in split_info(manifest, split)["shards"]]
