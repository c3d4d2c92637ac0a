"""Helpers shared by several test files, so that no test file imports from another one.

Toy TFRecords come from `tests.records` and model directories from `tests.model_dirs`; the
session-wide data fixtures (`toy_data`, `toy_dataset`, `phantom_images`, `phantom_run`) are in
`tests/conftest.py`.
"""

from __future__ import annotations

import dataclasses
import pathlib
import subprocess
import sys

import numpy as np
import pandas as pd
import tensorflow as tf
from PIL import Image

from boneage_tpu.convert import job as make_tfrecords
from boneage_tpu.core import config as config_lib
from boneage_tpu.core import schema

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------- trainer


def train_config(data_dir: str, model_dir: pathlib.Path, **overrides) -> config_lib.TrainConfig:
    """The trainer tests' toy config: tiny backbone, 32 px, batch 4, 2 steps of 1 per loop."""
    values = {
        "data": data_dir,
        "model_dir": str(model_dir),
        "backbone": "tiny",
        "image_size": 32,
        "dense_units": (16,),
        "batch_size": 4,
        "train_steps": 2,
        "steps_per_loop": 1,
        "checkpoint_every": 1,
        "learning_rate": 1e-3,
    }
    values.update(overrides)
    return config_lib.TrainConfig.from_flags(**values)


# ---------------------------------------------------------------- converter


def gradient_image(seed: int, shape: tuple[int, int] = (52, 40)) -> np.ndarray:
    """A uint8 diagonal gradient with seeded noise: every seed gives a different image."""
    rng = np.random.default_rng(seed)
    gradient = np.add.outer(np.arange(shape[0]), np.arange(shape[1])) * 2
    return np.clip(gradient + rng.integers(0, 60, shape), 0, 255).astype(np.uint8)


def write_csv(path: pathlib.Path, lines: list[str], bom: bool = False, crlf: bool = False):
    """Writes `lines` as a CSV file (optionally with a UTF-8 BOM / CRLF endings); returns path."""
    data = (("\r\n" if crlf else "\n").join(lines) + ("\r\n" if crlf else "\n")).encode()
    path.write_bytes((b"\xef\xbb\xbf" if bom else b"") + data)
    return path


def png_dataset(tmp_path: pathlib.Path, n: int = 24, name: str = "data"):
    """n PNGs with ages spread over all bands and both sexes; returns (csv, images dir, labels)."""
    folder = tmp_path / name / "images"
    folder.mkdir(parents=True)
    labels = {}
    for i in range(n):
        image_id = str(1000 + i)
        Image.fromarray(gradient_image(i)).save(folder / f"{image_id}.png")
        labels[image_id] = (float((i * 37) % 229 + 3), i % 3 != 0)
    lines = ["id,boneage,male"] + [f"{k},{a:g},{m}" for k, (a, m) in labels.items()]
    return write_csv(tmp_path / name / "labels.csv", lines), folder, labels


def convert(csv, folder, out, **kwargs) -> dict:
    """The converter in process (no worker processes, quiet unless told); returns the manifest."""
    kwargs.setdefault("num_workers", 0)
    kwargs.setdefault("quiet", True)
    return make_tfrecords.convert(str(csv), str(folder), str(out), **kwargs)


def read_records(out, split: str) -> list[dict]:
    """Every record of a converted split, parsed, in shard order."""
    manifest = schema.read_manifest(str(out))
    files = schema.shard_paths(str(out), manifest, split)
    parsed = tf.data.TFRecordDataset(files).map(schema.parse_examples)
    return [{k: v.numpy() for k, v in r.items()} for r in parsed]


def shard_bytes(out) -> dict[str, bytes]:
    """Shard file name -> its bytes, for byte-for-byte comparisons of two conversions."""
    return {p.name: p.read_bytes() for p in sorted(pathlib.Path(out).glob("*.tfrecord"))}


def without_time(manifest: dict) -> dict:
    """The manifest without its creation time, for comparing two conversions."""
    return {k: v for k, v in manifest.items() if k != "created_utc"}


# ---------------------------------------------------------------- evaluation report


def recompute_from_csv(path, train_mean: float) -> dict:
    """Plain numpy/pandas metrics from predictions.csv, independent of boneage_tpu.metrics."""
    df = pd.read_csv(path, dtype={"id": str})
    lab = df.dropna(subset=["boneage"])
    err = lab["predicted"].to_numpy() - lab["boneage"].to_numpy()
    y = lab["boneage"].to_numpy()
    males = lab["male"].to_numpy() == 1
    return {
        "n": len(df),
        "mae_months": np.mean(np.abs(err)),
        "rmse_months": np.sqrt(np.mean(err**2)),
        "bias": np.mean(err),
        "r2": 1 - np.sum(err**2) / np.sum((y - y.mean()) ** 2),
        "mean_predictor_mae_months": np.mean(np.abs(y - train_mean)),
        "mae_male": np.mean(np.abs(err[males])),
        "mae_female": np.mean(np.abs(err[~males])),
        "error_column_max_diff": np.max(np.abs(lab["error"].to_numpy() - err)),
    }


# ---------------------------------------------------------------- benchmark tools

TINY_FLAGS = """# a tiny recipe for tests
--backbone=tiny
--image_size=40
--dense_units=16
--batch_size=8
--train_steps=2000
--steps_per_loop=5
--checkpoint_every=1000
--learning_rate=0.002
--warmup_steps=10
--noattention
"""


def phantom_command(tool: str, tmp_path: pathlib.Path, output: pathlib.Path) -> list[str]:
    """`python -m tool` on a 60-image phantom in tmp_path with TINY_FLAGS as its flagfile."""
    phantom = tmp_path / "phantom"
    subprocess.run(
        [sys.executable, "-m", "tools.make_phantom", "--output", str(phantom)]
        + ["--num_images", "60", "--width", "96", "--height", "120"],
        cwd=REPO_ROOT, check=True, capture_output=True,
    )  # fmt: skip
    flagfile = tmp_path / "tiny.flags"
    flagfile.write_text(TINY_FLAGS)
    cmd = [sys.executable, "-m", tool, "--labels", str(phantom / "boneage-training-dataset.csv")]
    cmd += ["--images", str(phantom / "boneage-training-dataset"), "--output", str(output)]
    return cmd + ["--flagfile", str(flagfile)]


DERIVED_FIELDS = frozenset(f.name for f in dataclasses.fields(config_lib.Derived))


def config_and_derived(**values) -> tuple[config_lib.TrainConfig, config_lib.Derived]:
    """Splits flag values and derived values (label stats, stored format) into their two classes.

    `build_model(*config_and_derived(backbone="tiny", image_size=32, label_std=40.0))`.
    """
    derived = {k: values.pop(k) for k in list(values) if k in DERIVED_FIELDS}
    return config_lib.TrainConfig.from_flags(**values), config_lib.Derived(**derived)
