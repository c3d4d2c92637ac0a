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
import json
import os
import statistics
import sys
import time
from typing import Any

from boneage_tpu import cli

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


@dataclasses.dataclass
class BenchConfig:
    """Settings of one benchmark run."""

    data: str
    backbones: tuple[str, ...] = ("tiny",)
    precisions: tuple[str, ...] = ("fp32",)
    xla: tuple[str, ...] = ("no",)
    image_size: int = 128
    batch_size: int = 32
    steps: int = 10
    loops: int = 3
    json: str = ""


def _timed_loops(trainer: Any, feeds: dict[str, Any], config: BenchConfig) -> dict[str, list]:
    """Times `config.loops` calls per feed, the feeds taking turns (a slow spell of a shared
    machine then hits all of them), after one warm-up call each (tracing, compilation)."""
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
    if config.json:
        with open(config.json, "w", encoding="utf-8") as f:
            json.dump(summary, f, indent=2)
    return summary


def _define_flags() -> Any:
    from absl import flags

    fv = flags.FlagValues()
    flags.DEFINE_string("data", None, "TFRecord folder (tools.make_tfrecords)", flag_values=fv)
    flags.DEFINE_list("backbones", ["tiny"], "backbones to measure", flag_values=fv)
    flags.DEFINE_list("precisions", ["fp32"], "fp32 | bf16 | fp16, comma-separated", flag_values=fv)
    flags.DEFINE_list(
        "xla", ["no"], "jit_compile settings: no | yes, comma-separated", flag_values=fv
    )
    flags.DEFINE_integer("image_size", 128, "training image side", lower_bound=16, flag_values=fv)
    flags.DEFINE_integer("batch_size", 32, "batch size", lower_bound=1, flag_values=fv)
    flags.DEFINE_integer("steps", 10, "steps per timed loop call", lower_bound=1, flag_values=fv)
    flags.DEFINE_integer("loops", 3, "timed loop calls (median)", lower_bound=1, flag_values=fv)
    flags.DEFINE_string("json", "", "also write the summary to this JSON file", flag_values=fv)
    return fv


def main(argv: list[str]) -> None:
    """Parses the command line and runs the benchmark."""

    from boneage_tpu.modeling.model import BACKBONES, PRECISIONS

    fv = _define_flags()
    _, status = cli.parse_flags("benchmark_train", fv, argv, __doc__)
    if status is not None:
        raise SystemExit(status)
    if not fv.data:
        raise SystemExit("error: --data is required (a folder written by tools.make_tfrecords)")
    for name, values, allowed in (
        ("backbones", fv.backbones, BACKBONES),
        ("precisions", fv.precisions, tuple(PRECISIONS)),
        ("xla", fv.xla, ("no", "yes")),
    ):
        unknown = sorted(set(values) - set(allowed))
        if unknown:
            raise SystemExit(
                f"error: --{name} {','.join(unknown)}: choose from {', '.join(allowed)}"
            )
    config = BenchConfig(
        data=fv.data,
        backbones=tuple(fv.backbones),
        precisions=tuple(fv.precisions),
        xla=tuple(fv.xla),
        image_size=fv.image_size,
        batch_size=fv.batch_size,
        steps=fv.steps,
        loops=fv.loops,
        json=fv.json,
    )
    run(config)


if __name__ == "__main__":
    main(sys.argv)
