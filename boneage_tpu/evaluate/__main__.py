"""`python -m boneage_tpu.evaluate`: runs `boneage_tpu.cli.evaluate`."""

import sys

from boneage_tpu.cli.evaluate import main

sys.exit(main(sys.argv))
