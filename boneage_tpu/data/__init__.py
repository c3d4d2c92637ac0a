"""Input data: CSV layouts, image decoding, the tf.data pipeline, sampling, augmentation."""
