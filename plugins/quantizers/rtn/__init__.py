"""Round-to-nearest uniform quantization."""
