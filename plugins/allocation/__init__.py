"""Bit allocators: turn a recipe into an explicit per-module quantization plan."""
