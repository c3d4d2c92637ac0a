"""`python -m boneage_tpu.predict`: see `boneage_tpu.predict.job`."""

import sys

from boneage_tpu.predict.job import main

sys.exit(main(sys.argv))
