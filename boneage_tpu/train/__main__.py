# `python -m boneage_tpu.train`: see `boneage_tpu.train.job` (imported first: it quiets
# TensorFlow's start-up logging before TensorFlow loads).
from boneage_tpu.train import job  # isort: split

from absl import app

__doc__ = job.__doc__  # absl's --help prints the __main__ module's docstring.
job.define_flags()
app.run(job.main)
