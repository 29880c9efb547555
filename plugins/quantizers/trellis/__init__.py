"""Trellis-coded quantization (QTIP's bitshift trellis): the code (``code.py``), one layer
(``algorithm.py``) and the ``trellis`` quantizer plugin (``plugin.py``)."""
