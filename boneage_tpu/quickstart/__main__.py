"""`python -m boneage_tpu.quickstart`: see `boneage_tpu.quickstart.job`."""

import sys

from boneage_tpu.quickstart.job import main

sys.exit(main(sys.argv))
