"""Converter throughput against its floor: single-core PNG decode rate x cores.

    python -m tools.benchmark_convert [--repeat 20] [--json PATH]

Replicates the RSNA sample PNGs (1600x2080) `--repeat` times into a temp folder, measures on the
same files (1) the single-core decode rate of Pillow, the decoder the converter uses (bytes
already in memory, decode only: the floor), and (2) the end-to-end rate of
`tools.make_tfrecords.convert` with one worker per core, and prints
convert_vs_floor = convert_img_s / (png_decode_img_s_per_core x cores). The floor is measured
before and after the conversion and the faster one is used (a conservative ratio).
"""

from __future__ import annotations

import csv
import dataclasses
import io
import os
import pathlib
import resource
import sys
import tempfile
import time
from collections.abc import Sequence
from typing import Any

import tensorflow as tf
from PIL import Image

from boneage_tpu import cli
from boneage_tpu.cli import option
from boneage_tpu.convert import job as make_tfrecords
from boneage_tpu.convert import workers as convert_workers
from boneage_tpu.core.errors import UsageError
from boneage_tpu.data import images
from tools import _summary

_SAMPLE = pathlib.Path(__file__).resolve().parents[2] / "shared" / "data" / "rsna-sample"


def replicate(labels_csv: str, images_dir: str, repeat: int, folder: str) -> tuple[str, str]:
    """Copies every labeled image `repeat` times under new ids; returns (csv, images folder)."""
    out_images = f"{folder}/images"
    tf.io.gfile.makedirs(out_images)
    with tf.io.gfile.GFile(labels_csv, "rb") as f:
        rows = list(csv.DictReader(io.StringIO(f.read().decode("utf-8-sig"))))
    lines = ["id,boneage,male"]
    for k in range(repeat):
        for row in rows:
            new_id = f"{row['id']}r{k}"
            tf.io.gfile.copy(f"{images_dir}/{row['id']}.png", f"{out_images}/{new_id}.png")
            lines.append(f"{new_id},{row['boneage']},{row['male']}")
    with tf.io.gfile.GFile(f"{folder}/labels.csv", "w") as f:
        f.write("\n".join(lines) + "\n")
    return f"{folder}/labels.csv", out_images


def _read_all(files: Sequence[str]) -> list[bytes]:
    """Returns the bytes of every file, read before timing the decoder."""
    blobs = []
    for path in files:
        with tf.io.gfile.GFile(path, "rb") as f:
            blobs.append(f.read())
    return blobs


def decode_rate(blobs: Sequence[bytes]) -> tuple[float, float]:
    """Single-core Pillow PNG decode of in-memory files: (img/s wall, CPU ms per image)."""
    start, cpu = time.perf_counter(), time.process_time()
    for blob in blobs:
        Image.open(io.BytesIO(blob)).load()
    cpu = time.process_time() - cpu
    return len(blobs) / (time.perf_counter() - start), 1000 * cpu / len(blobs)


def prepare_cpu_ms(files: Sequence[str], blobs: Sequence[bytes], size: int, encoding: str) -> float:
    """CPU ms per image of the workers' job (decode, grayscale, resize, encode) on one core."""
    cpu = time.process_time()
    for path, blob in zip(files, blobs, strict=True):
        images.prepare(blob, path, size, encoding)
    return 1000 * (time.process_time() - cpu) / len(blobs)


def _cpu_seconds() -> tuple[float, float]:
    """CPU seconds (user + system) of this process and of its finished child processes."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime, children.ru_utime + children.ru_stime


def run(
    labels_csv: str,
    images_dir: str,
    repeat: int,
    image_size: int,
    encoding: str,
    num_workers: int,
    json_path: str = "",
) -> dict[str, Any]:
    """Runs the benchmark and returns (and prints) the figures."""
    import tensorflow_datasets  # noqa: F401  Imported before timing: a one-off process cost.

    # The workers' allocator settings here too: the floor is the same decoder, same conditions.
    convert_workers.tune_malloc()
    cores = len(os.sched_getaffinity(0))
    num_workers = num_workers or cores
    with tempfile.TemporaryDirectory(prefix="benchmark_convert_") as folder:
        csv_path, image_folder = replicate(labels_csv, images_dir, repeat, folder)
        files = sorted(f"{image_folder}/{n}" for n in tf.io.gfile.listdir(image_folder))
        blobs = _read_all(files)
        floor_before, decode_cpu_before = decode_rate(blobs)
        # One copy of each source image: the same mix as the whole set.
        prepare_ms = prepare_cpu_ms(files[::repeat], blobs[::repeat], image_size, encoding)
        cpu_before = _cpu_seconds()
        start = time.perf_counter()
        manifest = make_tfrecords.convert(
            csv_path,
            image_folder,
            f"{folder}/out",
            image_size=image_size,
            encoding=encoding,
            num_workers=num_workers,
            quiet=True,
        )
        seconds = time.perf_counter() - start
        cpu_after = _cpu_seconds()
        floor_after, decode_cpu_after = decode_rate(blobs)
    count = manifest["records_written"]
    floor = max(floor_before, floor_after)
    decode_ms = min(decode_cpu_before, decode_cpu_after)
    main_ms, workers_ms = (
        1000 * (b - a) / count for a, b in zip(cpu_before, cpu_after, strict=True)
    )
    convert_rate = count / seconds
    result = {
        "convert_img_s": round(convert_rate, 2),
        "png_decode_img_s_per_core": round(floor, 2),
        "cores": cores,
        "convert_vs_floor": round(convert_rate / (floor * cores), 3),
        "images": count,
        "num_workers": num_workers,
        "image_size": image_size,
        "encoding": encoding,
        "convert_seconds": round(seconds, 2),
        "png_decode_img_s_per_core_before_after": [round(floor_before, 2), round(floor_after, 2)],
        "load_average_1min": round(os.getloadavg()[0], 2),
        # CPU-time view, much less sensitive to other processes on the machine:
        "png_decode_cpu_ms_per_img": round(decode_ms, 2),
        "prepare_cpu_ms_per_img": round(prepare_ms, 2),
        "convert_cpu_ms_per_img_main": round(main_ms, 2),
        "convert_cpu_ms_per_img_workers": round(workers_ms, 2),
        "decode_share_of_convert_cpu": round(decode_ms / (main_ms + workers_ms), 3),
    }
    _summary.report(result, json_path)
    return result


@dataclasses.dataclass
class BenchConfig:
    """Settings of the converter benchmark."""

    labels: str = option(str(_SAMPLE / "boneage-training-dataset.csv"), "Kaggle-layout CSV.")
    images: str = option(str(_SAMPLE / "boneage-training-dataset"), "Folder of <id>.png.")
    repeat: int = option(20, "Copies of each image.", min=1)
    image_size: int = option(512, "Converter --image_size.", min=1, max=65536)
    encoding: str = option("jpeg", "Converter --encoding.", choices=("jpeg", "png", "raw"))
    num_workers: int = option(0, "Converter workers (0: one per core).", min=0)
    json: str = option("", "Also write the figures to this JSON file.")


def _job(config: BenchConfig) -> None:
    """Checks that the inputs exist, then runs the benchmark."""
    # Checked first: the replication would fail half-way with a longer message.
    for name in ("labels", "images"):
        path = getattr(config, name)
        found = tf.io.gfile.isdir(path) if name == "images" else tf.io.gfile.exists(path)
        if not found:
            raise UsageError(f"--{name} {path} not found")
    run(
        config.labels,
        config.images,
        config.repeat,
        config.image_size,
        config.encoding,
        config.num_workers,
        config.json,
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Parses the flags in `argv` (argv[0] is the program) and runs; returns the exit status."""
    return cli.main("benchmark_convert", BenchConfig, _job, argv, __doc__)


if __name__ == "__main__":
    sys.exit(main(sys.argv))
