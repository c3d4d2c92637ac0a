"""`boneage-train` / `python -m boneage_tpu.train`: trains the bone-age model.

The settings: `boneage_tpu.core.config.TrainConfig`; the run: `boneage_tpu.train.job` (its
docstring is printed by --help).
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence

from absl import logging

from boneage_tpu import cli
from boneage_tpu.core import config as config_lib
from boneage_tpu.core import tpu_runtime


def _job(config: config_lib.TrainConfig, after_loop: Callable[[int], None] | None) -> None:
    import tensorflow as tf

    from boneage_tpu.train import job

    # absl and TF log INFO by default; that would bury the progress lines.
    logging.set_verbosity(logging.WARNING)
    tf.get_logger().setLevel("WARNING")
    job.run(config, after_loop=after_loop)


def main(
    argv: Sequence[str] | None = None, *, after_loop: Callable[[int], None] | None = None
) -> int:
    """Runs `python -m boneage_tpu.train` on `argv` (argv[0] is the program); returns the status.

    Args:
      argv: the command line.
      after_loop: passed to `run` (tests use it to kill a run mid-way).
    """
    argv = sys.argv if argv is None else argv
    # The TPU runtime (PJRT or StreamExecutor) is chosen by environment variables that
    # TensorFlow reads at its import: the job, which imports it, comes after.
    tpu_runtime.prepare_command("train", argv)
    from boneage_tpu.train import job

    return cli.main(
        "train", config_lib.TrainConfig, lambda c: _job(c, after_loop), argv, job.__doc__
    )


if __name__ == "__main__":
    sys.exit(main(sys.argv))
