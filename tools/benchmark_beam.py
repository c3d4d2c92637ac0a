"""The converter on Beam's local runner vs the local converter: img/s, ratio, and scaling.

    python -m tools.benchmark_beam [--source phantom|FOLDER] [--sizes 1000,2000,5000,10000]
        [--workers 0] [--image_size 256] [--json PATH]

FOLDER is a Kaggle-layout folder (`boneage-training-dataset.csv` + `boneage-training-dataset/`),
e.g. ../shared/data/rsna-train-256; `phantom` generates `max(sizes)` phantom images first (not
timed). For each size N the first N CSV rows (by id) are converted twice into fresh folders with
the same options and worker count: the local converter (`--runner local`, a process pool) and
`--runner beam` (Beam's FnApiRunner, one process per worker). Printed per N: seconds, img/s of
each, beam/local ratio; then a least-squares fit seconds = fixed + N x per_image for each runner:
per_image x workers is the core-seconds per image, the input of the Dataflow estimate in
BENCHMARKS.md; a fixed cost that dominates small N (Beam starts its workers and imports
TensorFlow in each) does not scale with N. `--sizes all` converts the whole folder.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import tensorflow as tf
from absl import logging

from boneage_tpu import cli
from boneage_tpu.cli import option
from boneage_tpu.convert import job as make_tfrecords
from boneage_tpu.core import beam_runtime
from boneage_tpu.core.errors import UsageError
from boneage_tpu.phantom import job as make_phantom
from tools import _summary

CSV_NAME = "boneage-training-dataset.csv"
IMAGES_NAME = "boneage-training-dataset"


def subset_csv(labels_csv: str, size: int | None, path: str) -> int:
    """Writes the first `size` rows (by id; None: all) of a Kaggle CSV to `path`; returns the count."""
    with tf.io.gfile.GFile(labels_csv, "rb") as f:
        rows = list(csv.DictReader(io.StringIO(f.read().decode("utf-8-sig"))))
    rows = sorted(rows, key=lambda r: r["id"])[: size or len(rows)]
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return len(rows)


def time_convert(labels_csv: str, images_dir: str, out: str, **kwargs: Any) -> float:
    """Seconds of one conversion into a fresh folder (removed afterwards)."""
    started = time.perf_counter()
    make_tfrecords.convert(labels_csv, images_dir, out, quiet=True, overwrite=True, **kwargs)
    seconds = time.perf_counter() - started
    shutil.rmtree(out, ignore_errors=True)
    return seconds


def fit(sizes: Sequence[int], seconds: Sequence[float]) -> dict[str, float]:
    """Least squares seconds = fixed + size x per_image (per_image only for a single size)."""
    if len(sizes) < 2:
        return {"fixed_s": 0.0, "per_image_s": seconds[0] / sizes[0]}
    per_image, fixed = np.polyfit(np.asarray(sizes, float), np.asarray(seconds, float), 1)
    return {"fixed_s": float(fixed), "per_image_s": float(per_image)}


def run(
    source: str, sizes: Sequence[int | None], workers: int, image_size: int, tmp: str
) -> dict[str, Any]:
    """Runs the comparison; returns {"rows": [...], "fit": {...}}."""
    if source == "phantom":
        largest = max(s for s in sizes if s)
        make_phantom.generate(f"{tmp}/phantom", largest, seed=0, num_workers=workers)
        source = f"{tmp}/phantom"
    labels, images_dir = f"{source}/{CSV_NAME}", f"{source}/{IMAGES_NAME}"
    options = {"image_size": image_size, "encoding": "jpeg", "num_workers": workers}
    rows = []
    for size in sizes:
        subset = f"{tmp}/labels-{size or 'all'}.csv"
        count = subset_csv(labels, size, subset)
        local = time_convert(subset, images_dir, f"{tmp}/local", **options)
        beam = time_convert(subset, images_dir, f"{tmp}/beam", runner="beam", **options)
        row = {
            "images": count,
            "local_s": round(local, 2),
            "beam_s": round(beam, 2),
            "local_img_s": round(count / local, 1),
            "beam_img_s": round(count / beam, 1),
            "beam_vs_local": round(local / beam, 3),
        }
        print(json.dumps(row), flush=True)
        rows.append(row)
    counts = [r["images"] for r in rows]
    return {
        "source": source,
        "workers": workers,
        "image_size": image_size,
        "rows": rows,
        "fit": {
            "local": fit(counts, [r["local_s"] for r in rows]),
            "beam": fit(counts, [r["beam_s"] for r in rows]),
        },
    }


@dataclasses.dataclass
class BenchConfig:
    """Settings of the Beam vs local comparison."""

    source: str = option("phantom", "phantom, or a Kaggle-layout folder of images.")
    sizes: tuple[str, ...] = option(
        ("1000", "2000", "5000", "10000"), "Image counts (or 'all').", comma_list=True
    )
    workers: int = option(0, "Worker processes of both runners (0: the CPU count).", min=0)
    image_size: int = option(256, "--image_size of both conversions.", min=1, max=65536)
    json: str = option("", "Also write the results here.")


def parse_sizes(sizes: Sequence[str]) -> list[int | None]:
    """The --sizes list as image counts (None: the whole folder); UsageError for anything else."""
    counts: list[int | None] = []
    for size in sizes:
        if size == "all":
            counts.append(None)
        elif size.isdigit() and int(size) > 0:
            counts.append(int(size))
        else:
            raise UsageError(f"--sizes must be image counts >= 1 or 'all', got {size!r}")
    if not counts:
        raise UsageError("--sizes is empty")
    return counts


def _job(config: BenchConfig) -> None:
    """Checks the sizes and the source, runs the comparison and prints its table and fits."""
    sizes = parse_sizes(config.sizes)
    if config.source == "phantom" and not any(sizes):
        raise UsageError("--sizes all needs a --source folder (a phantom has no 'all')")
    if config.source != "phantom" and not tf.io.gfile.exists(f"{config.source}/{CSV_NAME}"):
        raise UsageError(f"--source {config.source} has no {CSV_NAME} (a Kaggle-layout folder)")
    logging.set_verbosity(logging.WARNING)  # app.run's INFO would log every Beam bundle.
    workers = beam_runtime.local_workers(config.workers or None)
    with tempfile.TemporaryDirectory(prefix="benchmark_beam_") as tmp:
        result = run(config.source, sizes, workers, config.image_size, tmp)
    print(f"{'images':>8}{'local s':>9}{'beam s':>9}{'local/s':>9}{'beam/s':>9}{'ratio':>7}")
    for r in result["rows"]:
        print(
            f"{r['images']:>8}{r['local_s']:>9.1f}{r['beam_s']:>9.1f}{r['local_img_s']:>9.1f}"
            f"{r['beam_img_s']:>9.1f}{r['beam_vs_local']:>7.2f}"
        )
    for name, line in result["fit"].items():
        print(
            f"{name}: fixed {line['fixed_s']:.1f} s + {1e3 * line['per_image_s']:.2f} ms/img "
            f"({1e3 * line['per_image_s'] * workers:.1f} core-ms/img at {workers} workers)"
        )
    _summary.write_json(result, config.json)


def main(argv: Sequence[str] | None = None) -> int:
    """Parses the flags in `argv` (argv[0] is the program) and runs; returns the exit status."""
    return cli.main("benchmark_beam", BenchConfig, _job, argv, __doc__)


if __name__ == "__main__":
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    sys.exit(main(sys.argv))
