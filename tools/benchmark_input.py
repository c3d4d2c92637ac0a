"""Input-pipeline benchmark: the seed's Keras generator vs our host path, with and without augmentation.

    python -m tools.benchmark_input --labels CSV --images DIR [--json PATH]

In one run over the same images (the CSV's images replicated `--replicate` times):
  (a) seed:  tf_keras ImageDataGenerator(rotation 20, shifts 0.2, zoom 0.2, flip, shear 0.2)
             .flow_from_dataframe at 299 px, batch 32, over the original files;
  (b) host:  TFRecords (512 px JPEG) -> `data.build_dataset` training batches (uint8), cache off;
  (c) full:  (b) + `augment.augment_batch` compiled with XLA and run on the CPU;
  (d) floor: `tf.io.decode_jpeg` + `data.fit_to_square` of the same records in a tight
             in-graph loop pinned to one core: b / (d x cores) is what the pipeline keeps of
             the machine (parsing, threading, batching cost the rest).
Each stage runs in its own process (clean peak RSS, no thread-pool sharing), `--trials` times,
the stages taking turns so that a slow spell of the machine hits all of them; each stage reports
its median trial (all trials are kept in the JSON). `--growth 4` also runs (b) over 4x the
images to check that host memory does not grow with the dataset.
The records are written by `tools.make_tfrecords.convert` (512 px JPEG, quality 95).
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from typing import Any

from boneage_tpu import cli
from boneage_tpu.cli import option
from boneage_tpu.core.errors import Error
from tools import _summary

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
STAGES = ("seed", "host", "full", "floor")
STEPS_PER_CALL = 8  # batches per tf.function call in (b) and (c), like --steps_per_loop


@dataclasses.dataclass
class BenchConfig:
    """Settings of one benchmark run."""

    labels: str = option("", "Kaggle-layout CSV: id,boneage,male", required=True)
    images: str = option("", "folder with <id>.png for every CSV row", required=True)
    replicate: int = option(32, "copies of each image", min=1)
    image_size: int = option(299, "training image side", min=1)
    record_size: int = option(512, "longest side of the JPEG records", min=1)
    batch_size: int = option(32, "batch size", min=1)
    seconds: float = option(6.0, "timed seconds per stage (after warm-up)", min=0)
    growth: int = option(4, "also run (b) over this many x the images (0: off)", min=0)
    trials: int = option(3, "runs of each stage, taking turns; the median is reported", min=1)
    seed_color_mode: str = option("rgb", "seed loader color mode", choices=("rgb", "grayscale"))
    work_dir: str = option("", "temporary inputs go here (default: system temp)")
    json: str = option("", "also write the summary to this JSON file")
    # The stage processes' own flags (see `_spawn`).
    stage: str = option("", "internal: run one stage in this process", flag="_stage")
    inputs: str = option("", "internal: the prepared inputs of --_stage", flag="_inputs")


class BenchError(Error):
    """A one-line problem with the benchmark's inputs."""


def read_labels(labels: str, images: str) -> list[tuple[str, float, bool, str]]:
    """Returns (id, boneage, male, path) for every CSV row; raises BenchError on bad input."""
    import pandas as pd

    try:
        frame = pd.read_csv(labels, dtype={"id": str})
    except (OSError, ValueError) as e:
        raise BenchError(f"cannot read {labels}: {e}") from e
    missing_cols = {"id", "boneage", "male"} - set(frame.columns)
    if missing_cols:
        raise BenchError(f"{labels} lacks columns {sorted(missing_cols)} (need id,boneage,male)")
    rows, missing = [], []
    for image_id, age, male in zip(frame["id"], frame["boneage"], frame["male"], strict=True):
        path = os.path.join(images, f"{image_id}.png")
        if not os.path.isfile(path):
            missing.append(image_id)
            continue
        rows.append((str(image_id), float(age), str(male).strip().lower() in ("true", "1"), path))
    if missing:
        raise BenchError(f"{len(missing)} images of {labels} not in {images}, e.g. {missing[:3]}")
    if not rows:
        raise BenchError(f"{labels} lists no images")
    return rows


def write_inputs(config: BenchConfig, rows: list, copies: int, out: pathlib.Path) -> int:
    """Writes `copies` x the images: PNG links + CSVs (seed) and, via the converter, TFRecords."""
    from boneage_tpu.convert import job as make_tfrecords
    from boneage_tpu.data.layouts import ConvertError

    (out / "png").mkdir(parents=True)
    kaggle, seed = ["id,boneage,male"], ["id,boneage,male,filename"]
    for image_id, age, male, path in rows:
        for k in range(copies):
            new_id = f"{image_id}x{k}"
            os.symlink(os.path.abspath(path), out / "png" / f"{new_id}.png")
            kaggle.append(f"{new_id},{age},{male}")
            seed.append(f"{new_id},{age},{male},{new_id}.png")
    (out / "labels.csv").write_text("\n".join(kaggle) + "\n")
    (out / "seed.csv").write_text("\n".join(seed) + "\n")
    try:
        manifest = make_tfrecords.convert(
            str(out / "labels.csv"), str(out / "png"), str(out / "records"),
            image_size=config.record_size, encoding="jpeg", split_name="train", quiet=True,
            strict=True,
        )  # fmt: skip
    except ConvertError as e:
        raise BenchError(f"converting the images failed: {e}") from e
    return manifest["splits"]["train"]["count"]


def _peak_rss_mb() -> float:
    """Returns this process's peak resident memory in MB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: kB.


def _cpu_seconds() -> float:
    """Returns this process's CPU seconds so far (user + system)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _timed(step: Callable[[], int], seconds: float, warmup: int = 2) -> dict[str, float]:
    """Runs `step() -> images done` for `seconds` after warm-up.

    Returns img/s, the CPU cores this process kept busy, and images per CPU-second (what the
    work costs, whatever other processes on the machine take).
    """
    for _ in range(warmup):
        step()
    done, start, cpu = 0, time.perf_counter(), _cpu_seconds()
    while time.perf_counter() - start < seconds:
        done += step()
    wall, cpu = time.perf_counter() - start, _cpu_seconds() - cpu
    return {"img_s": done / wall, "cores_used": cpu / wall, "img_per_cpu_s": done / cpu}


def stage_seed(config: BenchConfig, inputs: pathlib.Path) -> dict[str, float]:
    """(a) The seed's tf_keras ImageDataGenerator over the original PNGs."""
    import pandas as pd
    from tf_keras.preprocessing.image import ImageDataGenerator

    generator = ImageDataGenerator(
        rotation_range=20, width_shift_range=0.2, height_shift_range=0.2,
        zoom_range=0.2, horizontal_flip=True, shear_range=0.2,
    )  # fmt: skip
    flow = generator.flow_from_dataframe(
        pd.read_csv(inputs / "seed.csv"), directory=str(inputs / "png"), x_col="filename",
        y_col="boneage", target_size=(config.image_size, config.image_size),
        color_mode=config.seed_color_mode, class_mode="raw", batch_size=config.batch_size, seed=0,
    )  # fmt: skip
    return _timed(lambda: len(next(flow)[0]), config.seconds, warmup=1)


def stage_pipeline(config: BenchConfig, inputs: pathlib.Path, augmented: bool) -> dict[str, float]:
    """(b) host batches from TFRecords, or (c) the same plus XLA augmentation on the CPU.

    Batches are consumed inside a `tf.function` loop of `STEPS_PER_CALL` steps, as the trainer
    consumes them (`loop.TrainLoop`), so (b) times the pipeline and not a Python `next()` and
    tensor conversion per batch, which training never pays.
    """
    import tensorflow as tf

    from boneage_tpu.data import augment
    from boneage_tpu.data import pipeline as data

    dataset = data.build_dataset(
        str(inputs / "records"), "train", training=True, batch_size=config.batch_size,
        image_size=config.image_size, cache="no",
    )  # fmt: skip
    iterator = iter(dataset)

    @tf.function(jit_compile=True)
    def augment_step(images: tf.Tensor, step: tf.Tensor) -> tf.Tensor:
        seed = augment.replica_seed(0, step, 0)
        # A scalar result forces the whole batch to be computed.
        return tf.reduce_sum(augment.augment_batch(images, seed))

    @tf.function
    def run_steps(first_step: tf.Tensor) -> tf.Tensor:
        total = tf.constant(0.0)
        for i in tf.range(STEPS_PER_CALL, dtype=tf.int64):
            images = next(iterator)["image"]
            if augmented:
                total += augment_step(images, first_step + i)
            else:
                # Depend on every batch so none can be skipped.
                total += tf.cast(images[0, 0, 0, 0], tf.float32)
        return total

    calls = [0]

    def step() -> int:
        run_steps(tf.constant(calls[0] * STEPS_PER_CALL, tf.int64)).numpy()
        calls[0] += 1
        return STEPS_PER_CALL * config.batch_size

    return _timed(step, config.seconds)


def stage_floor(config: BenchConfig, inputs: pathlib.Path) -> dict[str, float]:
    """(d) decode_jpeg + fit_to_square per image, one core, no tf.data."""
    os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
    import tensorflow as tf

    tf.config.threading.set_intra_op_parallelism_threads(1)
    tf.config.threading.set_inter_op_parallelism_threads(1)
    from boneage_tpu.core import schema
    from boneage_tpu.data import pipeline as data

    files = sorted(str(p) for p in (inputs / "records").glob("*.tfrecord"))
    if not files:
        raise BenchError(f"no *.tfrecord files in {inputs / 'records'}")
    encoded = tf.stack([schema.parse_examples(r)["image"] for r in tf.data.TFRecordDataset(files)])
    size = config.image_size

    @tf.function
    def decode_all(images: tf.Tensor) -> tf.Tensor:
        return tf.map_fn(
            lambda b: data.fit_to_square(tf.io.decode_jpeg(b, channels=1), size),
            images,
            fn_output_signature=tf.TensorSpec([size, size, 1], tf.uint8),
            parallel_iterations=1,
        )

    return _timed(lambda: int(decode_all(encoded).shape[0]), config.seconds, warmup=1)


def run_stage(config: BenchConfig, stage: str, inputs: pathlib.Path) -> dict[str, float]:
    """Runs one stage in this process and returns its throughput and peak RSS."""
    if stage == "seed":
        result = stage_seed(config, inputs)
    elif stage in ("host", "full"):
        result = stage_pipeline(config, inputs, augmented=stage == "full")
    elif stage == "floor":
        result = stage_floor(config, inputs)
    else:
        raise BenchError(f"unknown stage {stage!r}; stages: {STAGES}")
    return result | {"peak_rss_mb": _peak_rss_mb()}


def _spawn(config: BenchConfig, stage: str, inputs: pathlib.Path) -> dict[str, float]:
    """Runs one stage in a fresh Python process and returns its result."""
    child = dataclasses.replace(config, json="", work_dir="", stage=stage, inputs=str(inputs))
    cmd = [sys.executable, "-m", "tools.benchmark_input"]
    cmd += [f"--{cli.flag_name(f)}={getattr(child, f.name)}" for f in cli.flag_fields(BenchConfig)]
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    proc = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, check=False)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
        raise BenchError(f"stage {stage} failed (exit {proc.returncode}): {' | '.join(tail)}")
    return json.loads(lines[-1][len("RESULT ") :])


def median_trial(results: list[dict[str, float]]) -> dict[str, float]:
    """Returns the trial with the median img/s (the lower middle one for an even count)."""
    if not results:
        raise BenchError("no trials ran: --trials must be >= 1")
    return sorted(results, key=lambda r: r["img_s"])[(len(results) - 1) // 2]


def summarise(res: dict[str, dict[str, float]], cores: int) -> dict[str, Any]:
    """Turns the per-stage results into the summary (the keys BENCHMARKS.md records)."""
    seed, host, full = res["seed"]["img_s"], res["host"]["img_s"], res["full"]["img_s"]
    floor = res["floor"]["img_s"]
    summary = {
        "seed_img_s": seed,
        "host_img_s": host,
        "full_img_s": full,
        "floor_img_s_per_core": floor,
        "cores": cores,
        "host_vs_seed": host / seed,
        "full_vs_seed": full / seed,
        "host_vs_floor": host / (floor * cores),
        "peak_rss_mb": res["host"]["peak_rss_mb"],
        # Load-independent cost: images per CPU-second the host path used vs the floor's.
        "host_img_per_cpu_s": res["host"]["img_per_cpu_s"],
        "host_cores_used": res["host"]["cores_used"],
        "floor_img_per_cpu_s": res["floor"]["img_per_cpu_s"],
        "host_cpu_vs_floor": res["host"]["img_per_cpu_s"] / res["floor"]["img_per_cpu_s"],
        "stage_peak_rss_mb": {stage: res[stage]["peak_rss_mb"] for stage in STAGES},
    }
    if "host_big" in res:
        summary["peak_rss_mb_big"] = res["host_big"]["peak_rss_mb"]
        summary["host_big_img_s"] = res["host_big"]["img_s"]
        summary["rss_growth"] = summary["peak_rss_mb_big"] / summary["peak_rss_mb"] - 1.0
    return summary


def report(summary: dict[str, Any], config: BenchConfig) -> str:
    """Formats the summary for the terminal."""
    s, cores = summary, summary["cores"]
    lines = [
        f"(a) seed ImageDataGenerator ({config.seed_color_mode}): {s['seed_img_s']:8.1f} img/s",
        f"(b) host tf.data uint8 batches:     {s['host_img_s']:8.1f} img/s   "
        f"b/a = {s['host_vs_seed']:.1f}",
        f"(c) host + XLA augment on CPU:      {s['full_img_s']:8.1f} img/s   "
        f"c/a = {s['full_vs_seed']:.1f}",
        f"(d) decode+resize, one core:        {s['floor_img_s_per_core']:8.1f} img/s   "
        f"b/(d x {cores}) = {s['host_vs_floor']:.2f}",
        f"(b) used {s['host_cores_used']:.2f} of {cores} cores: {s['host_img_per_cpu_s']:.0f} "
        f"img per CPU-second = {s['host_cpu_vs_floor']:.2f} x (d)'s "
        f"{s['floor_img_per_cpu_s']:.0f}",
        "img/s per trial: "
        + "; ".join(
            f"{k} {', '.join(f'{x:.0f}' for x in v)}" for k, v in s["trials_img_s"].items()
        ),
        "peak RSS MB: " + ", ".join(f"{k} {v:.0f}" for k, v in s["stage_peak_rss_mb"].items()),
        f"load average before/after: {s['load_before']} / {s['load_after']}",
    ]
    if "rss_growth" in s:
        lines.append(
            f"(b) over {s['images_big']} images: peak RSS {s['peak_rss_mb_big']:.0f} MB "
            f"({s['rss_growth']:+.1%} vs {s['images']} images), {s['host_big_img_s']:.1f} img/s"
        )
    return "\n".join(lines)


def run(config: BenchConfig) -> dict[str, Any]:
    """Runs the whole benchmark and returns the summary (also printed, and JSON if asked)."""
    rows = read_labels(config.labels, config.images)
    load_before = [round(x, 2) for x in os.getloadavg()]
    with tempfile.TemporaryDirectory(dir=config.work_dir or None) as tmp:
        base = pathlib.Path(tmp) / "base"
        count = write_inputs(config, rows, config.replicate, base)
        print(f"{count} images ({len(rows)} files x {config.replicate}), {config.image_size} px")
        trials: dict[str, list[dict[str, float]]] = {stage: [] for stage in STAGES}
        for _ in range(config.trials):
            for stage in STAGES:
                trials[stage].append(_spawn(config, stage, base))
        res = {stage: median_trial(results) for stage, results in trials.items()}
        big_count = 0
        if config.growth > 1:
            big = pathlib.Path(tmp) / "big"
            big_count = write_inputs(config, rows, config.replicate * config.growth, big)
            res["host_big"] = _spawn(config, "host", big)
    summary = summarise(res, len(os.sched_getaffinity(0)))
    summary |= {"images": count, "images_big": big_count, "load_before": load_before}
    summary["trials_img_s"] = {k: [round(r["img_s"], 1) for r in v] for k, v in trials.items()}
    summary["load_after"] = [round(x, 2) for x in os.getloadavg()]
    print(report(summary, config))
    _summary.write_json(summary, config.json)
    return summary


def _job(config: BenchConfig) -> None:
    """Runs the benchmark, or (in a stage process) one stage, printing its RESULT line."""
    if config.stage:
        result = run_stage(config, config.stage, pathlib.Path(config.inputs))
        print("RESULT " + json.dumps(result))
        return
    run(config)


def main(argv: Sequence[str] | None = None) -> int:
    """Parses the command line and runs the benchmark (or, internally, one stage)."""
    return cli.main("benchmark_input", BenchConfig, _job, argv, __doc__)


if __name__ == "__main__":
    sys.exit(main(sys.argv))
