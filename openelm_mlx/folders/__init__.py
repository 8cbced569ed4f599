"""The MLX model folder: load/save, strict safetensors, safe output folders, arch files, the Hub."""
