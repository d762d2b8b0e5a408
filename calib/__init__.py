"""Calibration: calibration sets, INT8/FP8 post-training quantization, and the accuracy gate."""
