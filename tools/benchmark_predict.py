"""Peak memory of `predict` over few and over many inputs: it must not grow with their number.

    python -m tools.benchmark_predict [--small 200] [--large 20000] [--json PATH]

Writes a tiny model directory (the `tiny` backbone, 32 px input, data stored at 40 px PNG) and
`--large` small phantom radiographs (64 x 80 px; 16 rendered ones copied under new names), then
runs `predict --labels CSV --images DIR --output CSV` in a fresh process per size, on the first
`--small` and on all `--large` images, and prints each run's peak RSS (the child's own
`ru_maxrss`), time and rate, and `rss_ratio` = peak RSS(large) / peak RSS(small). predict
prepares and predicts its inputs chunk by chunk, so the ratio should stay near 1 (the issue's
bound: 1.5). Progress of the large run is shown (predict's own progress line on stderr).
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from typing import Any

from boneage_tpu import cli
from boneage_tpu.cli import option
from boneage_tpu.core.errors import Error
from tools import _summary

_SIDE = (64, 80)
_DISTINCT = 16


class BenchError(Error):
    """A predict run of the benchmark failed or wrote fewer rows than its inputs."""


def make_model(folder: str) -> str:
    """Writes a model directory with config.json and export/model.keras; returns its path."""
    import keras

    from boneage_tpu.core import config as config_lib
    from boneage_tpu.core import model_dir as model_dir_lib
    from boneage_tpu.modeling import model as model_lib

    config = config_lib.TrainConfig.from_flags(
        data="benchmark",
        model_dir=folder,
        backbone="tiny",
        image_size=32,
        dense_units=(8,),
    )
    derived = config_lib.Derived(
        label_mean=120.0, label_std=40.0, data_image_size=40, data_encoding="png", schema_version=1
    )
    model_dir_lib.save_config(config)
    model_dir_lib.save_derived(folder, derived)
    keras.utils.set_random_seed(0)
    model = model_lib.build_model(config, derived)
    os.makedirs(model_dir_lib.export_dir(folder), exist_ok=True)
    model.save(model_dir_lib.keras_export_path(folder))
    return folder


def make_images(folder: str, count: int) -> tuple[str, str]:
    """Writes `count` phantom PNGs and a Kaggle-layout CSV into `folder`; returns (csv, images)."""
    from PIL import Image

    from boneage_tpu.phantom import render

    images = pathlib.Path(folder, "images")
    images.mkdir(parents=True)
    sources = []
    for i in range(_DISTINCT):
        path = images / f"{i}.png"
        age = 12.0 + 200.0 * i / _DISTINCT
        pixels = render.render_phantom(age, i % 2 == 0, seed=i, width=_SIDE[0], height=_SIDE[1])
        Image.fromarray(pixels).save(path)
        sources.append(path)
    for i in range(_DISTINCT, count):
        os.link(sources[i % _DISTINCT], images / f"{i}.png")  # Hard links: no disk, same reads.
    labels = pathlib.Path(folder, "labels.csv")
    lines = ["id,boneage,male"] + [f"{i},{12 + i % 200},{i % 2 == 0}" for i in range(count)]
    labels.write_text("\n".join(lines) + "\n")
    return str(labels), str(images)


def child(model: str, labels: str, images: str, count: int, output: str) -> dict[str, Any]:
    """Runs predict in this process on the first `count` CSV rows; returns its measurements."""
    from boneage_tpu.cli import predict as predict_cli

    start = time.perf_counter()
    argv = ["predict", f"--model={model}", f"--labels={labels}", f"--images={images}"]
    status = predict_cli.main([*argv, f"--output={output}", "--batch_size=32"])
    seconds = time.perf_counter() - start
    rows = 0
    if os.path.exists(output):
        with open(output) as f:
            rows = sum(1 for _ in f) - 1
    return {
        "n": count,
        "status": status,
        "rows": rows,
        "seconds": seconds,
        "img_s": rows / seconds if seconds else 0.0,
        # ru_maxrss is in KiB on Linux, bytes on macOS.
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        / (2**20 if sys.platform == "darwin" else 2**10),
    }


def _run_child(model: str, labels: str, images: str, count: int, folder: str) -> dict[str, Any]:
    """Runs `child` in a fresh process (its own peak RSS) and returns its measurements."""
    output = os.path.join(folder, f"predictions-{count}.csv")
    result_path = output + ".json"
    command = [
        sys.executable,
        "-m",
        "tools.benchmark_predict",
        "--child",
        json.dumps([model, labels, images, count, output, result_path]),
    ]
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    return json.loads(pathlib.Path(result_path).read_text())


@dataclasses.dataclass
class BenchConfig:
    """Settings of the predict memory benchmark."""

    small: int = option(200, "Images of the small run.", min=1)
    large: int = option(20000, "Images of the large run.", min=1)
    json: str = option("", "Also write the results here.")
    child: str = option("", "Internal: run one measurement.")


def _job(config: BenchConfig) -> None:
    """Runs both sizes (or, in a child process, one measurement); BenchError if predict failed."""
    if config.child:
        model, labels, images, count, output, result_path = json.loads(config.child)
        result = child(model, labels, images, count, output)
        pathlib.Path(result_path).write_text(json.dumps(result))
        return
    folder = tempfile.mkdtemp(prefix="benchmark_predict_")
    try:
        model = make_model(os.path.join(folder, "model"))
        results = []
        for count in (config.small, config.large):
            run_folder = os.path.join(folder, f"n{count}")
            labels, images = make_images(run_folder, count)
            result = _run_child(model, labels, images, count, run_folder)
            print(
                f"n={result['n']:>6}  rows={result['rows']:>6}  {result['seconds']:7.1f} s  "
                f"{result['img_s']:7.1f} img/s  peak RSS {result['peak_rss_mb']:7.1f} MB",
                flush=True,
            )
            results.append(result)
        summary = {
            "runs": results,
            "rss_ratio": results[1]["peak_rss_mb"] / results[0]["peak_rss_mb"],
        }
        print(f"rss_ratio (large / small) = {summary['rss_ratio']:.3f}  (bound: 1.5)")
        _summary.write_json(summary, config.json)
        failed = [r for r in results if r["status"] != 0 or r["rows"] != r["n"]]
        if failed:
            raise BenchError(
                "; ".join(
                    f"predict on {r['n']} images: exit {r['status']}, {r['rows']} rows"
                    for r in failed
                )
            )
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the benchmark; prints one line per run and the RSS ratio; returns the exit status.

    The status is 1 also when a predict run failed or wrote fewer rows than its inputs.
    """
    return cli.main("benchmark_predict", BenchConfig, _job, argv, __doc__)


if __name__ == "__main__":
    sys.exit(main(sys.argv))
