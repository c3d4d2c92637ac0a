"""`python -m boneage_tpu.phantom`: see `boneage_tpu.phantom.job`."""

import sys

from boneage_tpu.phantom.job import main

sys.exit(main(sys.argv))
