"""Synthetic hand radiographs in the RSNA layout (`python -m boneage_tpu.phantom`)."""
