"""`boneage-make-tfrecords` / `python -m boneage_tpu.convert`: images + CSV -> TFRecords.

The settings and what is written: `boneage_tpu.convert.job` (printed by --help).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from boneage_tpu import cli
from boneage_tpu.convert import job


def main(argv: Sequence[str] | None = None) -> int:
    """Parses the flags and runs the converter; returns the exit status."""
    hook = job.kill_hook_from_env()
    return cli.main(
        "make_tfrecords", job.ConvertConfig, lambda c: job.run(c, hook), argv, job.__doc__
    )


if __name__ == "__main__":
    sys.exit(main(sys.argv))
