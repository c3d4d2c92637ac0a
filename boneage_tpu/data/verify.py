"""Checks a converted data folder against its manifest: every shard present, sized and hashed.

    boneage-verify-tfrecords DATA      (or: boneage-make-tfrecords --verify ...)

The converter records each shard's byte count and sha256 in `manifest.json`; this recomputes
them. Training and evaluation call `corrupt_shards` when a read fails, to name the bad shard
(TensorFlow's DataLossError names none). A library module: the converter, the trainer and the
evaluator all use it.
"""

from __future__ import annotations

import hashlib
import sys
from collections.abc import Mapping, Sequence
from typing import Any

import tensorflow as tf

from boneage_tpu.core import schema

_HASH_CHUNK = 8 << 20


def sha256_file(path: str) -> str:
    """Returns the sha256 hex digest of a file read through `tf.io.gfile`."""
    digest = hashlib.sha256()
    with tf.io.gfile.GFile(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def join(base: str, name: str) -> str:
    """Joins a folder (local or gs://) and a file name."""
    return f"{base.rstrip('/')}/{name}"


def shard_problem(path: str, expected: Mapping[str, Any]) -> str:
    """Returns why a shard differs from its manifest entry (missing, size, sha256), or ""."""
    if not tf.io.gfile.exists(path):
        return "missing"
    size = tf.io.gfile.stat(path).length
    if "bytes" in expected and size != expected["bytes"]:
        return f"{size} bytes, the manifest says {expected['bytes']} (truncated or replaced)"
    if "sha256" in expected and sha256_file(path) != expected["sha256"]:
        return "sha256 differs from the manifest (corrupted)"
    return ""


def corrupt_shards(
    data_dir: str, manifest: Mapping[str, Any] | None = None, splits: Sequence[str] = ()
) -> list[tuple[str, str]]:
    """Returns (shard path, problem) for every shard of `splits` (default all) that is bad."""
    manifest = manifest if manifest is not None else schema.read_manifest(data_dir)
    bad = []
    for split, info in manifest.get("splits", {}).items():
        if splits and split not in splits:
            continue
        for shard in info["shards"]:
            path = join(data_dir, shard["name"])
            problem = shard_problem(path, shard)
            if problem:
                bad.append((path, problem))
    return bad


def describe_read_failure(
    data_dir: str, manifest: Mapping[str, Any] | None, splits: Sequence[str], error: Exception
) -> str:
    """One line for a failed read of the data: the bad shard(s) by checksum, and what to do."""
    message = " ".join(str(getattr(error, "message", error)).split())[:200]
    bad = corrupt_shards(data_dir, manifest, splits)
    if not bad:
        return (
            f"reading {data_dir} failed ({message}) although every shard matches its manifest "
            "checksum: check the storage and retry"
        )
    first, problem = bad[0]
    more = f" and {len(bad) - 1} more shard(s)" if len(bad) > 1 else ""
    return (
        f"corrupt data shard {first}: {problem}{more} ({message}); reconvert with "
        f"boneage-make-tfrecords --overwrite, or check with boneage-verify-tfrecords "
        f"{data_dir}"
    )


def verify(data_dir: str, out: Any = None) -> int:
    """Checks every shard of a data folder; prints one line per shard; returns the bad count."""
    out = out or sys.stdout
    manifest = schema.read_manifest(data_dir)
    count, bad = 0, 0
    for info in manifest.get("splits", {}).values():
        for shard in info["shards"]:
            path = join(data_dir, shard["name"])
            problem = shard_problem(path, shard)
            count += 1
            bad += bool(problem)
            print(
                f"{'BAD' if problem else 'ok '} {path}{': ' + problem if problem else ''}", file=out
            )
    print(f"{count - bad} of {count} shard(s) match {schema.MANIFEST_NAME}", file=out)
    return bad
