"""`python -m boneage_tpu.predict`: runs `boneage_tpu.cli.predict`."""

import sys

from boneage_tpu.cli.predict import main

sys.exit(main(sys.argv))
