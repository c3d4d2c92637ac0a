"""Augmentation warp: CPU throughput and estimated transients per core, now and at a baseline.

    python -m tools.benchmark_warp [--sizes 128,299,512] [--batch_size 32] [--methods gather,matmul]
        [--baseline 0e9e199] [--xla yes] [--loops 5] [--json P]

For every size x method (and version: this checkout, and `boneage_tpu/augment.py` as it was
at git ref --baseline), one jit-compiled `warp_affine` over a random uint8 batch with the
default augmentation ranges is timed `--loops` times after a warm-up call (compilation); the
figure is the median img/s. The transients are `warp.warp_transient_bytes` (now: one chunk
of `warp_chunk` images; before: the whole batch, by `legacy_transient_bytes`, the same
every-intermediate-materialised count for the formulation before issue 26).
The recipes' per-core sizes: 512 px x 32 (configs/rsna_tpu.flags on 8 cores), 512 px x 256
(the same on a 1-chip v5e), 299 px x 16 / x 128 (the notebook on a v2-8 / a v5e-1).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
import types
from collections.abc import Sequence
from typing import Any

from boneage_tpu import cli
from boneage_tpu.cli import option
from boneage_tpu.core.errors import UsageError
from tools import _summary

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

METHODS = ("gather", "matmul")


@dataclasses.dataclass
class BenchConfig:
    """Settings of one benchmark run."""

    sizes: tuple[int, ...] = option((128, 299, 512), "image sides, comma-separated", min=16)
    batch_size: int = option(32, "images per warp call", min=1)
    methods: tuple[str, ...] = option(
        METHODS, "warp methods, comma-separated.", choices=METHODS, comma_list=True
    )
    baseline: str = option("", "also time augment.py at this git ref")
    xla: str = option("yes", "jit_compile the warp", choices=("no", "yes"))
    loops: int = option(5, "timed calls (median)", min=1)
    json: str = option("", "also write the summary to this JSON file")


def legacy_transient_bytes(
    height: int, width: int, channels: int, stretch: float, images: int
) -> int:
    """The matmul warp's transients before issue 26 (whole-row strips, float32, no chunks).

    Per image: the float32 padded input, coordinates, the strips [N, K, W + 2K, C], their
    one-hot column selection [N, W + 2K, K], the windows, two tent tensors [N, P, K], the
    x-blended values [N, P, K, C] and the tiled result; N tiles of P = 16 x 16 pixels.
    """
    tile = 16
    window = int(math.ceil(stretch * (tile - 1))) + 2
    tiles = -(-height // tile) * -(-width // tile)
    pixels, padded = tile * tile, width + 2 * window
    per_image = (
        (height + 2 * window) * padded * channels * 4
        + tiles * pixels * 2 * 4
        + tiles * window * padded * channels * 4
        + tiles * padded * window * 4
        + tiles * window * window * channels * 4
        + 2 * tiles * pixels * window * 4
        + tiles * pixels * window * channels * 4
        + tiles * pixels * channels * 4
    )
    return images * per_image


def load_baseline(ref: str) -> types.ModuleType:
    """Imports `boneage_tpu/augment.py` as it is at git `ref` (it imports only TensorFlow)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        source = subprocess.run(
            ["git", "-C", root, "show", f"{ref}:boneage_tpu/augment.py"],
            check=True,
            capture_output=True,
            text=True,
        ).stdout
    except subprocess.CalledProcessError as e:
        raise UsageError(f"--baseline {ref}: {e.stderr.strip()}") from None
    folder = tempfile.mkdtemp(prefix="warp-baseline-")
    path = os.path.join(folder, "augment_baseline.py")
    with open(path, "w", encoding="utf-8") as f:
        f.write(source)
    spec = importlib.util.spec_from_file_location("augment_baseline", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def bench_one(
    module: types.ModuleType, size: int, method: str, config: BenchConfig
) -> dict[str, Any]:
    """Times one warp; returns {"images_per_second", "loops"}."""
    import numpy as np
    import tensorflow as tf

    ranges = module.AugmentConfig()
    stretch = module.max_stretch(ranges) if method == "matmul" else None
    rng = np.random.default_rng(size)
    images = tf.constant(rng.integers(0, 256, (config.batch_size, size, size, 1)).astype(np.uint8))
    params = module.sample_params(tf.constant([size, 1], tf.int64), config.batch_size, ranges)
    matrices = module.affine_matrices(params, size, size)

    def warp(images: tf.Tensor, matrices: tf.Tensor) -> tf.Tensor:
        # A scalar result forces the whole batch to be computed, without copying it out.
        return tf.reduce_sum(module.warp_affine(images, matrices, method, stretch))

    fn = tf.function(warp, jit_compile=config.xla == "yes")
    fn(images, matrices).numpy()
    rates = []
    for _ in range(config.loops):
        began = time.perf_counter()
        fn(images, matrices).numpy()
        rates.append(config.batch_size / (time.perf_counter() - began))
    return {"images_per_second": statistics.median(rates), "loops": rates}


def transients(size: int, batch: int, version: str) -> dict[str, float]:
    """Estimated warp transients per core (GB) for `batch` images of `size` px."""
    from boneage_tpu.data import augment, warp

    stretch = augment.max_stretch(augment.AugmentConfig())
    if version == "baseline":
        matmul = legacy_transient_bytes(size, size, 1, stretch, batch)
    else:
        chunk = min(batch, warp.warp_chunk(size, size, 1, stretch))
        matmul = warp.warp_transient_bytes(size, size, 1, "matmul", stretch, images=chunk)
    gather = warp.warp_transient_bytes(size, size, 1, "gather", images=batch)
    return {"matmul_gb": matmul / 1e9, "gather_gb": gather / 1e9}


def run(config: BenchConfig) -> dict[str, Any]:
    """Runs every measurement, prints a table and returns the summary."""
    import tensorflow as tf

    from boneage_tpu.data import augment

    versions = {"now": augment}
    if config.baseline:
        versions["baseline"] = load_baseline(config.baseline)
    summary: dict[str, Any] = {
        "config": dataclasses.asdict(config),
        "device": f"CPU ({os.cpu_count()} cores)",
        "tensorflow": tf.__version__,
        "load_average_1min_before": os.getloadavg()[0],
        "results": [],
    }
    print(f"{'size':>5} {'method':<7} {'version':<9} {'img/s':>9} {'transients GB':>14}")
    for size in config.sizes:
        for method in config.methods:
            for version, module in versions.items():
                result = bench_one(module, size, method, config)
                memory = transients(size, config.batch_size, version)[f"{method}_gb"]
                result |= {"size": size, "method": method, "version": version, "gb": memory}
                summary["results"].append(result)
                print(
                    f"{size:>5} {method:<7} {version:<9} {result['images_per_second']:>9.1f} "
                    f"{memory:>14.3f}",
                    flush=True,
                )
    summary["load_average_1min_after"] = os.getloadavg()[0]
    print(
        f"batch {config.batch_size}, XLA {config.xla}, on {summary['device']}; load average "
        f"{summary['load_average_1min_before']:.1f} before, "
        f"{summary['load_average_1min_after']:.1f} after"
    )
    _summary.write_json(summary, config.json)
    return summary


def main(argv: Sequence[str] | None = None) -> int:
    """Parses the flags in `argv` (argv[0] is the program) and runs; returns the exit status."""
    return cli.main("benchmark_warp", BenchConfig, run, argv, __doc__)


if __name__ == "__main__":
    sys.exit(main(sys.argv))
