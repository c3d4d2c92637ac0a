"""The converter's shard writing on Apache Beam (`--runner beam`), for sets beyond one machine.

Only the shard writing moves to Beam; everything else is the local converter's own code in
`boneage_tpu.convert.job`: the CSV, the image matching, the plan, the shard counts, and
afterwards the manifest and the TFDS metadata, written last as always. The pipeline:

    shard names -> the rows of each (from .convert/<name>.rows.json) -> Reshuffle
      -> `shards.convert_row` per row (one record or one skip, the local runner's function)
      -> GroupByKey(shard) -> `OutputState.write_outcomes` in plan order -> .convert/<name>.json

Rows travel through a file per shard rather than inside the pipeline, because Dataflow refuses
job graphs over ~10 MB (a million rows pickled into `Create` are ~150 MB). Each shard is
written by one worker from its rows sorted by plan position, so the shards are byte for byte
those of the local runner, and a shard that a retried bundle writes twice comes out the same.
All file I/O goes through `tf.io.gfile` as in the rest of the package (local, gs://, the
test emulator), not through Beam's file systems.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import tensorflow as tf

from boneage_tpu.convert import shards
from boneage_tpu.core import beam_runtime
from boneage_tpu.data import crop as crop_lib
from boneage_tpu.data.layouts import ConvertError, Row

_ROWS_SUFFIX = ".rows.json"


def _rows_path(output: str, name: str) -> str:
    return shards.join(shards.join(output, shards.STATE_DIR), f"{name}{_ROWS_SUFFIX}")


def save_rows(output: str, job: shards.ShardJob) -> None:
    """Saves a shard's rows, in plan order, for the pipeline's workers."""
    rows = [dataclasses.astuple(row) for row in job.rows]
    text = json.dumps({"split": job.split, "rows": rows})
    shards.write_text_atomic(_rows_path(output, job.name), text)


def load_job(output: str, name: str) -> shards.ShardJob:
    """Loads a shard's job as `save_rows` saved it."""
    with tf.io.gfile.GFile(_rows_path(output, name), "r") as f:
        saved = json.load(f)
    return shards.ShardJob(saved["split"], name, tuple(Row(*fields) for fields in saved["rows"]))


def _rows_of(name: str, output: str) -> Iterator[tuple[str, int, Row]]:
    for position, row in enumerate(load_job(output, name).rows):
        yield name, position, row


def _convert(element: tuple[str, int, Row], options: dict[str, Any]) -> tuple[str, tuple]:
    name, position, row = element
    outcome = shards.convert_row(
        row,
        options["image_size"],
        options["encoding"],
        options["jpeg_quality"],
        options.get("crop", "none"),
        options.get("crop_margin", crop_lib.DEFAULT_MARGIN),
    )
    return name, (position, outcome)


def _write(grouped: tuple[str, Iterable[tuple[int, shards.Outcome]]], output: str) -> str:
    name, outcomes = grouped
    ordered = [outcome for _, outcome in sorted(outcomes, key=lambda item: item[0])]
    shards.OutputState(output).write_outcomes(load_job(output, name), ordered)
    return name


def write_shards(
    state: shards.OutputState,
    jobs: Sequence[shards.ShardJob],
    options: dict[str, Any],
    *,
    beam_options: str = "",
    num_workers: int | None = None,
    strict: bool = False,
    quiet: bool = False,
) -> dict[str, dict[str, Any]]:
    """Writes the shards that are not complete yet on Beam; returns every shard's info.

    Args:
      state: the output folder (prepared, with its plan saved).
      jobs: every shard of the plan.
      options: the converter's options (image size, encoding, JPEG quality, crop).
      beam_options: Beam pipeline options, e.g. "--runner=DataflowRunner --project=...".
      num_workers: worker processes of the local runner (default: the CPU count).
      strict: fail when any image was skipped (checked once the shards are written; they
        stay, complete, so a rerun without --strict resumes from them).
      quiet: no progress line.

    Raises:
      BeamError: Beam is not installed, or the options do not parse.
      ConvertError: a shard is missing after the pipeline, or `strict` and an image was skipped.
    """
    todo = [job for job in jobs if state.completed(job) is None]
    if todo:
        beam = beam_runtime.import_beam()
        pipeline_options = beam_runtime.pipeline_options(beam_options, num_workers)
        for job in todo:
            save_rows(state.output, job)
        if not quiet:
            images = sum(len(job.rows) for job in todo)
            print(
                f"converting {images} image(s) into {len(todo)} shard(s) on Beam "
                f"({beam_runtime.runner_name(pipeline_options)})",
                file=sys.stderr,
            )
        with beam.Pipeline(options=pipeline_options) as pipeline:
            _ = (
                pipeline
                | "Shards" >> beam.Create([job.name for job in todo])
                | "Rows" >> beam.FlatMap(_rows_of, state.output)
                # Without it the runner fuses the rows with their one shard name: one worker.
                | "Spread" >> beam.Reshuffle()
                | "Convert" >> beam.Map(_convert, options)
                | "ByShard" >> beam.GroupByKey()
                | "Write" >> beam.Map(_write, state.output)
            )
    infos = {job.name: state.completed(job) for job in jobs}
    unwritten = [name for name, info in infos.items() if info is None]
    if unwritten:
        raise ConvertError(
            f"the Beam pipeline finished without writing {len(unwritten)} shard(s) "
            f"({unwritten[0]}, ...): rerun the same command to resume"
        )
    skipped = [entry for job in jobs for entry in infos[job.name]["skipped"]]
    if strict and skipped:
        first = skipped[0]
        raise ConvertError(
            f"--strict: {len(skipped)} image(s) skipped, first: line {first['row']}, id "
            f"{first['id']} ({first['path']}): {first['reason']}"
        )
    return infos
