"""The CPU step's knobs besides precision: tensor layout and TensorFlow's thread pools.

    python -m tools.benchmark_layout [--layouts channels_last,channels_first]
        [--precisions fp32,bf16] [--image_size 128] [--batch_size 32] [--steps 20] [--loops 3]
        [--intra_op_threads 0] [--inter_op_threads 0] [--json PATH]

For every layout x precision, `backbones.resnet_small` (the CPU recipe's backbone) with a
pooled one-unit head trains on one synthetic batch held in memory: forward, L1 loss,
gradients and an Adam update, `--steps` steps per `tf.function` call (the trainer's loop
shape), `--loops` timed calls after one warm-up call (tracing). No input pipeline and no
augmentation: only the step's compute. Thread pools are per process (TensorFlow fixes them
at its first op), so a thread setting is one run of the tool; 0 keeps TensorFlow's default.
A layout TensorFlow cannot run on this device is reported with its one-line error.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
import statistics
import sys
import time
from collections.abc import Sequence
from typing import Any

from boneage_tpu import cli
from boneage_tpu.cli import option

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

LAYOUTS = ("channels_last", "channels_first")
PRECISIONS = {"fp32": "float32", "bf16": "mixed_bfloat16"}


@dataclasses.dataclass
class LayoutConfig:
    """The benchmark's settings (its flags)."""

    layouts: tuple[str, ...] = option(
        LAYOUTS, "layouts, comma-separated.", choices=LAYOUTS, comma_list=True
    )
    precisions: tuple[str, ...] = option(
        ("fp32", "bf16"), "precisions, comma-separated.", choices=tuple(PRECISIONS), comma_list=True
    )
    image_size: int = option(128, "training image side", min=32)
    batch_size: int = option(32, "batch size", min=1)
    steps: int = option(20, "steps per timed call", min=1)
    loops: int = option(3, "timed calls (median)", min=1)
    intra_op_threads: int = option(0, "TensorFlow intra-op threads (0: its default)", min=0)
    inter_op_threads: int = option(0, "TensorFlow inter-op threads (0: its default)", min=0)
    json: str = option("", "also write the summary to this JSON file")


def bench_one(config: LayoutConfig, layout: str, precision: str) -> dict[str, Any]:
    """Times one layout x precision; returns {"img_s", "loops_img_s"} or {"error"}."""
    import keras
    import tensorflow as tf

    from boneage_tpu.modeling import backbones

    keras.utils.set_random_seed(0)
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy(PRECISIONS[precision])
    try:
        backbone = backbones.resnet_small(config.image_size, data_format=layout)
        pooled = keras.layers.GlobalAveragePooling2D(data_format=layout)(backbone.output)
        months = keras.layers.Dense(1, dtype="float32")(pooled)
        model = keras.Model(backbone.input, months)
    finally:
        keras.config.set_dtype_policy(previous)
    optimizer = keras.optimizers.Adam(1e-4)
    optimizer.build(model.trainable_variables)
    shape = [config.batch_size, config.image_size, config.image_size, 3]
    if layout == "channels_first":
        shape = [shape[0], 3, shape[1], shape[2]]
    images = tf.random.uniform(shape, 0.0, 1.0, seed=1)
    target = tf.random.uniform([config.batch_size, 1], -1.0, 1.0, seed=2)

    @tf.function
    def train(num_steps: tf.Tensor) -> tf.Tensor:
        loss = tf.constant(0.0)
        for _ in tf.range(num_steps):
            with tf.GradientTape() as tape:
                loss = tf.reduce_mean(tf.abs(model(images, training=True) - target))
            grads = tape.gradient(loss, model.trainable_variables)
            optimizer.apply_gradients(zip(grads, model.trainable_variables, strict=True))
        return loss

    steps = tf.constant(config.steps, tf.int64)
    try:
        float(train(steps))  # warm-up: tracing
    except (tf.errors.UnimplementedError, tf.errors.InvalidArgumentError) as e:
        return {"error": " ".join(str(e.message).split())[:200]}
    rates = []
    for _ in range(config.loops):
        began = time.perf_counter()
        float(train(steps))
        rates.append(config.steps * config.batch_size / (time.perf_counter() - began))
    return {"img_s": statistics.median(rates), "loops_img_s": rates}


def run(config: LayoutConfig) -> dict[str, Any]:
    """Runs every setting; prints a table and returns (and optionally writes) the summary."""
    import tensorflow as tf

    if config.intra_op_threads:
        tf.config.threading.set_intra_op_parallelism_threads(config.intra_op_threads)
    if config.inter_op_threads:
        tf.config.threading.set_inter_op_parallelism_threads(config.inter_op_threads)
    summary: dict[str, Any] = {
        "config": dataclasses.asdict(config),
        "load_average_before": list(os.getloadavg()),
        "cores": os.cpu_count(),
        "threads": {
            "intra_op": tf.config.threading.get_intra_op_parallelism_threads(),
            "inter_op": tf.config.threading.get_inter_op_parallelism_threads(),
        },
        "results": [],
    }
    print(f"{'layout':<15} {'precision':<9} {'img/s':>8}")
    for layout, precision in itertools.product(config.layouts, config.precisions):
        result = {"layout": layout, "precision": precision, **bench_one(config, layout, precision)}
        summary["results"].append(result)
        shown = f"{result['img_s']:8.1f}" if "img_s" in result else f"error: {result['error']}"
        print(f"{layout:<15} {precision:<9} {shown}")
    summary["load_average_after"] = list(os.getloadavg())
    print(
        f"img/s at {config.image_size} px, batch {config.batch_size}, threads intra/inter "
        f"{summary['threads']['intra_op']}/{summary['threads']['inter_op']} (0: default), "
        f"load average {summary['load_average_before'][0]:.2f} before, "
        f"{summary['load_average_after'][0]:.2f} after"
    )
    if config.json:
        with open(config.json, "w", encoding="utf-8") as f:
            json.dump(summary, f, indent=2)
    return summary


def main(argv: Sequence[str] | None = None) -> int:
    """Parses the flags in `argv` and runs the benchmark; returns the exit code."""
    return cli.main("benchmark_layout", LayoutConfig, run, argv, __doc__)


if __name__ == "__main__":
    sys.exit(main(sys.argv))
