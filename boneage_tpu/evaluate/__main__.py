"""`python -m boneage_tpu.evaluate` and the `boneage-evaluate` script: see `boneage_tpu.evaluate.job`."""

import sys

from boneage_tpu import tpu_runtime


def main() -> int:
    """Selects the TPU runtime, then imports TensorFlow (with the job) and runs the command."""
    tpu_runtime.prepare_command("evaluate", sys.argv)
    from boneage_tpu.evaluate import job

    return job.main(sys.argv)


if __name__ == "__main__":
    sys.exit(main())
