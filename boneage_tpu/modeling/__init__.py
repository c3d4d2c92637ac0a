"""The model: backbones, heads, the Keras model, losses and optimizers, the export."""
