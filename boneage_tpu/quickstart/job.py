"""End-to-end quickstart on phantom data: phantom PNGs -> TFRecords -> train -> evaluate.

    boneage-quickstart [--output runs/quickstart] [--num_images 1000] [--nouse_sex]

Everything lands under `--output`: `phantom/`, `data/`, `model/` (or `--model_name`) and the
evaluation in `model/eval/val-<step>/`. Rerunning reuses what is already there (the phantom
and the TFRecords when their settings match, the finished training run); `--overwrite` starts
from scratch.
"""

from __future__ import annotations

import dataclasses
import json
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
import shutil
import time
from typing import Any

from boneage_tpu.cli import option

PHANTOM_STAMP = "quickstart.json"


@dataclasses.dataclass
class QuickstartConfig:
    """Settings of the quickstart; the defaults are the documented, benchmarked ones."""

    output: str = option("runs/quickstart", "Folder for everything the quickstart writes.")
    num_images: int = option(1000, "Phantom images to generate.", min=10, max=10**7)
    seed: int = option(0, "Seed of the phantom, the split and the training.", min=0, max=2**31 - 1)
    # The model sees 128 px, so the phantom is drawn at 320x400 (not the tool's 640x800
    # default): 4x fewer pixels to render and decode, the same anatomy after downscaling.
    phantom_width: int = 320
    phantom_height: int = 400
    data_image_size: int = 128
    val_fraction: float = 0.2
    image_size: int = option(128, "Training image size (pixels, square).", min=16, max=1024)
    batch_size: int = option(32, "Global batch size.", min=1, max=4096)
    train_steps: int = option(1500, "Training steps.", min=1, max=10**7)
    dense_units: tuple[int, ...] = (64,)
    learning_rate: float = option(2e-3, "Peak learning rate.", min=0, max=100)
    use_sex: bool = option(True, "Give the model the sex input.")
    model_name: str = option("model", "Model folder name under --output.")
    overwrite: bool = option(False, "Delete --output first.")


def _log(message: str) -> None:
    print(f"[quickstart] {message}", flush=True)


def make_phantom(config: QuickstartConfig) -> str:
    """Generates the phantom set unless one with the same settings is already there."""
    from boneage_tpu.phantom import job as make_phantom

    folder = os.path.join(config.output, "phantom")
    settings = {
        "num_images": config.num_images,
        "seed": config.seed,
        "width": config.phantom_width,
        "height": config.phantom_height,
    }
    stamp = os.path.join(folder, PHANTOM_STAMP)
    if os.path.exists(stamp):
        with open(stamp, encoding="utf-8") as f:
            if json.load(f) == settings:
                _log(f"phantom: reusing {folder}")
                return folder
    start = time.perf_counter()
    records = make_phantom.generate(folder, overwrite=True, **settings)
    make_phantom.sheet_from_records(os.path.join(config.output, "contact_sheet.png"), records)
    with open(stamp, "w", encoding="utf-8") as f:
        json.dump(settings, f)
    _log(f"phantom: {config.num_images} images in {time.perf_counter() - start:.0f} s -> {folder}")
    return folder


def make_records(config: QuickstartConfig, phantom: str) -> str:
    """Converts the phantom set to TFRecords (the converter resumes or reuses finished work)."""
    from boneage_tpu.convert import job as make_tfrecords

    output = os.path.join(config.output, "data")
    start = time.perf_counter()
    manifest = make_tfrecords.convert(
        os.path.join(phantom, "boneage-training-dataset.csv"),
        os.path.join(phantom, "boneage-training-dataset"),
        output,
        image_size=config.data_image_size,
        encoding="png",
        val_fraction=config.val_fraction,
        split_seed=config.seed,
        quiet=True,
    )
    counts = {name: split["count"] for name, split in manifest["splits"].items()}
    _log(f"tfrecords: {counts} in {time.perf_counter() - start:.0f} s -> {output}")
    return output


def train_model(config: QuickstartConfig, data: str) -> str:
    """Trains the tiny CNN on CPU (resuming or reusing a finished run in the same folder)."""
    from boneage_tpu.core import config as config_lib
    from boneage_tpu.train import job as train

    model_dir = os.path.join(config.output, config.model_name)
    train_config = config_lib.TrainConfig.from_flags(
        data=data,
        model_dir=model_dir,
        backbone="tiny",
        weights="none",
        image_size=config.image_size,
        dense_units=config.dense_units,
        use_sex=config.use_sex,
        batch_size=config.batch_size,
        train_steps=config.train_steps,
        steps_per_loop=50,
        checkpoint_every=400,
        learning_rate=config.learning_rate,
        warmup_steps=50,
        seed=config.seed,
    )
    start = time.perf_counter()
    train.run(train_config)
    _log(f"training: {time.perf_counter() - start:.0f} s -> {model_dir}")
    return model_dir


def run(config: QuickstartConfig) -> dict[str, Any]:
    """Runs phantom -> TFRecords -> train -> evaluate and returns the evaluation metrics."""
    from absl import logging

    from boneage_tpu.evaluate import job as evaluate

    # Progress lines only: TF's and absl's INFO logs would bury them.
    logging.set_verbosity(logging.WARNING)
    if config.overwrite and os.path.exists(config.output):
        shutil.rmtree(config.output)
    start = time.perf_counter()
    phantom = make_phantom(config)
    data = make_records(config, phantom)
    model_dir = train_model(config, data)
    metrics = evaluate.run(model_dir=model_dir, data=data, split="val")
    report = os.path.join(metrics["output"], "report.html") if "output" in metrics else ""
    ratio = metrics["mae_months"] / metrics["mean_predictor_mae_months"]
    _log(f"done in {time.perf_counter() - start:.0f} s")
    print(
        f"validation MAE {metrics['mae_months']:.2f} months"
        f" | predicting the training mean: {metrics['mean_predictor_mae_months']:.2f} months"
        f" | ratio {ratio:.2f} (n={metrics['n']})"
    )
    if report:
        print(f"report: {report}")
    return metrics
