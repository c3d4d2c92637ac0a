"""Predicts bone age (months) for new hand radiographs with a trained model.

  python -m boneage_tpu.predict --model_dir MODEL_DIR [--sex M|F] IMAGE...
  python -m boneage_tpu.predict --model_dir MODEL_DIR --labels CSV --images DIR [--output CSV]
  ... [--heatmaps DIR]  # also writes DIR/<id>.png: where the model looks (boneage_tpu.inference.heatmap)
  python -m boneage_tpu.predict --runner beam --model_dir MODEL_DIR --input 'PATTERN' --output DIR
      [--sex M|F | --sex_csv CSV] [--beam_options '...']  # batch: boneage_tpu.predict.beam

IMAGEs are PNG (8/16-bit, palette, RGB), JPEG or DICOM files, local or gs://. `--model_dir`
(`--model` is the same flag) is a training run's folder (its export/model.keras when present, else
its latest checkpoint; pick with --checkpoint) or the path of that folder's export/model.keras.
Each image is prepared exactly as the converter and the input pipeline prepared the training data,
with their code: decode to 8-bit grayscale -> the training data's crop (`--crop hand`: the hand's
box; the whole image, with a warning, when none is found) -> resize the longest side to the
training data's size -> encode as the training data was -> the input pipeline's decode + fit to
the model's square input. With `--labels`, the CSV may be in any layout the converter reads
(Kaggle, RSNA validation or test); the bone age, when present, is shown next to the prediction. The module is ~430 lines
because the command's ~20 flags declare their help here, beside the local runner that reads them.
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import tensorflow as tf

from boneage_tpu.cli import check, option
from boneage_tpu.core import beam_runtime, guard, schema
from boneage_tpu.core import config as config_lib
from boneage_tpu.core import model_dir as model_dir_lib
from boneage_tpu.core.config import BIG
from boneage_tpu.data import images
from boneage_tpu.data import pipeline as data
from boneage_tpu.inference import heatmap, intervals, restore
from boneage_tpu.inference import runner as inference
from boneage_tpu.predict import inputs as predict_io
from boneage_tpu.predict.inputs import PredictError


def resolve_model(model_path: str, checkpoint: str = "auto") -> tuple[str, str]:
    """Returns (model_dir, checkpoint) for a model folder or its export/model.keras path."""
    path = model_path.rstrip("/")
    suffix = model_dir_lib.keras_export_path("")
    if path.endswith(".keras"):
        if not path.endswith(suffix):
            raise PredictError(
                f"--model_dir {model_path}: give the training run's folder (or its "
                f"{suffix[1:]}); a bare .keras file lacks the preprocessing settings"
            )
        return path[: -len(suffix)], "export"
    if checkpoint != "auto":
        return path, checkpoint
    export = model_dir_lib.keras_export_path(path)
    return path, "export" if tf.io.gfile.exists(export) else "latest"


def prepare_image(
    path: str, derived: config_lib.Derived, image_size: int, force: bool = False
) -> np.ndarray:
    """Returns the model input uint8 [S, S, 1] for one image file, as training data was made.

    Args:
      path: the image file.
      derived: the model's derived values (its training data's stored size, encoding, crop).
      image_size: the model's square input size.
      force: predict an implausible image (tiny, blank, noise) too, with a warning on stderr.

    Raises:
      images.ImageError: the file is missing or cannot be decoded;
        `images.ImplausibleImageError` when it does not look like a radiograph (unless forced).
    """
    if not derived.data_image_size or not derived.data_encoding:
        raise PredictError(
            "the model directory has no data_image_size/data_encoding: the training data's "
            "preprocessing is unknown"
        )

    def warning(text: str) -> None:
        print(f"warning: {path}: {text}", file=sys.stderr)

    stored, height, width = images.prepare(
        images.read_bytes(path),
        path,
        derived.data_image_size,
        derived.data_encoding,
        derived.data_jpeg_quality,
        warn=warning if force else None,
        crop=derived.data_crop,
        crop_margin=derived.data_crop_margin,
        on_crop_fallback=lambda why: warning(f"hand crop: {why}; predicting on the whole image"),
    )
    # Wrapped in a record and parsed by the input pipeline's own function: same decode, same
    # fit-to-square as the training and evaluation data.
    record = schema.encode_example(
        image_id="predict",
        image=stored,
        height=height,
        width=width,
        encoding=derived.data_encoding,
        boneage=None,
        male=False,
    )
    batch = data.parse_records(tf.constant([record]), image_size, derived.data_encoding)
    return batch["image"][0].numpy()


def _read_all(
    paths: Sequence[str], derived: config_lib.Derived, size: int, force: bool = False
) -> tuple[np.ndarray, list[tuple[str, str]]]:
    """Prepares every image; returns the batch of readable ones and (path, reason) for the rest."""
    arrays, problems = [], []
    for path in paths:
        try:
            arrays.append(prepare_image(path, derived, size, force))
        except images.ImplausibleImageError as e:
            problems.append(
                (path, f"does not look like a hand radiograph: {e} (--force predicts it)")
            )
        except images.ImageError as e:
            problems.append((path, str(e)))
    batch = np.stack(arrays) if arrays else np.zeros((0, size, size, 1), np.uint8)
    return batch, problems


def _sex_array(males: Any, count: int, loaded: restore.LoadedModel) -> np.ndarray:
    if males is None:
        if loaded.config.model.use_sex:
            raise PredictError(
                f"the model in {loaded.model_dir} uses the sex input: give --sex M or F"
            )
        males = 0.0  # The model ignores its `male` input.
    values = np.asarray(males, np.float32)
    if values.ndim and values.shape != (count,):
        raise PredictError(f"got {values.size} sex values for {count} images")
    return np.broadcast_to(values, (count,)).copy()


def predict_fn(loaded: restore.LoadedModel, tta: str = "none") -> Callable[..., Any]:
    """Returns the traced forward pass (images, male) -> (months, spread) of a restored model."""
    return tf.function(inference.tta_predict_fn(loaded.model, tta))


def predict_batch(
    loaded: restore.LoadedModel,
    batch: np.ndarray,
    male: np.ndarray,
    *,
    tta: str = "none",
    batch_size: int = 16,
    fn: Callable[..., Any] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Runs a restored model over prepared inputs uint8 [N,S,S,1]; returns (months, spread).

    Both are float64 [N] months with the bias correction fitted for `tta`; the spread is the
    bins head's per-image std (zeros for a regression head). `fn` is a `predict_fn(loaded,
    tta)` to reuse (chunked callers trace it once).
    """
    run = fn or predict_fn(loaded, tta)
    months, spread = [np.zeros((0,), np.float32)], [np.zeros((0,), np.float32)]
    for start in range(0, len(batch), batch_size):
        stop = start + batch_size
        out, std = run(tf.constant(batch[start:stop]), tf.constant(male[start:stop]))
        months.append(out.numpy())
        spread.append(std.numpy())
    result = restore.tta_corrected(loaded, np.concatenate(months).astype(np.float64), tta)
    if not np.all(np.isfinite(result)):
        raise PredictError(f"the model in {loaded.model_dir} returned non-finite predictions")
    std = restore.tta_corrected_spread(loaded, np.concatenate(spread).astype(np.float64), tta)
    return result, std


def predict_images(
    model_path: str,
    paths: Sequence[str],
    males: Sequence[float | bool] | float | bool | None,
    *,
    checkpoint: str = "auto",
    tta: str = "none",
    batch_size: int = 16,
    force: bool = False,
) -> list[float]:
    """Predicts bone age in months for image files.

    Args:
      model_path: a training run's folder, or its export/model.keras.
      paths: image files (PNG, JPEG or DICOM; local or gs://).
      males: per image 1/True for male, 0/False for female; one value for all images; None
        only when the model was trained without the sex input.
      checkpoint: auto (the export when present, else the latest checkpoint), latest, export
        or a training step.
      tta: none | flip (mean of the image and its mirror) | rotflip (also +-5, +-10 deg).
      batch_size: images per forward pass.
      force: also predict images that fail the plausibility check (a warning each).

    Returns:
      Bone age in months, one float per path, in order.

    Raises:
      PredictError, images.ImageError, model_dir.ModelDirError: with a one-line message.
    """
    if not paths:
        raise PredictError("no images given")
    model_dir, checkpoint = resolve_model(model_path, checkpoint)
    loaded = restore.load_model(model_dir, checkpoint)
    male = _sex_array(males, len(paths), loaded)
    batch, problems = _read_all(paths, loaded.derived, restore.model_image_size(loaded), force)
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise images.ImageError(f"cannot read {problems[0][0]}: {problems[0][1]}{more}")
    months, _ = predict_batch(loaded, batch, male, tta=tta, batch_size=batch_size)
    return [float(v) for v in months]


@dataclasses.dataclass
class PredictConfig:
    """Settings of the predict command (its flags and positional IMAGE arguments)."""

    model_dir: str = option(
        "",
        "Training run folder (local or gs://) or its export/model.keras (--model: the same).",
        required=True,
        aliases=("model",),
    )
    paths: tuple[str, ...] = option((), "Image files.", positional=True)
    sex: str = option("", "M or F, for every IMAGE (needed when the model uses sex).")
    labels: str = option("", "CSV (Kaggle, RSNA validation or test layout) naming the images.")
    images_dir: str = option(
        "", "Folder of the --labels images (<id>.png|.jpg|.dcm).", flag="images"
    )
    checkpoint: str = option(
        "auto", "auto (export if present, else latest), latest, export or a step."
    )
    tta: str = option(
        "none",
        "flip: mean of the image and its mirror; rotflip: also rotated by +-5 and +-10 degrees. "
        "Applies the bias correction fitted for the mode (none when the run fitted none).",
        choices=inference.TTA_MODES,
    )
    interval: float = option(
        0.0,
        "Coverage level of split-conformal intervals, e.g. 0.9 (0: none): low and high months "
        "per image, in the table, the CSV and the heatmap titles (needs --fit_intervals).",
        min=0,
        max=0.999,
    )
    interval_scale: str = option(
        "absolute",
        "absolute: one half-width for all | spread: scaled by the bins head's per-image spread.",
        choices=config_lib.INTERVAL_SCALES,
    )
    output: str = option("", "Write a CSV here (local or gs://) instead of printing a table.")
    batch_size: int = option(16, "Images per forward pass.", min=1, max=BIG)
    skip_unreadable: bool = option(False, "List unreadable images and predict the others.")
    heatmaps: str = option(
        "",
        "Folder (local or gs://) for one PNG per image: the Grad-CAM map (attention mask for "
        "--attention models) over the input as the model saw it, predicted months (and the "
        "bins head's uncertainty) in the title.",
    )
    force: bool = option(
        False, "Also predict images that do not look like radiographs (tiny, blank, noise)."
    )
    runner: str = option(
        "local",
        "local: predict here; beam: an Apache Beam batch job over --input (the [beam] extra) "
        "writing CSV shards into the --output folder.",
        choices=beam_runtime.RUNNERS,
    )
    input: str = option("", "With --runner beam: image files, a glob pattern (local or gs://).")
    sex_csv: str = option(
        "", "With --runner beam: a CSV (any --labels layout) giving each image id's sex."
    )
    output_shards: int = option(
        1, "With --runner beam: CSV shards per output file.", min=1, max=10**5
    )
    beam_options: str = option(
        "",
        "With --runner beam: Beam pipeline options, e.g. '--runner=DataflowRunner --project=P "
        "--region=R --temp_location=gs://B/tmp' (default: Beam's local runner, one process per "
        "core).",
    )


def run_beam(config: PredictConfig) -> dict[str, int]:
    """Runs `--runner beam` (`boneage_tpu.predict.beam.run_config`); Beam is imported only here."""
    beam_runtime.import_beam()  # A missing extra is one line naming it.
    from boneage_tpu.predict import beam

    return beam.run_config(config, resolve_model(config.model_dir)[0])


# Inputs prepared per chunk (a multiple of the batch size): memory stays bounded by the chunk,
# whatever the number of inputs, and results are written as each chunk is done.
CHUNK_BATCHES = 8
MIN_CHUNK = 64


def check_outputs(config: PredictConfig, items: Sequence[dict[str, Any]]) -> None:
    """Refuses --output and --heatmaps paths that would overwrite an input (`guard`)."""
    if not (config.output or config.heatmaps):
        return
    model_dir, _ = resolve_model(config.model_dir, "export")
    guard.check_outputs(
        {"--output": (config.output, "file"), "--heatmaps": (config.heatmaps, "folder")},
        {
            "--labels": [config.labels],
            "--images": [config.images_dir],
            "the model folder": [model_dir],
            "the input image": [i["path"] for i in items],
        },
    )
    if config.output and config.heatmaps:
        guard.check_outputs(
            {"--output": (config.output, "file")}, {"--heatmaps": [config.heatmaps]}
        )


def run(
    config: PredictConfig,
    write: Callable[[list[dict[str, Any]], bool], None] | None = None,
) -> list[dict[str, Any]]:
    """Predicts every image of the command, chunk by chunk; returns one row dict per image.

    Args:
      config: the command's settings.
      write: called with each chunk's rows (and whether the inputs are labeled) as soon as
        they are predicted, so output is written as it comes.
    """
    check(config)
    if config.input or config.sex_csv or config.beam_options or config.output_shards != 1:
        raise PredictError(
            "--input, --sex_csv, --output_shards and --beam_options need --runner beam"
        )
    items = predict_io.list_inputs(config.paths, config.sex, config.labels, config.images_dir)
    check_outputs(config, items)
    model_dir, checkpoint = resolve_model(config.model_dir, config.checkpoint)
    loaded = restore.load_model(model_dir, checkpoint)
    males = [i["male"] for i in items]
    sex = _sex_array(None if None in males else males, len(items), loaded)
    size = restore.model_image_size(loaded)
    labeled = any(i["boneage"] is not None for i in items)
    names = heatmap.file_names([i["id"] for i in items], [i["path"] for i in items])
    chunk = max(MIN_CHUNK, CHUNK_BATCHES * config.batch_size)
    progress = predict_io.Progress(len(items))
    fns = {"predict": predict_fn(loaded, config.tta)}
    done: list[dict[str, Any]] = []
    unreadable = 0
    for start in range(0, len(items), chunk):
        part, part_sex = items[start : start + chunk], sex[start : start + chunk]
        part_names = names[start : start + chunk]
        batch, problems = _read_all([i["path"] for i in part], loaded.derived, size, config.force)
        if len(problems) == 1 and len(items) == 1 and not config.skip_unreadable:
            raise PredictError(f"cannot use {guard.printable(problems[0][0])}: {problems[0][1]}")
        for path, reason in problems:
            word = "skipped" if config.skip_unreadable else "unreadable"
            progress.clear()
            print(f"{word} {guard.printable(path)}: {reason}", file=sys.stderr)
        unreadable += len(problems)
        if problems and not config.skip_unreadable:
            raise PredictError(
                f"cannot read {unreadable} of {len(items)} images (listed above; "
                "--skip_unreadable predicts the others)"
            )
        bad = {path for path, _ in problems}
        keep = np.array([i["path"] not in bad for i in part], bool)
        part = [i for i, k in zip(part, keep, strict=True) if k]
        part_names = [n for n, k in zip(part_names, keep, strict=True) if k]
        part_sex = part_sex[keep]
        if part:
            _predict_chunk(config, loaded, part, batch, part_sex, part_names, fns)
            if write is not None:
                write(part, labeled)
            done.extend(part)
        progress.update(start + len(keep))
    progress.close()
    if not done:
        raise PredictError("no readable images left to predict")
    return done


def _predict_chunk(
    config: PredictConfig,
    loaded: restore.LoadedModel,
    items: list[dict[str, Any]],
    batch: np.ndarray,
    sex: np.ndarray,
    names: Sequence[str],
    fns: dict[str, Callable[..., Any]],
) -> None:
    """Predicts one chunk of prepared inputs into its row dicts (and writes its heatmaps)."""
    months, spread = predict_batch(
        loaded, batch, sex, tta=config.tta, batch_size=config.batch_size, fn=fns["predict"]
    )
    bounds = None
    if config.interval:
        found = intervals.around(
            loaded.derived, config.tta, config.interval_scale, config.interval,
            months, spread, loaded.model_dir,
        )  # fmt: skip
        bounds = (found.low, found.high, found.level)
    for i, (item, value, m) in enumerate(zip(items, months, sex, strict=True)):
        item.update(male=int(m > 0.5), predicted=float(value))
        if bounds is not None:
            item.update(low_months=float(bounds[0][i]), high_months=float(bounds[1][i]))
        labeled = item["boneage"] is not None
        item["error"] = float(value) - item["boneage"] if labeled else None
    if config.heatmaps:
        if "map" not in fns:  # Traced once for all chunks.
            fns["map"] = tf.function(heatmap.map_fn(loaded.model))
        written = heatmap.write_overlays(
            loaded.model,
            batch,
            sex,
            [i["id"] for i in items],
            months,
            config.heatmaps,
            batch_size=config.batch_size,
            names=names,
            fn=fns["map"],
            intervals=bounds,
        )
        for item, path in zip(items, written, strict=True):
            item["heatmap"] = path
