"""`python -m boneage_tpu.evaluate`: see `boneage_tpu.evaluate.job`."""

import sys

from boneage_tpu.evaluate.job import main

sys.exit(main(sys.argv))
