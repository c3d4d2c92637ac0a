"""`python -m tools.make_tfrecords`: kept for existing scripts; runs `python -m boneage_tpu.convert`."""
