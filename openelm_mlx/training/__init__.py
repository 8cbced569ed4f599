"""Training: the loop, data, LoRA/DoRA and pretraining."""
