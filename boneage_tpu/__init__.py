"""boneage-tpu: a high-throughput TensorFlow trainer for pediatric bone age."""

import os as _os

from boneage_tpu.core.errors import ConfigError, Error, UsageError

# Keras 3 picks its backend once, at its first import (KERAS_BACKEND, else ~/.keras/keras.json):
# set before any module of the package imports Keras. `cli.main` refuses any other backend.
_os.environ.setdefault("KERAS_BACKEND", "tensorflow")

__all__ = ["ConfigError", "Error", "UsageError", "__version__"]

__version__ = "0.1.0"
