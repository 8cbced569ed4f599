"""The `openelm-mlx` command: every verb is there and documents its options."""

import pytest
from typer.testing import CliRunner

from openelm_mlx.cli import app

COMMANDS = [
    "generate",
    "chat",
    "convert",
    "export",
    "train-tokenizer",
    "pretrain",
    "serve",
    "lora",
    "fuse",
    "quantize",
    "perplexity",
    "evaluate",
    "bench",
    "info",
]


def test_top_level_help_lists_every_command():
    result = CliRunner().invoke(app, ["--help"])
    assert result.exit_code == 0
    assert all(c in result.output for c in COMMANDS)


@pytest.mark.parametrize("command", COMMANDS)
def test_command_help(command):
    result = CliRunner().invoke(app, [command, "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0 and "Usage:" in result.output


def test_bad_arch_name_is_one_clean_line(tmp_path):
    result = CliRunner().invoke(
        app,
        [
            "pretrain",
            "--arch",
            "OpenELM-7B",
            "--data",
            str(tmp_path),
            "--tokenizer",
            str(tmp_path / "t.model"),
            "--out",
            str(tmp_path / "o"),
        ],
    )
    assert result.exit_code == 1 and "unknown OpenELM preset 'OpenELM-7B'" in result.output
    assert "Traceback" not in result.output
