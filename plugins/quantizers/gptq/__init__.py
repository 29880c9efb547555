"""GPTQ: Hessian-aware post-training quantization, implemented in quantmill."""
