"""`boneage-make-phantom` / `python -m boneage_tpu.phantom`: writes a synthetic data set.

The settings and what is written: `boneage_tpu.phantom.job` (printed by --help).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence

import numpy as np

from boneage_tpu import cli
from boneage_tpu.phantom import job


def _job(config: job.PhantomConfig) -> None:
    start = time.perf_counter()
    records = job.run(config)
    if records:
        labels = np.array([r.label_months for r in records])
        print(
            f"wrote {len(records)} images ({config.layout} layout) to {config.output} in "
            f"{time.perf_counter() - start:.1f} s; labels {labels.min()}..{labels.max()} months,"
            f" mean {labels.mean():.1f}"
        )
    if config.contact_sheet:
        print(f"wrote contact sheet {config.contact_sheet}")


def main(argv: Sequence[str] | None = None) -> int:
    """Parses the flags in `argv` (argv[0] is the program) and runs; returns the exit status."""
    return cli.main("make_phantom", job.PhantomConfig, _job, argv, job.__doc__)


if __name__ == "__main__":
    sys.exit(main(sys.argv))
