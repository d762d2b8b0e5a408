"""Calibration data, post-training quantization and the accuracy gate (not built yet)."""
