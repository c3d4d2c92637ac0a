"""Entry point only: `python -m boneage_tpu.verify DATA` (the library is `data.verify`)."""
