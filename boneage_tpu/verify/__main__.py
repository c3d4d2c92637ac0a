"""`python -m boneage_tpu.verify`: see `boneage_tpu.data.verify`."""

import sys

from boneage_tpu.data.verify import main

sys.exit(main(sys.argv))
