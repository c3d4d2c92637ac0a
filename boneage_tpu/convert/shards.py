"""Resumable shard writing for `boneage-make-tfrecords`.

Records are written in plan order (images come prepared from `boneage_tpu.convert.workers`), so the
output never depends on the number of workers.

Resumability: a shard is written to `.convert/<name>.tmp` and renamed when complete (on gs://,
where there is no rename, it is written under its final name: objects appear only on close).
Then `.convert/<name>.json` records its record count, size, sha256, skipped inputs and the
images whose hand crop kept the whole image. A shard counts as done on a rerun only when both
exist and the sizes agree.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, NamedTuple

import tensorflow as tf

from boneage_tpu.convert.workers import Prepared, is_remote, prepare_all
from boneage_tpu.core import schema
from boneage_tpu.data import crop as crop_lib
from boneage_tpu.data import images
from boneage_tpu.data.layouts import ConvertError, Row, skip
from boneage_tpu.data.verify import sha256_file

STATE_DIR = ".convert"
PLAN_NAME = "plan.json"
SHARD_PATTERN = re.compile(r"\w+-\d{5}-of-\d{5}\.tfrecord")
TFDS_FILES = ("dataset_info.json", "features.json")


class CropFallback(NamedTuple):
    """A record whose hand crop found no hand (the whole image is stored), and its entry."""

    record: bytes
    entry: dict[str, Any]  # {row, id, path, reason}, as a skip entry: listed in the manifest


# A row's serialized record, its manifest skip entry, or a record stored uncropped.
Outcome = bytes | dict[str, Any] | CropFallback


@dataclasses.dataclass(frozen=True)
class ShardJob:
    """One output shard: its split, file name and the rows it holds, in order."""

    split: str
    name: str
    rows: tuple[Row, ...]


def join(base: str, name: str) -> str:
    """Joins a folder (local or gs://) and a file name."""
    return f"{base.rstrip('/')}/{name}"


def write_text_atomic(path: str, text: str) -> None:
    """Writes a text file that appears complete or not at all (temp + rename locally)."""
    if is_remote(path):
        with tf.io.gfile.GFile(path, "w") as f:
            f.write(text)
        return
    temp = f"{path}.tmp"
    with tf.io.gfile.GFile(temp, "w") as f:
        f.write(text)
    tf.io.gfile.rename(temp, path, overwrite=True)


class OutputState:
    """The output folder's shards, the plan and per-shard records of completed work."""

    def __init__(self, output: str) -> None:
        self.output = output.rstrip("/")
        self.state_dir = join(self.output, STATE_DIR)

    def prepare(self) -> None:
        """Creates the folders and removes temp files left by a killed run."""
        try:
            tf.io.gfile.makedirs(self.state_dir)
            for name in tf.io.gfile.listdir(self.state_dir):
                if name.endswith(".tmp"):
                    tf.io.gfile.remove(join(self.state_dir, name))
        except tf.errors.OpError as e:
            raise ConvertError(f"output {self.output} is not writable: {e.message}") from e

    def shard_files(self) -> list[str]:
        """Names of the shard files now in the output folder."""
        if not tf.io.gfile.isdir(self.output):
            return []
        return sorted(n for n in tf.io.gfile.listdir(self.output) if SHARD_PATTERN.fullmatch(n))

    def clear(self) -> None:
        """Deletes everything a conversion writes (for --overwrite); leaves other files alone."""
        names = [*self.shard_files(), schema.MANIFEST_NAME, *TFDS_FILES]
        for name in names:
            if tf.io.gfile.exists(join(self.output, name)):
                tf.io.gfile.remove(join(self.output, name))
        self.cleanup()

    def cleanup(self) -> None:
        """Deletes the state folder once the manifest is written."""
        if tf.io.gfile.exists(self.state_dir):
            tf.io.gfile.rmtree(self.state_dir)

    def load_plan(self) -> dict[str, Any] | None:
        """Returns the saved plan of an unfinished run, or None."""
        path = join(self.state_dir, PLAN_NAME)
        if not tf.io.gfile.exists(path):
            return None
        with tf.io.gfile.GFile(path, "r") as f:
            return json.load(f)

    def save_plan(self, plan: dict[str, Any]) -> None:
        """Saves the plan key and shard counts (reused by a resumed run)."""
        write_text_atomic(join(self.state_dir, PLAN_NAME), json.dumps(plan, sort_keys=True))

    def completed(self, job: ShardJob) -> dict[str, Any] | None:
        """Returns the saved info of a finished shard, or None when it must be (re)written."""
        info_path = join(self.state_dir, f"{job.name}.json")
        shard_path = join(self.output, job.name)
        if not (tf.io.gfile.exists(info_path) and tf.io.gfile.exists(shard_path)):
            return None
        with tf.io.gfile.GFile(info_path, "r") as f:
            info = json.load(f)
        if tf.io.gfile.stat(shard_path).length != info["bytes"]:
            return None
        if info["records"] + len(info["skipped"]) != len(job.rows):
            return None
        return info

    def write_shard(
        self,
        job: ShardJob,
        prepared: Iterator[tuple[Row, Prepared]],
        encoding: str,
        strict: bool,
        on_record: Callable[[], None],
    ) -> dict[str, Any]:
        """Writes one shard from the next `len(job.rows)` prepared images; returns its info."""

        def outcomes() -> Iterator[Outcome]:
            for expected in job.rows:
                row, result = next(prepared)
                if row is not expected:
                    raise AssertionError("prepared images out of plan order")
                on_record()
                yield record_or_skip(row, result, encoding, strict)

        return self.write_outcomes(job, outcomes())

    def write_outcomes(self, job: ShardJob, outcomes: Iterable[Outcome]) -> dict[str, Any]:
        """Writes one shard from its rows' outcomes, in plan order; returns and saves its info.

        Both runners end here: the local one streams the outcomes from its worker pool, the
        Beam one (`boneage_tpu.convert.beam`) hands over a shard's grouped outcomes, sorted.
        """
        final = join(self.output, job.name)
        path = final if is_remote(final) else join(self.state_dir, f"{job.name}.tmp")
        skipped, fallbacks, records, seen = [], [], 0, 0
        with tf.io.TFRecordWriter(path) as writer:
            for outcome in outcomes:
                seen += 1
                if isinstance(outcome, dict):
                    skipped.append(outcome)
                    continue
                if isinstance(outcome, tuple):  # A CropFallback (or one a coder made a tuple).
                    outcome, entry = outcome
                    fallbacks.append(entry)
                writer.write(outcome)
                records += 1
        if seen != len(job.rows):
            raise AssertionError(f"{job.name}: {seen} outcomes for {len(job.rows)} rows")
        if path != final:
            tf.io.gfile.rename(path, final, overwrite=True)
        info = {
            "name": job.name,
            "records": records,
            "bytes": tf.io.gfile.stat(final).length,
            "sha256": sha256_file(final),
            "skipped": skipped,
            "crop_fallbacks": fallbacks,
        }
        write_text_atomic(join(self.state_dir, f"{job.name}.json"), json.dumps(info))
        return info


def record_or_skip(row: Row, result: Prepared, encoding: str, strict: bool) -> Outcome:
    """Returns one row's outcome: its serialized record (a `CropFallback` when the hand crop
    kept the whole image), or its manifest skip entry.

    Raises:
      ConvertError: under `strict`, for an image that would be skipped.
    """
    if isinstance(result, images.ImageError):
        if strict:
            raise ConvertError(
                f"--strict: line {row.line}, id {row.image_id} ({row.path}): {result}"
            )
        return skip(row.line, row.image_id, row.path, str(result))
    data, height, width, crop_fallback = result
    record = schema.encode_example(
        image_id=row.image_id,
        image=data,
        height=height,
        width=width,
        encoding=encoding,
        boneage=row.boneage,
        male=row.male,
    )
    if crop_fallback:
        return CropFallback(record, skip(row.line, row.image_id, row.path, crop_fallback))
    return record


def convert_row(
    row: Row,
    image_size: int,
    encoding: str,
    jpeg_quality: int,
    crop: str = "none",
    crop_margin: float = crop_lib.DEFAULT_MARGIN,
) -> Outcome:
    """Reads and prepares one row's image: its serialized record, or its skip entry.

    The whole of "one row -> one record or one skip" in one call, for runners that distribute
    rows themselves (Beam); the local runner spreads `prepare_all` over its pool instead.
    """
    result = prepare_all([row.path], None, image_size, encoding, jpeg_quality, crop, crop_margin)[0]
    return record_or_skip(row, result, encoding, strict=False)


def make_jobs(splits: dict[str, Sequence[Row]], num_shards: dict[str, int]) -> list[ShardJob]:
    """Cuts each split's ordered rows into its shards."""
    jobs = []
    for split, rows in splits.items():
        total = num_shards[split]
        for index in range(total):
            start, end = index * len(rows) // total, (index + 1) * len(rows) // total
            jobs.append(
                ShardJob(split, schema.shard_name(split, index, total), tuple(rows[start:end]))
            )
    return jobs
