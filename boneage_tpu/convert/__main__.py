"""`python -m boneage_tpu.convert`: see `boneage_tpu.convert.job`."""

import sys

from boneage_tpu.convert.job import main

sys.exit(main(sys.argv))
