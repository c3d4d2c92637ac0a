"""`python -m tools.quickstart`: kept for existing scripts; runs `python -m boneage_tpu.quickstart`."""
