"""Evaluation: perplexity and scoring."""
