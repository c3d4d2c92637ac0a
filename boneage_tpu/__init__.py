"""boneage-tpu: a high-throughput TensorFlow trainer for pediatric bone age."""

__version__ = "0.1.0"
