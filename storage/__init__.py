"""Storage backends: where checkpoints and calibration sets live, content-addressed by sha256."""
