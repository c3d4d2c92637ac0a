"""`python -m boneage_tpu.train`: runs `boneage_tpu.cli.train`."""

import sys

from boneage_tpu.cli.train import main

sys.exit(main(sys.argv))
