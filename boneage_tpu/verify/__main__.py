"""`python -m boneage_tpu.verify`: runs `boneage_tpu.cli.verify_tfrecords`."""

import sys

from boneage_tpu.cli.verify_tfrecords import main

sys.exit(main(sys.argv))
