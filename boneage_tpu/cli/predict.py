"""`boneage-predict` / `python -m boneage_tpu.predict`: bone age of new radiographs.

The settings and the preparation of each image: `boneage_tpu.predict.job` (printed by --help).
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Sequence
from typing import Any

import tensorflow as tf

from boneage_tpu import cli
from boneage_tpu.predict import inputs, job


def _job(config: job.PredictConfig) -> None:
    if config.runner == "beam":
        job.run_beam(config)
        return
    if not config.output:
        table = inputs.RowWriter(sys.stdout, as_csv=False)
        job.run(config, table.write)
        if config.heatmaps:
            print(f"wrote {table.count} heatmaps to {config.heatmaps}")
        return
    with contextlib.ExitStack() as stack:
        table = None

        def write(rows: list[dict[str, Any]], labeled: bool) -> None:
            nonlocal table
            if table is None:  # Opened at the first result: a refused run writes no file.
                f = stack.enter_context(tf.io.gfile.GFile(config.output, "w"))
                table = inputs.RowWriter(f, as_csv=True)
            table.write(rows, labeled)

        rows = job.run(config, write)
    print(f"wrote {len(rows)} predictions to {config.output}")
    if config.heatmaps:
        print(f"wrote {len(rows)} heatmaps to {config.heatmaps}")


def main(argv: Sequence[str] | None = None) -> int:
    """Parses `argv` (argv[0] is the program), predicts and prints; returns the exit code."""
    return cli.main("predict", job.PredictConfig, _job, argv, job.__doc__)


if __name__ == "__main__":
    sys.exit(main(sys.argv))
