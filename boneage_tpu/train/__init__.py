"""Training: entry point (`job`), setup, the compiled loop and the run state on disk."""
