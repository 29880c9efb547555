"""Built-in quantizers: one folder per method, each a plugin.py (wiring) and algorithm.py (pure)."""
