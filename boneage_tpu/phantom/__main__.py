"""`python -m boneage_tpu.phantom`: runs `boneage_tpu.cli.make_phantom`."""

import sys

from boneage_tpu.cli.make_phantom import main

sys.exit(main(sys.argv))
