"""A trained model at work: restoring it, running it over a split, its heatmaps."""
