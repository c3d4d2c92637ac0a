"""`python -m boneage_tpu.train` and the `boneage-train` script: see `boneage_tpu.train.job`."""

import sys

from boneage_tpu import tpu_runtime


def main() -> int:
    """Selects the TPU runtime, then imports TensorFlow (with the job) and runs the command."""
    tpu_runtime.prepare_command("train", sys.argv)
    from boneage_tpu.train import job

    return job.main(sys.argv)


if __name__ == "__main__":
    sys.exit(main())
