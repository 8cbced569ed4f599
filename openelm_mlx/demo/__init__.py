"""The bundled demo model (trained on tiny Shakespeare), the default of `openelm-mlx generate`."""
