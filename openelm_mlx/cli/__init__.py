"""The `openelm-mlx` command: one typer app, one module of thin commands per area."""

from . import bench, convert, generate, lora, pretrain, quantize, serve  # noqa: F401  (each module registers its commands)
from ._app import app


def main() -> None:  # pragma: no cover - console entry point
    app(prog_name="openelm-mlx")


__all__ = ["app", "main"]
