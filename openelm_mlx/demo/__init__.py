"""The bundled demo model: a 2.5M-parameter layer-wise-scaled OpenELM trained on tiny Shakespeare.

It is the default model of `openelm-mlx generate`, so a fresh offline install runs end to end.
"""

from pathlib import Path

DEMO_DIR = Path(__file__).resolve().parent
DEMO_NAME = "openelm-mlx bundled demo (2.5M parameters, tiny Shakespeare)"
