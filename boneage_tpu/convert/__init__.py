"""The converter: RSNA images + CSV -> sharded TFRecords with a manifest (`python -m boneage_tpu.convert`)."""
