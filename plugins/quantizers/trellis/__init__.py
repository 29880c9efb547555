"""Trellis-coded quantization (QTIP's bitshift trellis): the code itself so far (``code.py``)."""
