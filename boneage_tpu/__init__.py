"""boneage-tpu: a high-throughput TensorFlow trainer for pediatric bone age."""

from boneage_tpu.core.errors import ConfigError, Error, UsageError

__all__ = ["ConfigError", "Error", "UsageError", "__version__"]

__version__ = "0.1.0"
