"""The OpenAI-compatible HTTP server: app, request parsing and the generation worker."""
