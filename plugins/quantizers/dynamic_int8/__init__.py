"""Dynamic int8: int8 weights per output channel, activations quantized per token at run time."""
