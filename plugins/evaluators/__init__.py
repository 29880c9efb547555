"""Evaluators: perplexity, size."""
