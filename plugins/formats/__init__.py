"""Checkpoint formats: writers and readers."""
