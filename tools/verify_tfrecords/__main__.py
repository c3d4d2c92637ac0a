import sys

from boneage_tpu.cli.verify_tfrecords import main

sys.exit(main(sys.argv))
