"""Checkpoint conversion: Hugging Face, CoreNet and GGUF checkpoints to MLX, and MLX back to Hugging Face or GGUF."""

from .pipeline import Report, convert, export, export_gguf, import_gguf, open_source

__all__ = ["Report", "convert", "export", "export_gguf", "import_gguf", "open_source"]
