import sys

from boneage_tpu.data.verify import main

sys.exit(main(sys.argv))
