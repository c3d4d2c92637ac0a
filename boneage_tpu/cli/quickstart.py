"""`boneage-quickstart` / `python -m boneage_tpu.quickstart`: phantom -> train -> evaluate.

The settings and what is written: `boneage_tpu.quickstart.job` (printed by --help).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from boneage_tpu import cli
from boneage_tpu.quickstart import job


def main(argv: Sequence[str] | None = None) -> int:
    """Parses the flags in `argv` (argv[0] is the program) and runs; returns the exit status."""
    return cli.main("quickstart", job.QuickstartConfig, job.run, argv, job.__doc__)


if __name__ == "__main__":
    sys.exit(main(sys.argv))
