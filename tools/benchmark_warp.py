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
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
import types
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

METHODS = ("gather", "matmul")


@dataclasses.dataclass
class BenchConfig:
    """Settings of one benchmark run."""

    sizes: tuple[int, ...] = (128, 299, 512)
    batch_size: int = 32
    methods: tuple[str, ...] = METHODS
    baseline: str = ""
    xla: str = "yes"
    loops: int = 5
    json: str = ""


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
        raise SystemExit(f"error: --baseline {ref}: {e.stderr.strip()}") from None
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
    if config.json:
        with open(config.json, "w", encoding="utf-8") as f:
            json.dump(summary, f, indent=2)
    return summary


def _define_flags() -> Any:
    from absl import flags

    fv = flags.FlagValues()
    flags.DEFINE_list(
        "sizes", ["128", "299", "512"], "image sides, comma-separated", flag_values=fv
    )
    flags.DEFINE_integer("batch_size", 32, "images per warp call", lower_bound=1, flag_values=fv)
    flags.DEFINE_list("methods", list(METHODS), "gather | matmul, comma-separated", flag_values=fv)
    flags.DEFINE_string("baseline", "", "also time augment.py at this git ref", flag_values=fv)
    flags.DEFINE_enum("xla", "yes", ["no", "yes"], "jit_compile the warp", flag_values=fv)
    flags.DEFINE_integer("loops", 5, "timed calls (median)", lower_bound=1, flag_values=fv)
    flags.DEFINE_string("json", "", "also write the summary to this JSON file", flag_values=fv)
    return fv


def main(argv: list[str]) -> int:
    """Parses the command line and runs the benchmark; returns the exit status."""
    from boneage_tpu import cli

    fv = _define_flags()
    _, status = cli.parse_flags("benchmark_warp", fv, argv, __doc__)
    if status is not None:
        return status
    unknown = sorted(set(fv.methods) - set(METHODS))
    if unknown:
        raise SystemExit(f"error: --methods {','.join(unknown)}: choose from {', '.join(METHODS)}")
    try:
        sizes = tuple(int(s) for s in fv.sizes)
    except ValueError:
        raise SystemExit(f"error: --sizes {','.join(fv.sizes)}: integers, e.g. 128,512") from None
    if min(sizes) < 16:
        raise SystemExit("error: --sizes: every side must be >= 16")
    config = BenchConfig(
        sizes=sizes,
        batch_size=fv.batch_size,
        methods=tuple(fv.methods),
        baseline=fv.baseline,
        xla=fv.xla,
        loops=fv.loops,
        json=fv.json,
    )
    run(config)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
