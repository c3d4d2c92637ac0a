"""`python -m tools.make_phantom`: kept for existing scripts; runs `python -m boneage_tpu.phantom`."""
