"""Checkpoint conversion: Hugging Face and CoreNet checkpoints to MLX, and MLX back to Hugging Face."""
