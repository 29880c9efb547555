"""Model sources (Hugging Face directories, GGUF files, quantmill checkpoints) and the
quantized linear modules that run quantmill's checkpoints."""
