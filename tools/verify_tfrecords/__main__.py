import sys

from boneage_tpu.verify import main

sys.exit(main(sys.argv))
