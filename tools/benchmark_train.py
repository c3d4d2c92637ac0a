"""Trainer throughput: the real input pipeline vs one device-resident batch repeated.

    python -m tools.benchmark_train --data DIR [--backbones tiny,resnet50] [--precisions fp32]
        [--xla no,yes] [--image_size 128] [--batch_size 32] [--steps 10] [--loops 3] [--json P]

For every backbone x precision x XLA setting, the same `TrainLoop` (augmentation, forward,
loss, gradients, optimizer; default strategy: one device) runs `--loops` timed calls of
`--steps` steps each after one warm-up call (tracing, compilation), the two feeds taking
turns call by call, fed by
  real:    `data.build_dataset` over DIR's train split (TFRecords from tools.make_tfrecords),
  ceiling: one batch of that pipeline, kept in memory and yielded to every step through the
           same distributed iterator (no read, parse or decode per step: the trainer's compute
           ceiling; on a GPU the default strategy still copies that uint8 batch to the device
           each step, a few MB).
`input_ratio` = real / ceiling img/s: near 1, the input pipeline keeps up; well below 1, the
device waits for the host. Each figure is the median of the loops. The 1-minute load average
is recorded too: on a shared machine, other processes' load lowers every figure.
"""

from __future__ import annotations

import dataclasses
import itertools
import os
import statistics
import sys
import time
from collections.abc import Sequence
from typing import Any

from boneage_tpu import cli
from boneage_tpu.cli import option
from boneage_tpu.core.config import BACKBONES, PRECISION_CHOICES
from tools import _summary

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

# The trainer's "auto" picks one of these per device; the benchmark measures them by name.
PRECISIONS = tuple(p for p in PRECISION_CHOICES if p != "auto")


@dataclasses.dataclass
class BenchConfig:
    """Settings of one benchmark run."""

    data: str = option("", "TFRecord folder (tools.make_tfrecords)", required=True)
    backbones: tuple[str, ...] = option(
        ("tiny",), "backbones to measure, comma-separated.", choices=BACKBONES, comma_list=True
    )
    precisions: tuple[str, ...] = option(
        ("fp32",), "precisions, comma-separated.", choices=PRECISIONS, comma_list=True
    )
    xla: tuple[str, ...] = option(
        ("no",), "jit_compile settings, comma-separated.", choices=("no", "yes"), comma_list=True
    )
    image_size: int = option(128, "training image side", min=16)
    batch_size: int = option(32, "batch size", min=1)
    steps: int = option(10, "steps per timed loop call", min=1)
    loops: int = option(3, "timed loop calls (median)", min=1)
    json: str = option("", "also write the summary to this JSON file")


def _timed_loops(trainer: Any, feeds: dict[str, Any], config: BenchConfig) -> dict[str, list]:
    """Times `config.loops` calls per feed after one warm-up call each; returns img/s per call.

    The feeds take turns call by call, so a slow spell of a shared machine hits all of them;
    the warm-up call pays the tracing and compilation.
    """
    for iterator in feeds.values():
        trainer.train(iterator, config.steps)
    rates: dict[str, list[float]] = {name: [] for name in feeds}
    for _ in range(config.loops):
        for name, iterator in feeds.items():
            began = time.perf_counter()
            metrics = trainer.train(iterator, config.steps)
            elapsed = time.perf_counter() - began
            if metrics.loss != metrics.loss:  # NaN: the figures would be meaningless
                raise RuntimeError("the benchmark's loss became NaN")
            rates[name].append(config.steps * config.batch_size / elapsed)
    return rates


def bench_one(config: BenchConfig, backbone: str, precision: str, xla: str) -> dict[str, Any]:
    """Measures one setting; returns {"real", "ceiling", "input_ratio", ...}."""
    import keras
    import tensorflow as tf

    from boneage_tpu.core import schema
    from boneage_tpu.core.config import Derived, TrainConfig
    from boneage_tpu.data import augment
    from boneage_tpu.data import pipeline as data
    from boneage_tpu.modeling import optim
    from boneage_tpu.modeling.model import build_model
    from boneage_tpu.train import loop

    manifest = schema.read_manifest(config.data)
    stats = manifest["label_stats"]
    keras.utils.set_random_seed(0)
    strategy = tf.distribute.get_strategy()
    model = build_model(
        TrainConfig.from_flags(backbone=backbone, image_size=config.image_size),
        Derived(label_mean=float(stats["mean_months"]), label_std=float(stats["std_months"])),
        weights="none",
        precision=precision,
    )
    optimizer = optim.make_optimizer(
        name="adam",
        learning_rate=1e-4,
        warmup_steps=0,
        total_steps=10**6,
        schedule="constant",
        loss_scale=precision == "fp16",
    )
    optimizer.build(model.trainable_variables)
    trainer = loop.TrainLoop(
        strategy,
        model,
        optimizer,
        global_batch=config.batch_size,
        label_std=float(stats["std_months"]),
        augment_config=augment.AugmentConfig(),
        jit_compile=xla == "yes",
    )

    def train_fn(context: tf.distribute.InputContext) -> tf.data.Dataset:
        return data.build_dataset(
            config.data,
            "train",
            training=True,
            batch_size=config.batch_size,
            image_size=config.image_size,
            input_context=context,
            cache="no",
            manifest=manifest,
        )

    distributed = loop.distribute(
        strategy, train_fn, per_replica_batch=config.batch_size, training=True
    )
    first = next(iter(train_fn(tf.distribute.InputContext())))

    def repeated_fn(context: tf.distribute.InputContext) -> tf.data.Dataset:
        # One batch held in memory, yielded again and again through the same distributed
        # iterator as the real run: no read, parse, decode or shuffle per step.
        return tf.data.Dataset.from_tensors(first).repeat()

    resident = iter(
        loop.distribute(strategy, repeated_fn, per_replica_batch=config.batch_size, training=True)
    )
    rates = _timed_loops(trainer, {"real": iter(distributed), "ceiling": resident}, config)
    real, ceiling = statistics.median(rates["real"]), statistics.median(rates["ceiling"])
    return {
        "backbone": backbone,
        "precision": precision,
        "xla": xla,
        "real_images_per_second": real,
        "ceiling_images_per_second": ceiling,
        "input_ratio": real / ceiling,
        "real_loops": rates["real"],
        "ceiling_loops": rates["ceiling"],
    }


def run(config: BenchConfig) -> dict[str, Any]:
    """Runs every setting; prints a table and returns (and optionally writes) the summary."""
    import tensorflow as tf

    devices = [d.name for d in tf.config.list_logical_devices() if d.device_type != "CPU"]
    summary: dict[str, Any] = {
        "config": dataclasses.asdict(config),
        "device": devices[0] if devices else f"CPU ({os.cpu_count()} cores)",
        "tensorflow": tf.__version__,
        "load_average_1min_before": os.getloadavg()[0],
        "results": [],
    }
    print(f"{'backbone':<12} {'precision':<9} {'xla':<4} {'real':>9} {'ceiling':>9} {'ratio':>6}")
    for backbone, precision, xla in itertools.product(
        config.backbones, config.precisions, config.xla
    ):
        result = bench_one(config, backbone, precision, xla)
        summary["results"].append(result)
        print(
            f"{backbone:<12} {precision:<9} {xla:<4} "
            f"{result['real_images_per_second']:>9.1f} {result['ceiling_images_per_second']:>9.1f} "
            f"{result['input_ratio']:>6.2f}",
            flush=True,
        )
    summary["load_average_1min_after"] = os.getloadavg()[0]
    print(
        f"img/s at {config.image_size} px, batch {config.batch_size}, on {summary['device']}; "
        f"load average {summary['load_average_1min_before']:.1f} before, "
        f"{summary['load_average_1min_after']:.1f} after"
    )
    _summary.write_json(summary, config.json)
    return summary


def main(argv: Sequence[str] | None = None) -> int:
    """Parses the flags in `argv` (argv[0] is the program) and runs; returns the exit status."""
    return cli.main("benchmark_train", BenchConfig, run, argv, __doc__)


if __name__ == "__main__":
    sys.exit(main(sys.argv))
