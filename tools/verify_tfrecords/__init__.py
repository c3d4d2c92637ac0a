"""`python -m tools.verify_tfrecords DATA`: runs `boneage_tpu.cli.verify_tfrecords`."""
