"""Calibration sources: text and JSONL files tokenized into fixed-length samples."""
