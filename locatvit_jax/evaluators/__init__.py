"""Evaluation metrics that accumulate over batches and hosts."""
