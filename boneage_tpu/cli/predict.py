"""`boneage-predict` / `python -m boneage_tpu.predict`: bone age of new radiographs.

The settings and the preparation of each image: `boneage_tpu.predict.job` (printed by --help).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

import tensorflow as tf

from boneage_tpu import cli
from boneage_tpu.predict import inputs, job


def _job(config: job.PredictConfig) -> None:
    rows = job.run(config)
    if config.output:
        with tf.io.gfile.GFile(config.output, "w") as f:
            f.write(inputs.format_rows(rows, as_csv=True))
        print(f"wrote {len(rows)} predictions to {config.output}")
    else:
        sys.stdout.write(inputs.format_rows(rows, as_csv=False))
    if config.heatmaps:
        print(f"wrote {len(rows)} heatmaps to {config.heatmaps}")


def main(argv: Sequence[str] | None = None) -> int:
    """Parses `argv` (argv[0] is the program), predicts and prints; returns the exit code."""
    return cli.main("predict", job.PredictConfig, _job, argv, job.__doc__)


if __name__ == "__main__":
    sys.exit(main(sys.argv))
