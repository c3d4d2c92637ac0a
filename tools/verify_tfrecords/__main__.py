import sys

from boneage_tpu.convert.verify import main

sys.exit(main(sys.argv))
