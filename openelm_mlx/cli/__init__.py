"""The `openelm-mlx` command: one typer app, one module of thin commands per area."""

from . import bench, convert, evaluate, finetune, generate, lora, pretrain, quantize, serve  # noqa: F401  (each module registers its commands)
from ._app import app


def main() -> None:  # pragma: no cover - console entry point
    """The console script: usage errors become one `error:` line with exit code 1; Ctrl-C exits 130 quietly."""
    import sys

    import typer

    usage_error = typer.BadParameter.__mro__[1]  # click's UsageError, vendored by newer typer releases
    try:
        code = app(prog_name="openelm-mlx", standalone_mode=False)
    except usage_error as e:
        command = e.ctx.command_path if e.ctx is not None else "openelm-mlx"
        typer.echo(f"error: {' '.join(e.format_message().split())} (see: {command} -h)", err=True)
        sys.exit(1)
    except (typer.Abort, KeyboardInterrupt):
        typer.echo("", err=True)
        sys.exit(130)
    sys.exit(code if isinstance(code, int) else 0)


__all__ = ["app", "main"]
