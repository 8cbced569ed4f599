"""Quantization: recipes, calibration (GPTQ, sensitivity) and the folder run."""
