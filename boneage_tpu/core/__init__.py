"""The foundation: errors, the run's settings, the on-disk contracts, storage and strategies."""
