"""Checkpoint conversion: Hugging Face and CoreNet checkpoints to MLX, and MLX back to Hugging Face."""

from .pipeline import Report, convert, export, open_source

__all__ = ["Report", "convert", "export", "open_source"]
