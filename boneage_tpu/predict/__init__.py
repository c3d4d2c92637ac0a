"""Prediction on new images: which images, the model's answers, the output table."""
