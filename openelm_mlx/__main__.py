"""`python -m openelm_mlx` runs the CLI (also how `mlx.launch` starts it on each machine)."""

from .cli import main

main()
