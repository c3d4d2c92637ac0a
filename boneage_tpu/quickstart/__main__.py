"""`python -m boneage_tpu.quickstart`: runs `boneage_tpu.cli.quickstart`."""

import sys

from boneage_tpu.cli.quickstart import main

sys.exit(main(sys.argv))
