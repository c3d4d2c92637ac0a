"""Evaluation: one-shot and continuous jobs, inference, metrics and the report."""
