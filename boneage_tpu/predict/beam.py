"""Batch prediction on Apache Beam (`predict --runner beam`): RunInference over the SavedModel.

    python -m boneage_tpu.predict --runner beam --model_dir RUN --input 'gs://b/xrays/**.png' \
        --output gs://b/scores [--sex_csv CSV | --sex M|F] [--beam_options '--runner=...']

The pipeline: the pattern -> its files (`tf.io.gfile.glob`) -> Reshuffle -> each file read and
prepared as the training data was (`images.prepare` with the run's stored size, encoding and
crop: the local predict's preparation) -> RunInference with `SavedModelHandler` over the run's
`export/saved_model` (its serving signature decodes as the input pipeline does) -> CSV shards.
Beam's own TensorFlow handler loads with `tf.keras.models.load_model`, which cannot read a
Keras 3 SavedModel (apache/beam#30616), hence the handler here over `tf.saved_model.load`.

Output in `--output`: `predictions-SSSSS-of-NNNNN.csv` (id, path, male, predicted_months,
plausible, problem; sorted by path in each shard) and `unreadable-SSSSS-of-NNNNN.csv` (path,
reason) for files that cannot be read or decoded: itemised, never fatal. An image that does not
look like a radiograph, or in which a `--crop hand` run's crop found no hand (predicted on the
whole image), is predicted and flagged (plausible 0, the reason in `problem`): in a batch over
an archive a flag is more useful than a refusal. All file I/O goes through
`tf.io.gfile` (local, gs://), not Beam's file systems. Imports Apache Beam: import this module
only after `beam_runtime.import_beam()`.
"""

from __future__ import annotations

import csv
import functools
import io
import posixpath
import sys
import zlib
from collections.abc import Iterable, Sequence
from typing import Any

import apache_beam as beam
import tensorflow as tf
from apache_beam.ml.inference import base as inference_base

from boneage_tpu.core import beam_runtime, guard
from boneage_tpu.core import model_dir as model_dir_lib
from boneage_tpu.core.errors import Error
from boneage_tpu.data import images, layouts
from boneage_tpu.predict import inputs as predict_io
from boneage_tpu.predict.inputs import PredictError

PREDICTION_COLUMNS = ("id", "path", "male", "predicted_months", "plausible", "problem")
UNREADABLE_COLUMNS = ("path", "reason")


class BeamPredictError(Error, ValueError):
    """Bad input of a Beam prediction run; the message is one line."""


class SavedModelHandler(inference_base.ModelHandler):
    """RunInference handler: (stored image bytes, male) -> months, with `tf.saved_model.load`."""

    def __init__(self, saved_model: str, max_batch_size: int = 16) -> None:
        self._saved_model = saved_model
        self._max_batch_size = max_batch_size

    def load_model(self) -> Any:
        """Loads the export's SavedModel (local or gs://) once per worker process."""
        return tf.saved_model.load(self._saved_model)

    def run_inference(
        self,
        batch: Sequence[tuple[bytes, float]],
        model: Any,
        inference_args: dict[str, Any] | None = None,
    ) -> Iterable[Any]:
        """Predicts one batch; returns a `PredictionResult(example, months)` per example."""
        del inference_args
        serve = model.signatures["serving_default"]
        out = serve(
            image_bytes=tf.constant([data for data, _ in batch]),
            male=tf.constant([male for _, male in batch], tf.float32),
        )
        months = out["boneage_months"].numpy()
        return [
            inference_base.PredictionResult(example, float(value))
            for example, value in zip(batch, months, strict=True)
        ]

    def batch_elements_kwargs(self) -> dict[str, Any]:
        """Batches of up to `max_batch_size` images (the local predict's --batch_size)."""
        return {"min_batch_size": 1, "max_batch_size": self._max_batch_size}


def _glob(pattern: str) -> list[str]:
    return sorted(tf.io.gfile.glob(pattern))


@functools.lru_cache(maxsize=4)
def _settings(model_dir: str, sex: float | None, sex_csv: str) -> dict[str, Any]:
    """The run's data settings and the sex of each image id; read once per worker process."""
    config = model_dir_lib.load_config(model_dir)
    derived = model_dir_lib.load_derived(model_dir)
    males: dict[str, float] = {}
    if sex_csv:
        _, rows, _, _, _ = layouts.parse_labels(layouts.read_csv_bytes(sex_csv))
        males = {row.image_id: float(row.male) for row in rows}
    return {
        "size": derived.data_image_size,
        # The SavedModel decodes PNG or JPEG: raw records' pixels travel as lossless PNG.
        "encoding": "png" if derived.data_encoding == "raw" else derived.data_encoding,
        "quality": derived.data_jpeg_quality,
        "crop": derived.data_crop,
        "crop_margin": derived.data_crop_margin,
        "use_sex": config.model.use_sex,
        "sex": sex,
        "males": males,
    }


def image_id(path: str) -> str:
    """The id of an image file: its name without the extension (as the converter matches)."""
    return posixpath.splitext(posixpath.basename(path))[0]


def prepare(path: str, model_dir: str, sex: float | None, sex_csv: str) -> tuple:
    """One file -> ("ok", path, (stored bytes, male), problem) or ("unreadable", path, reason)."""
    settings = _settings(model_dir, sex, sex_csv)
    male = settings["sex"]
    if settings["males"]:
        male = settings["males"].get(image_id(path))
    if male is None and settings["use_sex"]:
        return "unreadable", path, f"no sex for id {image_id(path)!r} in --sex_csv {sex_csv}"
    problems: list[str] = []
    try:
        stored, _, _ = images.prepare(
            images.read_bytes(path),
            path,
            settings["size"],
            settings["encoding"],
            settings["quality"],
            warn=problems.append,
            crop=settings["crop"],
            crop_margin=settings["crop_margin"],
            on_crop_fallback=lambda reason: problems.append(
                f"hand crop: {reason}; predicted on the whole image"
            ),
        )
    except images.ImageError as e:
        return "unreadable", path, str(e)
    except (OSError, MemoryError) as e:  # This file only, as in the converter.
        return "unreadable", path, f"cannot prepare {path}: {e!r}"
    return "ok", path, (stored, float(male or 0.0)), "; ".join(problems)


def _csv_line(values: Sequence[Any]) -> str:
    buf = io.StringIO()
    # Ids and reasons come from file names: neutralised like every CSV the project writes.
    csv.writer(buf, lineterminator="\n").writerow(guard.csv_row(values))
    return buf.getvalue()


def _keyed(line: tuple[str, str], shards: int) -> tuple[int, tuple[str, str]]:
    return zlib.crc32(line[0].encode("utf-8")) % shards, line


def _write_shard(
    grouped: tuple[int, Iterable[tuple[str, str]]], output: str, name: str, shards: int
) -> str:
    index, lines = grouped
    columns = PREDICTION_COLUMNS if name == "predictions" else UNREADABLE_COLUMNS
    path = f"{output}/{name}-{index:05d}-of-{shards:05d}.csv"
    with tf.io.gfile.GFile(path, "w") as f:
        f.write(_csv_line(columns))
        f.write("".join(text for _, text in sorted(lines)))
    return path


def _is_unreadable(prepared: tuple, partitions: int) -> int:
    del partitions
    return int(prepared[0] != "ok")


def _model_input(prepared: tuple) -> tuple[tuple[str, str], tuple[bytes, float]]:
    _, path, example, problem = prepared
    return (path, problem), example


def _prediction_line(keyed: tuple[tuple[str, str], Any]) -> tuple[str, str]:
    (path, problem), result = keyed
    male = int(result.example[1] > 0.5)
    values = [image_id(path), path, male, repr(result.inference), int(not problem), problem]
    return path, _csv_line(values)


def _unreadable_line(prepared: tuple) -> tuple[str, str]:
    _, path, reason = prepared
    return path, _csv_line([path, reason])


def _write(lines: Any, label: str, output: str, shards: int) -> None:
    _ = (
        lines
        | f"Key{label}" >> beam.Map(_keyed, shards)
        | f"Group{label}" >> beam.GroupByKey()
        | f"Write{label}" >> beam.Map(_write_shard, output, label.lower(), shards)
    )


def run(
    *,
    model_dir: str,
    pattern: str,
    output: str,
    sex: float | None = None,
    sex_csv: str = "",
    batch_size: int = 16,
    output_shards: int = 1,
    beam_options: str = "",
    num_workers: int | None = None,
    quiet: bool = False,
) -> dict[str, int]:
    """Predicts every file matching `pattern` on Beam; returns {"predicted", "unreadable"}.

    Args:
      model_dir: a training run's folder with `export/saved_model` and `config.json`.
      pattern: files to predict, a `tf.io.gfile.glob` pattern (local or gs://).
      output: folder (local or gs://) for the CSV shards.
      sex: the `male` input of every image (1 or 0), when no `sex_csv`.
      sex_csv: a CSV in any layout the converter reads, giving each image id's sex.
      batch_size: images per forward pass.
      output_shards: CSV shards per output (predictions, unreadable).
      beam_options: Beam pipeline options (default: Beam's local multi-process runner).
      num_workers: the local runner's worker processes (default: the CPU count).
      quiet: no summary line.

    Raises:
      BeamPredictError: no export, no match, or the sex is needed and not given.
    """
    model_dir = model_dir.rstrip("/")
    output = output.rstrip("/")
    saved_model = model_dir_lib.saved_model_path(model_dir)
    if not tf.io.gfile.exists(saved_model):
        raise BeamPredictError(
            f"no {saved_model}: --runner beam serves the run's SavedModel export (written "
            "when training finishes)"
        )
    config = model_dir_lib.load_config(model_dir)
    if config.model.use_sex and sex is None and not sex_csv:
        raise BeamPredictError(
            f"the model in {model_dir} uses the sex input: give --sex M|F or --sex_csv CSV"
        )
    if sex_csv:
        _settings(model_dir, sex, sex_csv)  # A bad CSV fails here, as one line, not on workers.
    matched = _glob(pattern)
    if not matched:
        raise BeamPredictError(f"--input {pattern!r} matches no file")
    # The stale shards below are removed: the output folder may hold no input.
    guard.check_outputs(
        {"--output": (output, "folder")},
        {"an --input file": matched, "the model directory": [model_dir], "--sex_csv": [sex_csv]},
    )
    tf.io.gfile.makedirs(output)
    for stale in tf.io.gfile.glob(f"{output}/predictions-*.csv") + tf.io.gfile.glob(
        f"{output}/unreadable-*.csv"
    ):
        tf.io.gfile.remove(stale)  # A shard of an earlier run must not mix in.
    options = beam_runtime.pipeline_options(beam_options, num_workers)
    handler = inference_base.KeyedModelHandler(SavedModelHandler(saved_model, batch_size))
    if not quiet:
        print(
            f"predicting {pattern} on Beam ({beam_runtime.runner_name(options)})", file=sys.stderr
        )
    with beam.Pipeline(options=options) as pipeline:
        readable, unreadable = (
            pipeline
            | "Pattern" >> beam.Create([pattern])
            | "Match" >> beam.FlatMap(_glob)
            # Without it the runner fuses every file with the one pattern: one worker.
            | "Spread" >> beam.Reshuffle()
            | "Prepare" >> beam.Map(prepare, model_dir, sex, sex_csv)
            | "Sort" >> beam.Partition(_is_unreadable, 2)
        )
        predictions = (
            readable
            | "Inputs" >> beam.Map(_model_input)
            | "Predict" >> inference_base.RunInference(handler)
            | "Lines" >> beam.Map(_prediction_line)
        )
        _write(predictions, "Predictions", output, output_shards)
        _write(
            unreadable | "Reasons" >> beam.Map(_unreadable_line),
            "Unreadable",
            output,
            output_shards,
        )
    counts = summary_counts(output)
    if not quiet:
        print(
            f"wrote {counts['predicted']} prediction(s) and {counts['unreadable']} unreadable "
            f"file(s) to {output}"
        )
    return counts


def summary_counts(output: str) -> dict[str, int]:
    """Counts the rows of the CSV shards in `output`: {"predicted", "unreadable"}."""
    counts = {}
    for label, name in (("predicted", "predictions"), ("unreadable", "unreadable")):
        rows = 0
        for path in tf.io.gfile.glob(f"{output}/{name}-*.csv"):
            with tf.io.gfile.GFile(path, "r") as f:
                rows += max(0, sum(1 for _ in csv.reader(f)) - 1)
        counts[label] = rows
    return counts


def run_config(config: Any, model_dir: str) -> dict[str, int]:
    """Runs `predict --runner beam`: checks the flags that apply, then `run`.

    Args:
      config: the command's `boneage_tpu.predict.job.PredictConfig`.
      model_dir: the training run's folder `--model` names.
    """
    if not (config.input and config.output) or config.paths or config.labels:
        raise PredictError(
            "--runner beam takes --input PATTERN and --output DIR (no IMAGE files, no --labels)"
        )
    if (
        config.heatmaps
        or config.tta != "none"
        or config.interval
        or config.checkpoint not in ("auto", "export")
    ):
        raise PredictError(
            "--runner beam serves the SavedModel export: no --heatmaps, --tta, --interval or "
            "--checkpoint"
        )
    if config.sex and config.sex_csv:
        raise PredictError("give --sex or --sex_csv, not both")
    return run(
        model_dir=model_dir,
        pattern=config.input,
        output=config.output,
        sex=predict_io.parse_sex(config.sex) if config.sex else None,
        sex_csv=config.sex_csv,
        batch_size=config.batch_size,
        output_shards=config.output_shards,
        beam_options=config.beam_options,
    )
