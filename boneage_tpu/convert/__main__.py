"""`python -m boneage_tpu.convert`: runs `boneage_tpu.cli.make_tfrecords`."""

import sys

from boneage_tpu.cli.make_tfrecords import main

sys.exit(main(sys.argv))
