"""The decoder, its frozen config and the compiled decode step built from it."""
