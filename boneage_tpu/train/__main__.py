"""`python -m boneage_tpu.train`: see `boneage_tpu.train.job`."""

import sys

from boneage_tpu.train.job import main

sys.exit(main(sys.argv))
