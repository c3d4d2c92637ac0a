"""Checks a converted data folder against its manifest: every shard present, sized and hashed.

    boneage-verify-tfrecords DATA     (or: python -m boneage_tpu.verify DATA,
                                       boneage-make-tfrecords --output DATA --verify)

Prints one line per shard; exits 0 when every shard matches, 1 when one does not.
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Sequence

import tensorflow as tf

from boneage_tpu import cli
from boneage_tpu.cli import option
from boneage_tpu.core import schema
from boneage_tpu.core.errors import Error, UsageError
from boneage_tpu.data import verify


@dataclasses.dataclass
class VerifyConfig:
    """The data folder to check."""

    data: tuple[str, ...] = option(
        (), "The converter's output folder (local or gs://).", positional=True
    )


def _job(config: VerifyConfig) -> None:
    if len(config.data) != 1:
        raise UsageError("give one data folder: boneage-verify-tfrecords DATA")
    try:
        bad = verify.verify(config.data[0].rstrip("/"))
    except tf.errors.OpError as e:
        raise Error(" ".join(str(e.message).split())) from None
    if bad:
        raise schema.ManifestError(f"{bad} shard(s) do not match the manifest")


def main(argv: Sequence[str] | None = None) -> int:
    """Parses `argv` (argv[0] is the program) and verifies; returns the exit status."""
    return cli.main("verify_tfrecords", VerifyConfig, _job, argv, __doc__)


if __name__ == "__main__":
    sys.exit(main(sys.argv))
